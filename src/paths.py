"""Where things live under a data root: the same tree locally (./data) and on Modal (/data).

    datasets/<source>-<tokenizer>-<key>/   token shards, tokenizer files, manifest.json
    checkpoints/<name>/                    step_N.pt, final.pt, metrics.jsonl, config.yaml, ...
                                           result.json (how it ended)
    sweeps/<group>.json                    a sweep's points
    models/<name>_final.pt                 the trained weights, config and tokenizer

`RunLayout(root, name)` is the one place these paths are built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_ROOT = "data"
VOLUME_NAME = "slm-data"  # the Modal volume mounted at /data (modal_app.py keeps the same name)
LOCK_DICT = "slm-locks"  # the modal.Dict of cross-container locks (modal_app.py's too)


def data_root(arg: str | Path | None = None) -> Path:
    """--data-root, else $SLM_DATA_ROOT, else ./data: a folder (or a new path) on real storage."""
    from src.validate import is_system, writable_folder

    root = Path(arg or os.environ.get("SLM_DATA_ROOT") or DEFAULT_DATA_ROOT)
    if root.is_dir() and not is_system(root):
        return root
    return writable_folder(root, "--data-root")


@dataclass(frozen=True)
class RunLayout:
    root: Path
    name: str
    folder: Path | None = None  # a run folder that lives elsewhere than <root>/checkpoints/<name>

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_run_dir(cls, run_dir: str | Path) -> RunLayout:
        """The layout of an existing run folder <root>/checkpoints/<name>."""
        p = Path(run_dir)
        return cls(p.parent.parent, p.name, p)

    @property
    def run_dir(self) -> Path:
        return Path(self.folder) if self.folder else self.root / "checkpoints" / self.name

    def step(self, step: int) -> Path:
        return self.run_dir / f"step_{step}.pt"

    @property
    def final(self) -> Path:
        return self.run_dir / "final.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def best_record(self) -> Path:
        return self.run_dir / "best.json"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.run_dir / "tokenizer.json"

    @property
    def lock(self) -> Path:
        return self.run_dir / ".lock"

    @property
    def result(self) -> Path:
        """How the run ended ({name, step, val_loss, ...} or {name, error}), written last."""
        return self.run_dir / "result.json"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def model_final(self) -> Path:
        return self.models_dir / f"{self.name}_final.pt"

    @property
    def model_best(self) -> Path:
        return self.models_dir / f"{self.name}_best.pt"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"


def write_json(path: str | Path, obj) -> Path:
    """Write JSON to a temporary name, then rename: readers see the old file or the new one."""
    import json

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def sweep_record(root: str | Path, group: str) -> Path:
    """sweeps/<group>.json: a sweep's points (names and values), written before they start."""
    return Path(root) / "sweeps" / f"{group}.json"
