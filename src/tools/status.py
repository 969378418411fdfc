"""`slm status [RUN]`: where a run stands, from its folder alone (no W&B, no process to ask).

Reads the run's metrics.jsonl (the one reader, `read_metrics`), its checkpoints and model files
(through `RunLayout`) and its lock: a run whose lock is held is training now; a run with
`final.pt` finished; any other stopped (and `slm train` with the same name continues it).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
from pathlib import Path

from src.checkpoint import step_files
from src.errors import SLMError
from src.paths import RunLayout
from src.training.metrics import read_metrics


def known_runs(root: Path) -> list[str]:
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_training(run: RunLayout) -> bool:
    """True when a process holds the run's lock (probed without taking it for long)."""
    if not run.lock.is_file():
        return False
    with open(run.lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: cannot tell
            return False
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
    return False


def run_state(run: RunLayout) -> dict:
    """The figures `slm status` shows for one run."""
    rows = read_metrics(run.metrics) if run.metrics.is_file() else []
    train = [r for r in rows if isinstance(r.get("train/loss"), (int, float))]
    val = [r for r in rows if isinstance(r.get("val/loss"), (int, float))
           and math.isfinite(r["val/loss"])]
    steps = step_files(run.run_dir)
    best = min(val, key=lambda r: r["val/loss"]) if val else None
    state = ("training" if is_training(run) else "finished" if run.final.is_file()
             else "stopped")
    return {
        "name": run.name, "state": state,
        "step": max((r["step"] for r in rows), default=0),
        "tokens": max((r.get("tokens") or 0 for r in rows), default=0),
        "train_loss": train[-1]["train/loss"] if train else None,
        "val": val[-1] if val else None, "best": best,
        "eta_seconds": train[-1].get("eta_seconds") if train and state == "training" else None,
        "newest": run.final if run.final.is_file() else (steps[-1][1] if steps else None),
        "models": [p for p in (run.model_final, run.model_best) if p.is_file()],
    }


def _val(r: dict | None) -> str:
    if not r:
        return "-"
    bpb = f", {r['val/bpb']:.3f} bits/byte" if isinstance(r.get("val/bpb"), float) else ""
    return f"{r['val/loss']:.4f}{bpb} (step {r['step']})"


def describe(s: dict) -> str:
    lines = [f"run {s['name']}: {s['state']} at step {s['step']:,} ({s['tokens']:,} tokens)"]
    if s["train_loss"] is not None:
        lines.append(f"  train loss       {s['train_loss']:.4f}")
    lines.append(f"  val loss (last)  {_val(s['val'])}")
    lines.append(f"  val loss (best)  {_val(s['best'])}")
    if s["eta_seconds"] is not None:
        lines.append(f"  ETA              {s['eta_seconds'] / 60:.1f} min")
    lines.append(f"  newest checkpoint {s['newest'] or '- (none yet)'}")
    for p in s["models"]:
        lines.append(f"  model file       {p}")
    if s["state"] == "stopped":
        lines.append(f"  continue it with: slm train --name {s['name']} (same config)")
    return "\n".join(lines)


def status(root: Path, name: str | None = None) -> str:
    """The text of `slm status`: one run in detail, or a line per run."""
    runs = known_runs(root)
    if name is None:
        if not runs:
            return f"no runs under {Path(root) / 'checkpoints'}"
        out = []
        for n in runs:
            s = run_state(RunLayout(root, n))
            out.append(f"{n:<24} {s['state']:<9} step {s['step']:>8,}  val {_val(s['best'])}")
        return "\n".join(out)
    if name not in runs:
        known = ", ".join(runs) if runs else "none yet"
        raise SLMError(f"run {name!r}: no folder {Path(root) / 'checkpoints' / name} (runs here: "
                       f"{known}); check the name, or pass --data-root where the run lives")
    return describe(run_state(RunLayout(root, name)))
