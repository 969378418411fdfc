"""Optimizers and the learning-rate schedule.

AdamW with two groups: matrices (weights of linear layers and embeddings) decay, vectors (biases,
norm gains) do not; `training.embedding_lr` gives the token embedding a third group with its own
learning rate and no decay. The schedule is a function of run progress p in [0, 1], which is the largest
of step/max_steps, tokens/max_tokens and seconds/max_seconds, so it ends exactly at whichever
budget is set: warmup over `warmup_steps`, then cosine, linear or warmup-stable-decay to
min_lr_ratio * peak.
"""

from __future__ import annotations

import inspect
import math

import torch

from src.training.groups import embedding_group, is_token_embedding


def param_groups(model: torch.nn.Module, t) -> list[dict]:
    decay, no_decay, emb = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if t.embedding_lr is not None and is_token_embedding(name):
            emb.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ] + embedding_group(emb, t)


def build_optimizer(model: torch.nn.Module, t, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or Muon for hidden matrices plus AdamW for the rest."""
    if t.optimizer == "muon":
        from src.training.muon import MuonWithAdamW

        return MuonWithAdamW(model, t)
    groups, kw = param_groups(model, t), {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=1e-8, **kw)


def lr_factor(t, step: int, progress: float, since: dict | None = None) -> float:
    """Multiplier of the peak learning rate at this step and progress.

    since: set when a resumed run changed its budget (training.budget_change):
    {"step", "progress", "factor", "mode"} at the change; the schedule then goes on from there.
    """
    if since:
        return _after_change(t, step, progress, since)
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    return warm * _decay(t, progress)


def _decay(t, progress: float) -> float:
    p = min(max(progress, 0.0), 1.0)
    lo = t.min_lr_ratio
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "linear":
        return 1.0 - (1.0 - lo) * p
    if t.schedule == "wsd":
        start = 1.0 - t.decay_frac
        return 1.0 if p <= start else 1.0 - (1.0 - lo) * (p - start) / t.decay_frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def _after_change(t, step: int, progress: float, since: dict) -> float:
    p0, f0, lo = since["progress"], since["factor"], t.min_lr_ratio
    q = (progress - p0) / max(1.0 - p0, 1e-9)  # progress through what the change added
    shape = _decay(t, q)
    if since["mode"] == "rewarm":
        n = step - since["step"]
        warm = min(1.0, (n + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        return f0 + (shape - f0) * warm
    # continue: from the rate reached down to the end value, in the schedule's own shape
    return f0 if lo >= 1.0 else lo + (f0 - lo) * max(shape - lo, 0.0) / (1.0 - lo)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor
