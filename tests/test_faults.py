"""Faults tried on purpose: SIGKILL anywhere, SIGTERM/SIGINT, a full disk, NaN, two runs at once.

Each test runs the real `slm` command (`python -m src`) and hurts it the way the world does; what
it checks is what a user would notice: the re-run ends where an uninterrupted run ends, bit for
bit, nothing half-written is ever loaded, and every stop says what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, fast_args

from src import checkpoint as ckpt
from src.cli import main
from src.errors import SLMError
from src.training.config import load_config
from src.training.trainer import train

TRAIN = ["train", "--no-wandb", "--device", "cpu", "--samples", "0"]
# A long learned-position table makes each checkpoint ~9 MB (so a kill can land inside a save)
# without making the steps slower: training reads only the first seq_len positions.
BIG_SAVES = {"model.block_size": 8192, "training.seq_len": 64}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # in-process runs set training.threads
    yield
    torch.set_num_threads(n)


def _cfg(corpus, **kw):
    """The config fast_args(corpus, **kw) gives on the command line, single-threaded."""
    o = {**FAST, "data.source": str(corpus), "training.threads": 1, **kw}
    return load_config(ROOT / "configs" / "tiny.yaml", o)


def _start(args, root: Path, log: Path, preexec_fn=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "src", *map(str, args), "--data-root", str(root)],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=preexec_fn)


def _wait_for(cond, proc: subprocess.Popen, timeout=300, poll=0.002):
    """Poll cond() until it holds; False if the process ended first (or the time ran out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


def _kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=120)


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _half_written(folder: Path) -> list[Path]:
    """Temporary checkpoint files that already hold some bytes (a save in progress)."""
    out = []
    for p in _tmp_files(folder):
        try:
            if p.stat().st_size > 0:
                out.append(p)
        except FileNotFoundError:  # renamed meanwhile: that save completed
            pass
    return out


