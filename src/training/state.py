"""What a checkpoint carries besides the components' own state dicts.

A checkpoint is one dict: the model's, optimizer's, scaler's and loader's state dicts, the RNG
states, the resolved config and tokenizer, and the loop's own counters: `TrainState`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from src.checkpoint import FORMAT


@dataclass
class TrainState:
    """The loop's counters: everything else in a checkpoint belongs to a component."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds so far, over all attempts
    wandb_run_id: str | None = None
    best_val_loss: float | None = None
    skipped_nonfinite: int = 0  # updates skipped for NaN/Inf (training.skip_nonfinite)
    schedule_from: dict | None = None  # where a budget change resumed the schedule (optim)

    def to_checkpoint(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, d: dict) -> TrainState:
        """Read the counters of any checkpoint slm wrote (older ones lack some keys)."""
        return cls(step=int(d["step"]), tokens=int(d["tokens"]),
                   elapsed=float(d.get("elapsed") or 0.0), wandb_run_id=d.get("wandb_run_id"),
                   best_val_loss=d.get("best_val_loss"),
                   skipped_nonfinite=int(d.get("skipped_nonfinite") or 0),
                   schedule_from=d.get("schedule_from"))


def rng_state(device: torch.device) -> dict:
    s = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def checkpoint_dict(state: TrainState, *, model: dict, optimizer: dict, scaler: dict | None,
                    loader: dict, rng: dict, config: dict, tok, world: int, parallelism: str,
                    tokens_per_step: int, final: bool) -> dict:
    """The resumable checkpoint: components' state dicts plus the loop's counters."""
    return {"format": FORMAT, "model_state_dict": model, "optimizer_state_dict": optimizer,
            "scaler": scaler, **state.to_checkpoint(), "loader": loader, "rng": rng,
            "config": config, "tokenizer": tok.to_dict(), "tokenizer_id": tok.id,
            "world_size": world, "parallelism": parallelism, "tokens_per_step": tokens_per_step,
            "final": final}
