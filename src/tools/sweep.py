"""Sweeps: a grid of config overrides expanded into named runs, and the table of their results.

    modal run modal_app.py::sweep --config configs/gpt_124m.yaml \\
        --grid "training.learning_rate=1e-4,3e-4,1e-3 training.weight_decay=0,0.1"

The grid is `key=v1,v2,...` items separated by spaces (or ';'); its points are the cartesian
product of the values. Each point is its own run, named after the base run and the values it
sets (`gpt_124m-lr1e-4-wd0`), so its checkpoints, model and W&B run never collide with another
point's; re-running the same sweep resumes each point.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from src.errors import SLMError

# Short labels for keys that sweeps often vary; other keys use their last part.
SHORT = {
    "learning_rate": "lr",
    "weight_decay": "wd",
    "batch_size": "bs",
    "batch_tokens": "bt",
    "gradient_accumulation_steps": "accum",
    "warmup_steps": "warmup",
    "max_steps": "steps",
    "n_layer": "L",
    "n_head": "H",
    "n_embd": "C",
    "dropout": "drop",
    "muon_lr": "mlr",
    "vocab_size": "vocab",
}


@dataclass
class Point:
    name: str
    values: dict[str, str]  # the grid's key=value pairs of this point

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


def parse_grid(text: str) -> dict[str, list[str]]:
    """'training.learning_rate=1e-4,3e-4 model.n_layer=6,12' -> {key: [values]}."""
    grid: dict[str, list[str]] = {}
    for item in re.split(r"[;\s]+", (text or "").strip()):
        if not item:
            continue
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or "." not in key or not vals:
            raise SLMError(
                f"--grid item '{item}' must look like section.key=value1,value2 "
                '(e.g. --grid "training.learning_rate=1e-4,3e-4,1e-3")'
            )
        if key in grid:
            raise SLMError(f"--grid names {key} twice; give all its values in one item")
        if len(set(vals)) != len(vals):
            raise SLMError(f"--grid {key}: a value is repeated ({','.join(vals)})")
        grid[key] = vals
    if not grid:
        raise SLMError('--grid is empty; e.g. --grid "training.learning_rate=1e-4,3e-4,1e-3"')
    return grid


def label(key: str, value: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return SHORT.get(last, last) + value


def expand(base_name: str, grid: dict[str, list[str]]) -> list[Point]:
    """Every combination of the grid's values, each with its own run name."""
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        name = "-".join([base_name, *(label(k, v) for k, v in values.items())])
        points.append(Point(re.sub(r"[^A-Za-z0-9._-]+", "_", name), values))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SLMError(f"--grid: two points would share a run name ({', '.join(names)}); "
                       "use values that differ in letters or digits")
    return points


def check_group(group: str) -> str:
    """A sweep's name (its W&B group) names a file: letters, digits, '.', '_' and '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}", group or ""):
        raise SLMError(f"sweep name {group!r}: use letters, digits, '.', '_' and '-' (at most "
                       "120; it names the file sweeps/<name>.json)")
    return group


def write_record(root, group: str, base: str, points: list[Point]) -> Path:
    """sweeps/<group>.json on the data root: the points, before any of them starts, so the table
    can be built from the volume whatever happens to the process that launched them."""
    from src.paths import sweep_record, write_json

    path = sweep_record(root, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, {"group": group, "base": base,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "points": [{"name": p.name, "values": p.values} for p in points]})


def format_table(rows: list[dict]) -> str:
    """rows: {name, values, val_loss, val_bpb, step, state, error}; best validation loss first."""

    def key(r):
        v = r.get("val_loss")
        return (v is None or not math.isfinite(v), v if v is not None else 0.0)

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    notes = any(r.get("error") for r in rows)
    states = any(r.get("state") for r in rows)
    head = ["run", "overrides", "val loss", "val bpb", "step"] + (["state"] if states else []) \
        + (["error"] if notes else [])
    body = []
    for r in sorted(rows, key=key):
        body.append([
            r["name"],
            " ".join(f"{k}={v}" for k, v in r.get("values", {}).items()),
            num(r.get("val_loss"), ".4f"),
            num(r.get("val_bpb"), ".4f"),
            num(r.get("step"), "d"),
        ] + ([r.get("state") or "-"] if states else [])
            + ([(r.get("error") or "")[:80]] if notes else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(x.rstrip() for x in lines)
