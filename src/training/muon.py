"""Muon for the hidden weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al., 2024) replaces each matrix's momentum update by the nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations; it trains small transformers in markedly
fewer steps than AdamW. Embeddings, the output head and all vectors (biases, norm gains) stay on
AdamW. One optimizer object keeps checkpoints and the lr schedule the same as with plain AdamW:
the schedule scales every group's `initial_lr`.

    training: {optimizer: muon, muon_lr: 0.02, learning_rate: 3e-3}
"""

from __future__ import annotations

import torch

from src.hardware import native_bf16
from src.training.groups import embedding_group, is_token_embedding

# Quintic Newton-Schulz coefficients chosen to push singular values towards 1 quickly.
_NS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (the 'zeroth power' of g)."""
    # bf16 only where the GPU has it in hardware (sm80+): emulated on a T4, and slower on CPUs
    x = g.bfloat16() if native_bf16(g.device) else g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    a, b, c = _NS
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    # torch.optim.Optimizer wraps these in torch._disable_dynamo, whose first call imports
    # torch._dynamo (over a second of start-up on a CPU). This optimizer is never traced by
    # torch.compile, so it calls the plain methods.
    add_param_group = torch.optim.Optimizer.add_param_group.__wrapped__
    zero_grad = torch.optim.Optimizer.zero_grad.__wrapped__
    state_dict = torch.optim.Optimizer.state_dict.__wrapped__
    load_state_dict = torch.optim.Optimizer.load_state_dict.__wrapped__

    def __init__(self, model: torch.nn.Module, t):
        muon, chunks, adam_decay, adam_plain, emb = [], {}, [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 2 and ".h." in f".{name}" and "wte" not in name and "wpe" not in name:
                muon.append(p)
                chunks[p] = 3 if name.endswith("attn.c_attn.weight") else 1  # q, k, v apart
            elif t.embedding_lr is not None and is_token_embedding(name):
                emb.append(p)
            elif p.dim() >= 2:
                adam_decay.append(p)
            else:
                adam_plain.append(p)
        groups = [
            {
                "params": muon,
                "kind": "muon",
                "lr": t.muon_lr,
                "momentum": 0.95,
                "weight_decay": 0.0,
            },
            {
                "params": adam_decay,
                "kind": "adamw",
                "lr": t.learning_rate,
                "weight_decay": t.weight_decay,
            },
            {"params": adam_plain, "kind": "adamw", "lr": t.learning_rate, "weight_decay": 0.0},
        ] + [{**g, "kind": "adamw"} for g in embedding_group(emb, t)]
        super().__init__(
            [g for g in groups if g["params"]], {"betas": (t.beta1, t.beta2), "eps": 1e-8}
        )
        self._chunks = chunks

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group):
        lr, mom = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(mom).add_(p.grad)
            g = p.grad.add(buf, alpha=mom)  # Nesterov
            parts = g.chunk(self._chunks.get(p, 1), dim=0)
            upd = torch.cat([orthogonalize(x) for x in parts], dim=0)
            scale = max(1.0, parts[0].size(0) / parts[0].size(1)) ** 0.5
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(upd, alpha=-lr * scale)

    def _adamw(self, group):
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            n = st["step"].item()
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (st["exp_avg_sq"] / (1 - b2**n)).sqrt_().add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**n))
