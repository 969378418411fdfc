"""Multi-process training with real torchrun processes on the CPU (gloo): DDP and FSDP2.

2 processes x micro-batch B must train exactly like 1 process x 2B, checkpoints move between
world sizes, and a failing rank ends the whole launch with its error shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAST, ROOT, fast_args

from src.errors import SLMError
from src.model.gpt import GPT
from src.training import distributed as dist
from src.training.config import config_from_dict
from src.training.trainer import train

# 4 steps, a checkpoint at step 2, an evaluation whose 5 windows split unevenly over 2 ranks.
RUN = dict(training__max_steps=4, training__checkpoint_every=2, training__eval_every=2,
           training__log_every=1, training__eval_tokens=5 * 64, training__sample_tokens=4)


def torchrun(args, nproc=2, script="train_local.py", timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rows(run_dir, key):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The reference: one process, micro-batch 4. Its data root is shared by the other runs."""
    from src.training.config import load_config

    root = tmp_path_factory.mktemp("dist")
    over = {**FAST, "data.source": str(corpus), "name": "single",
            **{k.replace("__", "."): v for k, v in RUN.items()}}
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    res = train(cfg, data_root=root, device="cpu", use_wandb=False, log=lambda *a: None)
    return root, res


def launch(corpus, root, name, nproc=2, batch=2, *extra, script="train_local.py"):
    args = ["--no-wandb", "--device", "cpu", "--samples", "0", "--data-root", root,
            "--name", name, *fast_args(corpus, **RUN, training__batch_size=batch), *extra]
    return torchrun(args, nproc=nproc, script=script)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_with_twice_the_batch(corpus, single, parallelism):
    root, ref = single
    p = launch(corpus, root, parallelism, 2, 2, "--training.parallelism", parallelism)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = root / "checkpoints" / parallelism
    for key in ("train/loss", "val/loss"):
        a, b = rows(ref.run_dir, key), rows(run, key)
        assert len(a) == len(b) > 1
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (key, a, b)
    assert rows(run, "tokens") == rows(ref.run_dir, "tokens")  # same global batch
    assert p.stdout.count("step      1/4") == 1  # only rank 0 logs

    # The saved model is plain: it loads on one CPU into an ordinary GPT.
    saved = torch.load(root / "models" / f"{parallelism}_final.pt", weights_only=True)
    model = GPT(config_from_dict(saved["config"]).model)
    model.load_state_dict(saved["model_state_dict"])
    ref_sd = torch.load(ref.model_path, weights_only=True)["model_state_dict"]
    assert max_diff(model.state_dict(), ref_sd) < 1e-5

    # N -> 1: the 2-rank checkpoint at step 2 resumes in one process and ends where the
    # 1-process run ended (weights and optimizer moments).
    cfg = config_from_dict(torch.load(run / "step_2.pt", weights_only=True)["config"])
    cfg.name, cfg.training.batch_size = f"{parallelism}-on-one", 4
    res = train(cfg, data_root=root, device="cpu", resume=str(run / "step_2.pt"),
                use_wandb=False, log=lambda *a: None)
    got = torch.load(res.final_checkpoint, weights_only=True)
    want = torch.load(ref.final_checkpoint, weights_only=True)
    assert got["step"] == 4
    assert max_diff(got["model_state_dict"], want["model_state_dict"]) < 1e-5
    m_got, m_want = got["optimizer_state_dict"]["state"], want["optimizer_state_dict"]["state"]
    assert max(abs(m_got[k]["exp_avg"] - m_want[k]["exp_avg"]).max().item() for k in m_want) < 1e-6


def test_fsdp_resumes_a_single_process_checkpoint(corpus, single):
    """1 -> 2: the full optimizer state is sharded over the ranks on load."""
    root, ref = single
    p = launch(corpus, root, "one-to-fsdp", 2, 2, "--training.parallelism", "fsdp",
               "--resume", ref.run_dir / "step_2.pt")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "checkpoint written with 1 ranks, resuming with 2" in p.stdout
    got = torch.load(root / "checkpoints" / "one-to-fsdp" / "final.pt", weights_only=True)
    want = torch.load(ref.final_checkpoint, weights_only=True)
    assert max_diff(got["model_state_dict"], want["model_state_dict"]) < 1e-5
    assert rows(root / "checkpoints" / "one-to-fsdp", "train/loss") == pytest.approx(
        rows(ref.run_dir, "train/loss")[2:], abs=1e-4)


def test_a_crash_on_one_rank_ends_every_rank_with_its_error(corpus, single, tmp_path):
    root, _ = single
    crash = tmp_path / "crash_rank1.py"
    crash.write_text(textwrap.dedent("""
        import os, sys
        sys.path.insert(0, os.getcwd())
        from src.data import loader
        real, calls = loader.BatchLoader.next_batch, []
        def next_batch(self, device="cpu"):
            calls.append(1)
            if self.rank == 1 and len(calls) == 3:
                raise RuntimeError("rank 1 ran out of memory (simulated)")
            return real(self, device)
        loader.BatchLoader.next_batch = next_batch
        from src.cli import main
        sys.exit(main(["train", *sys.argv[1:]]))
    """))
    p = launch(corpus, root, "crash", 2, 2, script=crash)  # a hang would hit the timeout
    out = p.stdout + p.stderr
    assert p.returncode != 0
    root_cause = out[out.index("Root Cause"):]
    assert "rank      : 1" in root_cause
    assert "rank 1 ran out of memory (simulated)" in root_cause
    assert not (root / "checkpoints" / "crash" / "final.pt").exists()


def test_a_signal_to_one_rank_stops_all_at_the_same_step(corpus, single, tmp_path):
    """Preemption: SIGTERM reaching one rank only; every rank saves the same step and stops."""
    root, _ = single
    term = tmp_path / "term_rank1.py"
    term.write_text(textwrap.dedent("""
        import os, signal, sys
        sys.path.insert(0, os.getcwd())
        from src.data import loader
        real, calls = loader.BatchLoader.next_batch, []
        def next_batch(self, device="cpu"):
            calls.append(1)
            if self.rank == 1 and len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, device)
        loader.BatchLoader.next_batch = next_batch
        from src.cli import main
        sys.exit(main(["train", *sys.argv[1:]]))
    """))
    p = launch(corpus, root, "term", 2, 2, "--training.parallelism", "fsdp", script=term)
    assert p.returncode != 0
    assert p.stderr.count("stopped: SIGTERM: saved") == 2  # both ranks, one message each
    run = root / "checkpoints" / "term"
    assert [f.name for f in run.glob("*.pt")] == ["step_2.pt"]
    assert torch.load(run / "step_2.pt", weights_only=True)["step"] == 2


def test_bad_launch_settings_are_refused_clearly(fast_cfg, monkeypatch):
    cfg = fast_cfg(training__batch_tokens=4 * 64 * 2 * 3)  # splits over 2 and 3, not over 4
    assert dist.plan(cfg, 2) == 3 and dist.plan(cfg, 3) == 2
    with pytest.raises(SLMError, match=r"batch_tokens 1,536 does not split over 4 .* 4 x 64 x 4"):
        dist.plan(cfg, 4)
    with pytest.raises(SLMError, match="muon"):
        dist.check_launch(fast_cfg(training__parallelism="fsdp", training__optimizer="muon"),
                          2, "cpu")
    with pytest.raises(SLMError, match="mps"):
        dist.check_launch(fast_cfg(), 2, "mps")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SLMError, match="torchrun"):
        dist.setup("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        with pytest.raises(SLMError, match="no CUDA GPU.*--device cpu"):
            dist.setup("cuda")


def test_resume_with_another_global_batch_is_refused(single):
    root, ref = single
    cfg = config_from_dict(torch.load(ref.final_checkpoint, weights_only=True)["config"])
    cfg.name, cfg.training.batch_size = "half-batch", 2
    with pytest.raises(SLMError, match=r"256 tokens per optimizer step.*gives 128.*batch_tokens: 256"):
        train(cfg, data_root=root, device="cpu", resume=str(ref.run_dir / "step_2.pt"),
              use_wandb=False, log=lambda *a: None)


def test_fsdp_writes_optimizer_shards_that_are_checked_before_use(corpus, single, tmp_path):
    """Under FSDP no rank gathers the optimizer: each writes its shard beside the checkpoint.
    Old shards go with their checkpoints; missing or crafted shards are refused, never read."""
    import pickle
    import shutil

    from src import checkpoint as ckpt
    from src.errors import SLMError

    root, _ = single
    p = launch(corpus, root, "shards", 2, 2, "--training.parallelism", "fsdp",
               "--training.keep_last", "1", "--training.max_steps", "6")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = root / "checkpoints" / "shards"
    step = torch.load(run / "step_4.pt", weights_only=True)
    assert step["optimizer_state_dict"] == {"sharded": "step_4.optim"}
    assert sorted(f.name for f in (run / "step_4.optim").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (run / "step_2.optim").exists()  # pruned with step_2.pt (keep_last 1)
    assert (run / "final.optim" / ".metadata").is_file()

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "final.optim" / "__1_0.distcp").unlink()  # a lost shard: the previous checkpoint
    found = ckpt.find_resumable(bad, log=lambda m: None)
    assert found and found[0].name == "step_4.pt"

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / "step_4.optim" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SLMError, match="optimizer shards .* are unreadable"):
        ckpt.check_resumable(torch.load(bad / "step_4.pt", weights_only=True), bad / "step_4.pt")
    assert ckpt.find_resumable(bad, log=lambda m: None) is None and not marker.exists()
    crafted = {**step, "optimizer_state_dict": {"sharded": "../../etc"}}
    with pytest.raises(SLMError, match="not a folder beside it"):
        ckpt.check_resumable(crafted, bad / "step_4.pt")
