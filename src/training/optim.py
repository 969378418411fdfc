"""Optimizers and the learning-rate schedule.

AdamW with two groups: matrices (weights of linear layers and embeddings) decay, vectors (biases,
norm gains) do not. The schedule is a function of run progress p in [0, 1], which is the largest
of step/max_steps, tokens/max_tokens and seconds/max_seconds, so it ends exactly at whichever
budget is set: warmup over `warmup_steps`, then cosine, linear or warmup-stable-decay to
min_lr_ratio * peak.
"""

from __future__ import annotations

import inspect
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, t, device_type: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or Muon for hidden matrices plus AdamW for the rest."""
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "muon":
        from src.training.muon import MuonWithAdamW

        return MuonWithAdamW(model, t)
    kw = {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=1e-8, **kw)


def lr_factor(t, step: int, progress: float) -> float:
    """Multiplier of the peak learning rate at this step and progress."""
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    lo = t.min_lr_ratio
    if t.schedule == "constant":
        decay = 1.0
    elif t.schedule == "linear":
        decay = 1.0 - (1.0 - lo) * p
    elif t.schedule == "wsd":
        start = 1.0 - t.decay_frac
        decay = 1.0 if p <= start else 1.0 - (1.0 - lo) * (p - start) / t.decay_frac
    else:
        decay = lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    return warm * decay


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * factor
