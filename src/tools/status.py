"""`slm status [RUN]`: where a run stands, from its folder alone (no W&B, no process to ask).

    slm status                         every run under ./data/checkpoints
    slm status gpt_124m --modal        a run on the Modal volume slm-data (read through its API)
    slm status --sweep lr-wd [--modal] a sweep's table, built from its points' folders

Reads the run's metrics.jsonl (the one parser, `parse_metrics`), its checkpoints, model files and
result.json (through `RunLayout`) and its lock: a run whose lock is held is training now; a run
with `final.pt` finished; any other stopped (and `slm train` with the same name continues it).
The same code reads a local folder (`LocalTree`) and the Modal volume (`VolumeTree`, with the
`modal.Dict` lease for the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
from pathlib import Path, PurePosixPath

from src.errors import SLMError
from src.paths import RunLayout, sweep_record
from src.training.metrics import parse_metrics

_STEP = re.compile(r"^step_(\d+)\.pt$")


# ----------------------------------------------------------------------------- where to read


class LocalTree:
    """A data root on this machine."""

    where = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def names(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def dirs(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def holds_lock(self, run: RunLayout) -> bool:
        """True when a process holds the run's flock (probed without taking it for long)."""
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


class VolumeTree:
    """A Modal volume read from anywhere through its API (`listdir`, `read_file`), with the run
    locks' `modal.Dict` (`get`, `contains`); paths are the data root's, as mounted at /data."""

    def __init__(self, volume, locks=None, where: str = " on the Modal volume"):
        self.volume, self.locks, self.where = volume, locks, where
        self.root = PurePosixPath("/")

    @staticmethod
    def _rel(path) -> str:
        return str(PurePosixPath(path)).lstrip("/") or "/"

    def read(self, path) -> bytes | None:
        try:
            return b"".join(self.volume.read_file(self._rel(path)))
        except FileNotFoundError:
            return None

    def _entries(self, folder) -> list:
        try:
            return list(self.volume.listdir(self._rel(folder)))
        except Exception as e:  # a missing folder: FileNotFoundError or modal's NotFoundError
            if isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError":
                return []
            raise

    def names(self, folder) -> list[str]:
        return sorted(PurePosixPath(e.path).name for e in self._entries(folder))

    def dirs(self, folder) -> list[str]:
        return sorted(PurePosixPath(e.path).name for e in self._entries(folder)
                      if getattr(e.type, "name", "") == "DIRECTORY")

    def holds_lock(self, run: RunLayout) -> bool:
        """True when a container holds the run's lease in the lock store."""
        if self.locks is None:
            return False
        from src.training.lock import LeaseLock

        return LeaseLock(self.locks, f"run/{run.name}", f"run '{run.name}'",
                         owner="slm status").holder() is not None


def volume_tree() -> VolumeTree:
    """The `slm-data` volume and the `slm-locks` Dict, through the Modal client (needs `modal
    setup`; nothing is created)."""
    import modal

    from src.paths import LOCK_DICT, VOLUME_NAME

    try:
        volume = modal.Volume.from_name(VOLUME_NAME)
        volume.listdir("/")
    except Exception as e:  # not logged in, no network, no such volume: one line, not a traceback
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SLMError(f"--modal: cannot read the volume {VOLUME_NAME} ({first}); run `modal "
                       "setup` and check `modal volume ls " + VOLUME_NAME + "`") from None
    try:
        locks = modal.Dict.from_name(LOCK_DICT)
        locks.contains("probe")
    except Exception:  # no lock store yet: no run has held a lock there
        locks = None
    return VolumeTree(volume, locks)


# ----------------------------------------------------------------------------- one run


def _json(tree, path) -> dict | None:
    data = tree.read(path)
    try:
        out = json.loads(data) if data else None
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def run_state(run: RunLayout, tree=None) -> dict:
    """The figures `slm status` shows for one run."""
    tree = tree or LocalTree(run.root)
    text = tree.read(run.metrics)
    rows = parse_metrics(text.decode("utf-8", "replace")) if text else []
    train = [r for r in rows if isinstance(r.get("train/loss"), (int, float))]
    val = [r for r in rows if isinstance(r.get("val/loss"), (int, float))
           and math.isfinite(r["val/loss"])]
    files = tree.names(run.run_dir)
    steps = sorted(int(m[1]) for n in files if (m := _STEP.match(n)))
    models = set(tree.names(run.models_dir))
    best = min(val, key=lambda r: r["val/loss"]) if val else None
    finished = run.final.name in files
    state = "training" if tree.holds_lock(run) else "finished" if finished else "stopped"
    result = _json(tree, run.result)
    if state == "stopped" and result and result.get("error"):
        state = "failed"
    last = train[-1] if train else {}
    return {
        "name": run.name, "state": state, "where": tree.where,
        "step": max((r["step"] for r in rows), default=0),
        "tokens": max((r.get("tokens") or 0 for r in rows), default=0),
        "train_loss": last.get("train/loss"), "val": val[-1] if val else None, "best": best,
        "tokens_per_s": last.get("tokens_per_sec"), "elapsed": last.get("time"),
        "cost": last.get("cost_usd"),
        "eta_seconds": last.get("eta_seconds") if state == "training" else None,
        "progress": last.get("progress"),
        "newest": run.final if finished else (run.step(steps[-1]) if steps else None),
        "models": [p for p in (run.model_final, run.model_best) if p.name in models],
        "error": (result or {}).get("error"),
    }


