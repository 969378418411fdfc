"""Weights & Biases sink: the same rows as metrics.jsonl, samples as a table, models as artifacts.

Modes (wandb.mode, or $WANDB_MODE which wins): online, offline (a run folder inside the run's
own folder; `wandb sync` uploads it later), disabled. Online without an API key is refused
before training starts. Any W&B error during the run becomes a warning (see metrics.Metrics).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from src.errors import SLMError


def new_run_id() -> str:
    return secrets.token_hex(4)


def resolve_mode(cfg) -> str:
    return os.environ.get("WANDB_MODE") or cfg.wandb.mode


def check_online_ready(cfg) -> None:
    """Fail fast, before any training, when online logging cannot work."""
    if resolve_mode(cfg) != "online":
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        import wandb

        if wandb.api.api_key:
            return
    except Exception:
        pass
    raise SLMError(
        "W&B logging is online but no API key was found: run `wandb login` (or set "
        "WANDB_API_KEY; on Modal, `modal secret create wandb WANDB_API_KEY=...`), or log "
        "offline with --wandb.mode offline, or turn it off with --no-wandb"
    )


class WandbSink:
    def __init__(self, cfg, run_dir: Path, run_id: str | None, resumed: bool, log=print):
        import wandb

        self.wandb, self._log = wandb, log
        self.mode = resolve_mode(cfg)
        check_online_ready(cfg)
        self.run_id = run_id or new_run_id()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.name,
            group=cfg.wandb.group,
            tags=cfg.wandb.tags or None,
            config=cfg.to_dict(),
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            mode=self.mode,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
        self.cfg = cfg

    def log(self, row: dict) -> None:
        step = row["step"]
        data = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if row.get("samples"):
            table = self.wandb.Table(columns=["step", "prompt", "text"])
            for s in row["samples"]:
                table.add_data(step, s["prompt"], s["text"])
            data["samples"] = table
        if data:
            self.run.log(data, step=step)

    def on_final(self, final_path: Path, model_path: Path, last_val: dict) -> None:
        if self.cfg.wandb.log_model and self.mode != "disabled":
            art = self.wandb.Artifact(f"{self.cfg.name}-model", type="model", metadata=last_val)
            art.add_file(str(model_path))
            self.run.log_artifact(art, aliases=["final", "latest"])
        for k, v in last_val.items():
            self.run.summary[k] = v

    def close(self) -> None:
        run_path = Path(self.run.dir).parent if self.run else None
        self.run.finish()
        if self.mode == "offline" and run_path:
            self._log(f"W&B run saved offline; upload it with:\n  wandb sync {run_path}")
