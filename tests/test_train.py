"""End to end on a CPU: train, checkpoint, resume exactly, refuse what cannot be resumed, sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, fast_args, run_cli

from src import checkpoint as ckpt
from src.errors import SLMError
from src.training.config import load_config
from src.training.trainer import train


def test_training_writes_the_seed_layout_and_learns(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"training.max_steps": 24, "training.keep_last": 2})
    res = train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    run = tmp_path / "checkpoints" / cfg.name
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_16.pt", "step_20.pt"]  # keep_last
    assert (run / "final.pt").is_file() and (tmp_path / "models" / f"{cfg.name}_final.pt").is_file()
    assert res.model_path == tmp_path / "models" / "tiny_final.pt"

    state = ckpt.load(run / "final.pt")
    for key in ("model_state_dict", "optimizer_state_dict", "step", "tokens", "loader", "rng",
                "config", "tokenizer"):
        assert key in state
    assert state["step"] == 24 and not any(k.startswith("_orig_mod.") for k in state["model_state_dict"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]
    assert {"step", "train/loss", "lr", "tokens_per_sec", "grad_norm", "tokens"} <= set(train_rows[0])
    assert {"val/loss", "val/bpb"} <= set(val_rows[0])
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.5  # it learns
    assert val_rows[-1]["val/bpb"] < val_rows[0]["val/bpb"]
    assert any("samples" in r for r in rows)


def test_lr_schedule_warms_up_and_decays(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"training.max_steps": 20, "training.log_every": 1, "training.warmup_steps": 5})
    train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "checkpoints/tiny/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    peak = cfg.training.learning_rate
    top = lrs.index(max(lrs))
    assert top == 4 and max(lrs) > 0.85 * peak  # warmup ends at step 5 (cosine has begun)
    assert all(a < b for a, b in zip(lrs[:top], lrs[1 : top + 1]))
    assert all(a > b for a, b in zip(lrs[top:], lrs[top + 1 :]))
    assert lrs[-1] == pytest.approx(peak * cfg.training.min_lr_ratio, rel=0.1)


def _final_weights(root):
    return ckpt.load(root / "checkpoints" / "tiny" / "final.pt")["model_state_dict"]


def test_sigkill_then_rerun_equals_uninterrupted_run(corpus, tmp_path):
    """The promise of exact resume: same final weights, bit for bit, after a SIGKILL mid-run."""
    args = ["train", "--no-wandb", "--device", "cpu", "--samples", "0",
            *fast_args(corpus, **{"training.max_steps": 40, "training.checkpoint_every": 5,
                                  "training.batch_size": 16, "training.eval_every": 20})]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_cli(*args, "--data-root", a)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "src", *args, "--data-root", str(b)], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = b / "checkpoints/tiny/step_10.pt"
    deadline = time.time() + 240
    while not target.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert target.exists(), "the run never reached step 10"
    assert not (b / "checkpoints/tiny/final.pt").exists(), "the kill came too late to test resume"
    r = run_cli(*args, "--data-root", b)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the metrics log of the resumed run reads as one run: steps strictly increase
    steps = [json.loads(x)["step"] for x in (b / "checkpoints/tiny/metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == sorted(set(steps))


def test_resume_never_moves_the_old_run_aside(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"training.max_steps": 4})
    train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    first_model = (tmp_path / "models/tiny_final.pt").read_bytes()
    msgs = []
    train(cfg, data_root=tmp_path, use_wandb=False, resume="never", log=msgs.append)
    olds = list((tmp_path / "checkpoints").glob("tiny.old-*"))
    assert len(olds) == 1 and (olds[0] / "final.pt").is_file()
    # the old run's finished model is kept beside it, not replaced by the new one
    assert (olds[0] / "tiny_final.pt").read_bytes() == first_model
    assert (tmp_path / "models/tiny_final.pt").is_file()
    assert any("moved the old run" in m for m in msgs)
    assert not any("resumed" in m for m in msgs)


def test_finished_run_is_not_retrained(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"training.max_steps": 4})
    train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    before = (tmp_path / "checkpoints/tiny/final.pt").stat().st_mtime_ns
    msgs = []
    res = train(cfg, data_root=tmp_path, use_wandb=False, log=msgs.append)
    assert res.step == 4 and any("already complete" in m for m in msgs)
    assert (tmp_path / "checkpoints/tiny/final.pt").stat().st_mtime_ns == before


def test_longer_budget_continues_from_final(fast_cfg, tmp_path):
    train(fast_cfg(**{"training.max_steps": 4}), data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    res = train(fast_cfg(**{"training.max_steps": 8}), data_root=tmp_path, use_wandb=False,
                log=lambda *a: None)
    assert res.step == 8


def test_checkpoint_of_another_shape_is_refused(fast_cfg, tmp_path):
    train(fast_cfg(**{"training.max_steps": 4}), data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    with pytest.raises(SLMError, match=r"different model shape \(model.n_layer=2 there, 3 here"):
        train(fast_cfg(**{"training.max_steps": 8, "model.n_layer": 3}), data_root=tmp_path,
              use_wandb=False, log=lambda *a: None)


def test_a_checkpoint_from_before_a_shape_key_existed_takes_its_default(fast_cfg, tmp_path):
    """A saved config without model.value_embeds/unet_skips (written before they existed) is a
    model without them: it resumes as such, and a config that turns one on is refused by name."""
    from src import checkpoint as ckpt

    train(fast_cfg(**{"training.max_steps": 4}), data_root=tmp_path, use_wandb=False,
          log=lambda *a: None)
    path = tmp_path / "checkpoints/tiny/final.pt"
    state = ckpt.load(path)
    for k in ("value_embeds", "unet_skips"):
        del state["config"]["model"][k]
    ckpt.save(state, path)
    with pytest.raises(SLMError, match=r"model.value_embeds=False there, True here"):
        train(fast_cfg(**{"training.max_steps": 8, "model.value_embeds": True}),
              data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    res = train(fast_cfg(**{"training.max_steps": 8}), data_root=tmp_path, use_wandb=False,
                log=lambda *a: None)
    assert res.step == 8


def test_resume_from_a_given_path(fast_cfg, tmp_path):
    train(fast_cfg(**{"training.max_steps": 8}), data_root=tmp_path / "x", use_wandb=False, log=lambda *a: None)
    msgs = []
    res = train(fast_cfg(**{"training.max_steps": 12}), data_root=tmp_path / "y", use_wandb=False,
                resume=str(tmp_path / "x/checkpoints/tiny/step_4.pt"), log=msgs.append)
    assert res.step == 12 and any("resumed from" in m and "step_4.pt" in m for m in msgs)


def test_a_resumed_run_frees_the_checkpoint_it_restored(fast_cfg, tmp_path, monkeypatch):
    """The whole checkpoint (weights, optimizer) is not kept for the rest of the run."""
    import gc
    import weakref

    class State(dict):  # a dict that a weak reference can watch
        pass

    train(fast_cfg(**{"training.max_steps": 4}), data_root=tmp_path, use_wandb=False,
          log=lambda *a: None)
    loaded, real = [], ckpt.load

    def load(*a, **kw):
        state = State(real(*a, **kw))
        loaded.append((weakref.ref(state), kw.get("mmap")))
        return state

    monkeypatch.setattr(ckpt, "load", load)
    alive = []

    def during_the_run(path):
        gc.collect()
        alive.append([ref() is not None for ref, _ in loaded])

    res = train(fast_cfg(**{"training.max_steps": 8}), data_root=tmp_path, use_wandb=False,
                log=lambda *a: None, on_checkpoint=during_the_run)
    assert res.step == 8 and loaded and all(mmap for _, mmap in loaded)  # mapped, not read in
    assert alive and not any(any(a) for a in alive)


def test_time_budget_is_a_complete_run(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"training.max_steps": 10_000_000, "training.max_seconds": 4,
                      "training.log_every": 1})
    t0 = time.time()
    res = train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    assert time.time() - t0 < 60 and 0 < res.step < 10_000_000
    rows = [json.loads(x) for x in (tmp_path / "checkpoints/tiny/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # the schedule reached its end: the last lr is near the floor, not mid-cosine
    assert lrs[-1] < cfg.training.learning_rate * (cfg.training.min_lr_ratio + 0.1)


def test_cli_dry_run_prints_the_plan():
    r = run_cli("train", "--config", "configs/gpt_124m.yaml", "--dry-run")
    assert r.returncode == 0, r.stderr
    for needle in ("parameters:", "124.", "tokens per step:   65,536", "FLOPs per token",
                   "memory estimate", "n_layer: 12"):
        assert needle in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--config", "configs/nope.yaml"], "config file not found"),
        (["train", "--training.learning_rate", "-1"], "training.learning_rate"),
        (["train", "--bogus"], "unknown option '--bogus'"),
        (["train", "--data.source", "/no/such/dir", "--no-wandb"], "no such file or folder"),
        (["sample", "/no/such.pt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_clear_line(args, needle, tmp_path):
    r = run_cli(*args, "--data-root", tmp_path) if args[0] == "train" else run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_a_clear_error(tmp_path):
    r = run_cli("train", "--device", "cuda", "--no-wandb", "--data-root", tmp_path)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_sample_uses_the_checkpoint_tokenizer(fast_cfg, tmp_path):
    train(fast_cfg(**{"training.max_steps": 4}), data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    r = run_cli("sample", tmp_path / "models/tiny_final.pt", "--prompt", "def main(",
                "--max-new-tokens", "20", "--seed", "1", "--temperature", "0.9", "--top-k", "50")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def main(") and len(r.stdout) > len("def main(") + 5
    again = run_cli("sample", tmp_path / "models/tiny_final.pt", "--prompt", "def main(",
                    "--max-new-tokens", "20", "--seed", "1", "--temperature", "0.9", "--top-k", "50")
    assert again.stdout == r.stdout  # a seed makes sampling repeatable


def test_crafted_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model_state_dict": Evil()}, tmp_path / "evil.pt")
    r = run_cli("sample", tmp_path / "evil.pt")
    assert r.returncode == 2 and "refuses to unpickle" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_continuing_from_a_checkpoint_is_exact(fast_cfg, tmp_path, optimizer):
    """Training on from step_4.pt in a fresh folder ends where the uninterrupted run ended."""
    cfg = fast_cfg(**{"training.max_steps": 8, "training.optimizer": optimizer})
    train(cfg, data_root=tmp_path / "a", use_wandb=False, log=lambda *a: None)
    train(cfg, data_root=tmp_path / "b", use_wandb=False, log=lambda *a: None,
          resume=str(tmp_path / "a/checkpoints/tiny/step_4.pt"))
    wa, wb = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    first = ckpt.load(tmp_path / "a/checkpoints/tiny/step_4.pt")["model_state_dict"]
    assert not all(torch.equal(first[k], wa[k]) for k in wa)  # and training did move the weights


def test_memory_that_cannot_be_had_is_refused_wherever_training_starts(fast_cfg, tmp_path,
                                                                        capsys, monkeypatch):
    """train() itself refuses (the Modal containers call it directly), --dry-run says so."""
    import yaml

    import modal_app
    from src.cli import main

    huge = {"model.vocab_size": 100_000_000, "name": "huge"}
    with pytest.raises(SLMError, match="does not fit") as e:
        train(fast_cfg(**huge), data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    assert "GB" in str(e.value) and "--ignore-memory" in str(e.value)
    assert not (tmp_path / "checkpoints" / "huge").exists()  # refused before any work
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    out = modal_app.training_body(config_yaml=yaml.safe_dump(fast_cfg(**huge).to_dict()),
                                  wandb=False, log=lambda *a: None)
    assert "does not fit" in out["error"]  # returned, not raised: Modal does not retry it
    assert main(["train", "--config", "configs/tiny.yaml", "--dry-run",
                 "--model.vocab_size", "100000000"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["train", "--config", "configs/tiny.yaml", "--dry-run"]) == 0
    assert "memory here:       fits" in capsys.readouterr().out


def test_memory_check_weighs_the_model_init_from_loads(tmp_path, monkeypatch):
    # chat_tiny sets no shape keys: GPT-2 small's defaults fit 8 GB, GPT-2 XL's 1.5B do not; the
    # check must weigh the model the source gives (read from a table: no download)
    from src.training import memory

    monkeypatch.setattr(memory, "device_memory_gb", lambda device: 8.0)
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml", {"model.init_from": "gpt2-xl"})
    with pytest.raises(SLMError, match="does not fit"):
        train(cfg, tmp_path, "cpu", "never", False, log=lambda *a: None)