def _val(r: dict | None) -> str:
    if not r:
        return "-"
    bpb = f", {r['val/bpb']:.3f} bits/byte" if isinstance(r.get("val/bpb"), float) else ""
    return f"{r['val/loss']:.4f}{bpb} (step {r['step']})"


def describe(s: dict) -> str:
    lines = [f"run {s['name']}{s['where']}: {s['state']} at step {s['step']:,} "
             f"({s['tokens']:,} tokens)"]
    if s["train_loss"] is not None:
        lines.append(f"  train loss       {s['train_loss']:.4f}")
    lines.append(f"  val loss (last)  {_val(s['val'])}")
    lines.append(f"  val loss (best)  {_val(s['best'])}")
    if isinstance(s["tokens_per_s"], (int, float)):
        lines.append(f"  speed            {s['tokens_per_s']:,.0f} tokens/s")
    if isinstance(s["elapsed"], (int, float)):
        lines.append(f"  elapsed          {s['elapsed'] / 60:.1f} min")
    if isinstance(s["cost"], (int, float)):
        lines.append(f"  cost so far      ${s['cost']:,.2f}")
    if isinstance(s["progress"], (int, float)):
        lines.append(f"  budget used      {s['progress']:.0%}")
    if s["eta_seconds"] is not None:
        lines.append(f"  ETA              {s['eta_seconds'] / 60:.1f} min")
        if isinstance(s["cost"], (int, float)) and s["progress"]:
            lines.append(f"  cost projected   ${s['cost'] / s['progress']:,.2f}")
    lines.append(f"  newest checkpoint {s['newest'] or '- (none yet)'}")
    for p in s["models"]:
        lines.append(f"  model file       {p}")
    if s["error"]:
        lines.append(f"  error            {s['error']}")
    if s["state"] in ("stopped", "failed"):
        lines.append(f"  continue it with: slm train --name {s['name']} (same config)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sweeps


def sweep_rows(tree, group: str) -> list[dict]:
    """One row per point of a sweep (its record, then each point's folder and result.json)."""
    from src.tools.sweep import check_group

    rec = _json(tree, sweep_record(tree.root, check_group(group)))
    if rec is None:
        known = [n[:-5] for n in tree.names(Path(tree.root) / "sweeps") if n.endswith(".json")]
        raise SLMError(f"sweep {group!r}: no record sweeps/{group}.json{tree.where} (sweeps: "
                       f"{', '.join(known) or 'none yet'})")
    rows = []
    for p in rec.get("points", []):
        s = run_state(RunLayout(tree.root, p["name"]), tree)
        res = _json(tree, RunLayout(tree.root, p["name"]).result) or {}
        best = s["best"] or {}
        rows.append({"name": p["name"], "values": p.get("values", {}), "state": s["state"],
                     "val_loss": res.get("val_loss", best.get("val/loss")),
                     "val_bpb": res.get("val_bpb", best.get("val/bpb")),
                     "step": s["step"] or res.get("step"), "error": s["error"]})
    return rows


def sweep_status(tree, group: str) -> str:
    from src.tools.sweep import format_table

    rows = sweep_rows(tree, group)
    done = sum(r["state"] in ("finished", "failed") for r in rows)
    return f"sweep {group}{tree.where}: {done} of {len(rows)} points ended\n" + format_table(rows)


# ----------------------------------------------------------------------------- the command


def known_runs(tree) -> list[str]:
    return [n for n in tree.dirs(Path(tree.root) / "checkpoints") if not n.startswith(".")]


def status(root, name: str | None = None, tree=None) -> str:
    """The text of `slm status`: one run in detail, or a line per run."""
    tree = tree or LocalTree(root)
    runs = known_runs(tree)
    folder = Path(tree.root) / "checkpoints"
    if name is None:
        if not runs:
            return f"no runs under {folder}{tree.where}"
        out = []
        for n in runs:
            s = run_state(RunLayout(tree.root, n), tree)
            out.append(f"{n:<24} {s['state']:<9} step {s['step']:>8,}  val {_val(s['best'])}")
        return "\n".join(out)
    if name not in runs:
        known = ", ".join(runs) if runs else "none yet"
        raise SLMError(f"run {name!r}: no folder {folder / name}{tree.where} (runs here: "
                       f"{known}); check the name, or pass --data-root where the run lives")
    return describe(run_state(RunLayout(tree.root, name), tree))