def _metric_steps(run: Path) -> list[int]:
    p = run / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_many_points_then_rerun_ends_with_the_same_weights(corpus, tmp_path):
    """One run killed four times (after a checkpoint appears, inside a checkpoint write, at a
    random moment, inside the final save), then let finish: it ends with exactly the weights and
    optimizer state of a run that was never interrupted, and no partial file survives."""
    kw = {**BIG_SAVES, "training.max_steps": 32, "training.checkpoint_every": 4,
          "training.eval_every": 12, "training.keep_last": 2}
    root = tmp_path / "data"
    # The reference: the same config, uninterrupted, in this process (its name does not change
    # the numbers; it also prepares the shared dataset once).
    ref_cfg = _cfg(corpus, **kw, name="reference")
    train(ref_cfg, data_root=root, device="cpu", use_wandb=False, log=lambda *a: None)
    ref = ckpt.load(root / "checkpoints/reference/final.pt")

    args = [*TRAIN, *fast_args(corpus, **{"training.threads": 1, **kw})]
    run, log = root / "checkpoints" / "tiny", tmp_path / "runs.log"
    rng = random.Random(9)
    kills = []

    # 1. right after the first checkpoint file appears
    p = _start(args, root, log)
    assert _wait_for(lambda: (run / "step_4.pt").exists(), p), log.read_text()
    _kill(p)
    kills.append("after step_4.pt appeared")

    # 2. inside a checkpoint write: freeze the process as soon as the temporary file exists,
    #    confirm the write is unfinished, then kill it
    p = _start(args, root, log)
    for _ in range(5):
        assert _wait_for(lambda: _half_written(run), p), log.read_text()
        p.send_signal(signal.SIGSTOP)
        if _half_written(run):
            break
        p.send_signal(signal.SIGCONT)  # the write finished first: try the next one
    stale = _half_written(run)
    _kill(p)
    assert stale, "never caught a checkpoint write in progress"
    kills.append(f"inside the write of {stale[0].name} ({stale[0].stat().st_size:,} bytes so far)")

    # 3. at a random moment of training, after the run has resumed and made progress
    off = log.stat().st_size
    p = _start(args, root, log)
    trained = lambda: "resumed from" in log.read_text()[off:] and "| loss" in log.read_text()[off:]  # noqa: E731
    assert _wait_for(trained, p), log.read_text()
    time.sleep(rng.uniform(0.0, 0.5))
    _kill(p)
    kills.append(f"at a random moment (metrics up to step {max(_metric_steps(run))})")

    # 4. inside the final save
    p = _start(args, root, log)
    final_tmp = lambda: [p for p in _half_written(run) if p.name.startswith(".final.pt")]  # noqa: E731
    caught = _wait_for(final_tmp, p)
    if caught:
        p.send_signal(signal.SIGSTOP)
        caught = bool(final_tmp())
    _kill(p)
    if caught:
        assert not (run / "final.pt").exists()
        kills.append("inside the write of final.pt")

    # the re-run finishes the job
    r = subprocess.run([sys.executable, "-m", "src", *args, "--data-root", str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    out = ckpt.load(run / "final.pt")
    assert out["step"] == 32
    assert _same_tensors(out["model_state_dict"], ref["model_state_dict"])
    assert out["optimizer_state_dict"]["state"].keys() == ref["optimizer_state_dict"]["state"].keys()
    for k, s in ref["optimizer_state_dict"]["state"].items():
        assert _same_tensors(s, out["optimizer_state_dict"]["state"][k])
    model = ckpt.load(root / "models/tiny_final.pt")["model_state_dict"]
    assert _same_tensors(model, ref["model_state_dict"])
    # no partial file is left over, and each resume named a complete checkpoint
    assert _tmp_files(run) == [] and _tmp_files(root / "models") == []
    resumes = re.findall(r"^resumed from (\S+) at step (\d+) ", log.read_text() + r.stdout, re.M)
    assert len(resumes) == len(kills)
    for path, step in resumes:  # always a complete checkpoint, never a temporary file
        assert Path(path).name in (f"step_{step}.pt", "final.pt"), path
    steps = [s for s in _metric_steps(run)]
    assert steps == sorted(steps)  # the metrics log reads as one run
    print(f"\nSIGKILL points tried: {len(kills)}: " + "; ".join(kills))


def test_half_written_or_damaged_checkpoints_are_never_loaded(fast_cfg, tmp_path):
    """A newest step file that is cut short or has a flipped byte is skipped with a warning."""
    cfg = fast_cfg(**{"training.max_steps": 8, "training.checkpoint_every": 4})
    train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    run = tmp_path / "checkpoints" / cfg.name
    good = (run / "final.pt").read_bytes()
    (run / "final.pt").unlink()
    (run / "step_12.pt").write_bytes(good[: len(good) // 2])  # cut short
    flipped = bytearray(good)
    for i in range(len(flipped) // 2, len(flipped) // 2 + 64):
        flipped[i] ^= 0xFF
    (run / "step_16.pt").write_bytes(bytes(flipped))  # damaged in the middle
    (run / ".step_20.pt.999.tmp").write_bytes(good[:1000])  # a save a kill cut short
    msgs = []
    res = train(fast_cfg(**{"training.max_steps": 12, "training.checkpoint_every": 4}),
                data_root=tmp_path, use_wandb=False, log=msgs.append)
    text = "\n".join(msgs)
    assert "skipping step_16.pt" in text and "fails its checksum" in text
    assert "skipping step_12.pt" in text and "truncated" in text
    assert "resumed from" in text and "step_4.pt at step 4" in text
    assert "removed" in text and not (run / ".step_20.pt.999.tmp").exists()
    assert res.step == 12


def test_stop_between_final_checkpoint_and_model_file_is_repaired(fast_cfg, tmp_path):
    """A kill after final.pt but before models/<name>_final.pt: the re-run writes the model."""
    cfg = fast_cfg(**{"training.max_steps": 4})
    train(cfg, data_root=tmp_path, use_wandb=False, log=lambda *a: None)
    model = tmp_path / "models" / "tiny_final.pt"
    weights = ckpt.load(model)["model_state_dict"]
    model.unlink()
    msgs = []
    train(cfg, data_root=tmp_path, use_wandb=False, log=msgs.append)
    assert any("already complete" in m for m in msgs)
    again = ckpt.load(model)
    assert _same_tensors(again["model_state_dict"], weights) and again["step"] == 4


def test_sigkill_during_data_preparation_then_rerun_gives_the_same_shards(corpus, tmp_path):
    extra = ["--data.shard_tokens", "20000"]  # ~40 shard files: time to land a kill among them
    args = ["prepare", *fast_args(corpus), *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    p = _start(args, b, tmp_path / "prep.log")
    datasets = b / "datasets"
    assert _wait_for(lambda: len(list(datasets.rglob("train_*.bin"))) >= 3, p), (
        (tmp_path / "prep.log").read_text())
    _kill(p)
    assert not list(datasets.rglob("manifest.json")), "a killed preparation looks complete"
    r = subprocess.run([sys.executable, "-m", "src", *args, "--data-root", str(b)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # the reference: an uninterrupted preparation of the same config
    r = subprocess.run([sys.executable, "-m", "src", *args, "--data-root", str(a)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (ma,), (mb,) = (list(x.glob("datasets/*/manifest.json")) for x in (a, b))
    da, db = ma.parent, mb.parent
    assert da.name == db.name
    made = lambda d: sorted(f.relative_to(d) for f in d.rglob("*.bin"))  # noqa: E731
    assert made(da) == made(db) and len(made(db)) > 3
    for f in made(da) + [Path("tokenizer.json")]:
        assert _sha(da / f) == _sha(db / f), f
    ja, jb = (json.loads(m.read_text()) for m in (ma, mb))
    assert ja["shards"] == jb["shards"] and ja["tokenizer"] == jb["tokenizer"]


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_promptly(sig, corpus, tmp_path):
    args = [*TRAIN, *fast_args(corpus, **{"training.threads": 1, "training.max_steps": 100000,
                                           "training.checkpoint_every": 100000,
                                           "training.eval_every": 100000})]
    run, log = tmp_path / "checkpoints" / "tiny", tmp_path / "log"
    p = _start(args, tmp_path, log)
    assert _wait_for(lambda: len(_metric_steps(run)) >= 3, p), log.read_text()
    p.send_signal(sig)
    t0 = time.time()
    try:
        p.wait(timeout=120)  # a hang guard, not a speed claim
    finally:
        if p.poll() is None:
            p.kill()
    took = time.time() - t0
    out = log.read_text()
    assert p.returncode == 128 + sig, out
    name = signal.Signals(sig).name
    assert f"stopped: {name}: saved" in out and "re-run to resume" in out
    assert "Traceback" not in out
    (n, path), = ckpt.step_files(run)
    state = ckpt.check_resumable(ckpt.load(path), path)
    assert state["step"] == n >= max(_metric_steps(run))
    print(f"\n{name}: checkpoint at step {n}, exit {p.returncode} {took:.1f} s after the signal")


# ----------------------------------------------------------------------------- disk full


def _file_limit(nbytes: int):
    """preexec_fn: files may not grow past nbytes (writes then fail with EFBIG, as on a full
    disk; SIGXFSZ is ignored so the process sees the error instead of dying)."""

    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return pre


def test_disk_full_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path):
    train(_cfg(corpus, **{"training.max_steps": 4}), data_root=tmp_path, device="cpu",
          use_wandb=False, log=lambda *a: None)
    run = tmp_path / "checkpoints" / "tiny"
    before = {p.name: _sha(p) for p in run.glob("*.pt")} | {"model": _sha(tmp_path / "models/tiny_final.pt")}
    size = (run / "final.pt").stat().st_size
    args = [*TRAIN, *fast_args(corpus, **{"training.threads": 1, "training.max_steps": 8})]
    p = _start(args, tmp_path, tmp_path / "log", preexec_fn=_file_limit(size // 2))
    p.wait(timeout=600)
    out = (tmp_path / "log").read_text()
    assert p.returncode == 2, out
    assert "resumed from" in out  # it trained on, then could not save
    err = out.strip().splitlines()[-1]
    assert err.startswith("error: could not write checkpoint") and "final.pt" in err
    assert "File too large" in err and "previous checkpoints are intact" in err
    assert "Traceback" not in out
    after = {p.name: _sha(p) for p in run.glob("*.pt")} | {"model": _sha(tmp_path / "models/tiny_final.pt")}
    assert after == before and _tmp_files(run) == []
    assert ckpt.load(run / "final.pt")["step"] == 4


def test_disk_full_at_any_point_of_a_save(fast_cfg, tmp_path):
    """Wherever the disk fills up inside torch.save (it reports some as OSError, most as a
    RuntimeError on close), the save fails with one clear error and leaves nothing behind."""
    train(fast_cfg(**{"training.max_steps": 2}), data_root=tmp_path, use_wandb=False,
          log=lambda *a: None)
    path = tmp_path / "checkpoints/tiny/final.pt"
    state, before = ckpt.load(path), _sha(path)
    size = path.stat().st_size
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        for frac in (0.0001, 0.01, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.999):
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(size * frac), hard))
            try:
                with pytest.raises(SLMError, match=r"could not write checkpoint .*final\.pt: File "
                                   r"too large; the previous checkpoints are intact"):
                    ckpt.save(state, path)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            assert _sha(path) == before and _tmp_files(path.parent) == []
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)


def test_disk_full_while_preparing_data_is_one_line(corpus, tmp_path):
    args = ["prepare", *fast_args(corpus, **{"data.tokenizer": "bytes"})]
    p = _start(args, tmp_path, tmp_path / "log", preexec_fn=_file_limit(100_000))
    p.wait(timeout=600)
    out = (tmp_path / "log").read_text()
    assert p.returncode == 2 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1].startswith("error: File too large")
    assert not list(tmp_path.glob("datasets/*/manifest.json"))


# ----------------------------------------------------------------------------- NaN / Inf

# fp16 autocast on a CPU with the largest learning rate and no clipping overflows within a few
# steps: a real blow-up, made by configuration alone.
BLOW_UP = ["--training.dtype", "float16", "--training.learning_rate", "1.0",
           "--training.grad_clip", "0", "--training.warmup_steps", "0",
           "--training.checkpoint_every", "1", "--training.keep_last", "100",
           "--training.eval_every", "1000", "--training.log_every", "1"]


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path,
                                                                              capsys):
    args = [*TRAIN, "--data-root", tmp_path,
            *fast_args(corpus, **{"training.threads": 1, "training.max_steps": 40}), *BLOW_UP]
    rc, out, err = _cli(capsys, *args)
    assert rc == 2, out + err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert line.startswith("error: loss or gradients became NaN/Inf at step")
    bad = int(line.split("at step ")[1].split(";")[0])
    run = tmp_path / "checkpoints" / "tiny"
    assert str(run) in line and "skip_nonfinite" in line  # where the good checkpoint is; a fix
    assert 1 < bad < 40
    assert [n for n, _ in ckpt.step_files(run)][-1] == bad - 1  # nothing saved at or after it
    assert not (run / "final.pt").exists()
    last = ckpt.load(run / f"step_{bad - 1}.pt")
    assert all(torch.isfinite(v).all() for v in last["model_state_dict"].values())

    # skip_nonfinite: the same run skips the bad updates, counts them, keeps checkpointing
    (run / f"step_{bad - 1}.pt").rename(tmp_path / "good.pt")
    for _, p in ckpt.step_files(run):
        p.unlink()
    rc, out, err = _cli(capsys, *args, "--resume", tmp_path / "good.pt", "--training.max_steps",
                        bad + 3, "--training.skip_nonfinite", "true")
    assert rc == 0, out + err
    assert f"non-finite loss/gradients at step {bad}; update skipped (1 so far)" in out
    n_skipped = out.count("update skipped")
    final = ckpt.load(run / "final.pt")
    assert final["step"] == bad + 3 and final["skipped_nonfinite"] == n_skipped >= 1
    # a skipped update leaves the weights as they were, and the step is still checkpointed
    at_bad = ckpt.load(run / f"step_{bad}.pt")
    assert _same_tensors(at_bad["model_state_dict"], last["model_state_dict"])
    assert [n for n, _ in ckpt.step_files(run)] == [bad, bad + 1, bad + 2]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_nonfinite"] for r in rows if "skipped_nonfinite" in r]
    assert counts == list(range(1, n_skipped + 1))

    # and a run that never recovers stops instead of finishing on garbage
    rc, out, err = _cli(capsys, *args, "--resume", tmp_path / "good.pt", "--training.max_steps",
                        bad + 30, "--training.skip_nonfinite", "true")
    assert rc == 2 and "NaN/Inf 10 steps in a row" in err, out + err


# ----------------------------------------------------------------------------- two runs at once


def test_second_run_with_the_same_name_and_folder_refuses(corpus, tmp_path, capsys):
    flags = fast_args(corpus, **{"training.threads": 1, "training.max_steps": 100000,
                                 "training.checkpoint_every": 100000})
    run, log = tmp_path / "checkpoints" / "tiny", tmp_path / "log"
    p = _start([*TRAIN, *flags], tmp_path, log)
    try:
        assert _wait_for(lambda: len(_metric_steps(run)) >= 1, p), log.read_text()
        for extra in ([], ["--resume", "never"]):
            # (a short budget, so that a second run that wrongly goes ahead ends quickly)
            rc, out, err = _cli(capsys, *TRAIN, "--data-root", tmp_path, *flags, *extra,
                                "--training.max_steps", "2")
            assert rc == 2, out + err
            assert f"run 'tiny' is already being trained (pid {p.pid}" in err
            assert "--name" in err  # the fix
            assert p.poll() is None and run.is_dir()  # the first run is untouched
        assert not list(tmp_path.glob("checkpoints/tiny.old-*"))  # never moved from under it
    finally:
        _kill(p, signal.SIGTERM)
    assert p.returncode == 128 + signal.SIGTERM, log.read_text()
