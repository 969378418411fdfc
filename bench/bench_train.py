"""Training throughput of a config on this machine: tokens/s, model FLOP/s, and their share of the
machine's measured matmul FLOP/s (and, on GPUs with a known datasheet, MFU).

    python bench/bench_train.py --config configs/tiny.yaml [--steps 20] [--device cpu] [--model.n_layer 6 ...]
    python bench/bench_train.py --config configs/tiny.yaml --plain     # also a plain PyTorch GPT

Random tokens stand in for data (throughput does not depend on them); the model, optimizer,
precision and compile settings are the ones training uses.

The denominator is measured, not assumed: square matmuls of several sizes in the training
precision, each timed --peak-reps times, the fastest kept. A share above 100% means the peak was
measured while something else ran (or the FLOP count is wrong): it is flagged as a measurement
error, not printed as a result. --plain runs the same shape through a nanoGPT-style model written
below (nn.Linear, nn.LayerNorm/RMSNorm, scaled_dot_product_attention, nothing else) with the same
optimizer, alternating the two models' timed rounds, and prints slm's speed over plain's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import header  # noqa: E402

from src import hardware as hw  # noqa: E402
from src.cli import split_overrides  # noqa: E402
from src.hardware import peak_flops, resolve_device  # noqa: E402
from src.model.gpt import GPT  # noqa: E402
from src.training.config import load_config  # noqa: E402
from src.training.optim import build_optimizer  # noqa: E402

CPU_SIZES = (256, 512, 1024, 2048)
GPU_SIZES = (1024, 2048, 4096, 8192)


# ----------------------------------------------------------------------------- the denominator


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int = 5,
                sizes: tuple[int, ...] | None = None) -> tuple[float, dict[int, float]]:
    """(best FLOP/s, best per size) of n x n matmuls in dtype: each size timed reps times over
    a loop of about 0.1 s, the maximum kept. Noise only slows a timing down, so the maximum over
    sizes and repeats is the closest to what the machine can do."""
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    sync, best = _sync(device), {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        loops = max(1, min(1000, int(0.1 / max(time.perf_counter() - t, 1e-6))))
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(loops):
                a @ b
            sync()
            best[n] = max(best.get(n, 0.0), 2 * n**3 * loops / (time.perf_counter() - t))
    return max(best.values()), best


# ----------------------------------------------------------------------------- a plain GPT


class PlainAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(c.head_dim, 1e-6), nn.RMSNorm(c.head_dim, 1e-6)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.c.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # rotary positions: rotate (first half, second half) pairs
            q, k = (torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1)
                    for t1, t2 in (q.chunk(2, dim=-1), k.chunk(2, dim=-1)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class PlainMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kind, h = c.mlp, c.mlp_hidden
        self.c_fc = nn.Linear(c.n_embd, 2 * h if c.mlp == "swiglu" else h, bias=c.bias)
        self.c_proj = nn.Linear(h, c.n_embd, bias=c.bias)

    def forward(self, x):
        x = self.c_fc(x)
        if self.kind == "swiglu":
            a, b = x.chunk(2, dim=-1)
            return self.c_proj(F.silu(a) * b)
        return self.c_proj(F.relu(x).square() if self.kind == "relu2" else F.gelu(x, approximate="tanh"))


def _norm(c):
    return nn.RMSNorm(c.n_embd, 1e-6) if c.norm == "rmsnorm" else nn.LayerNorm(c.n_embd, bias=c.bias)


class PlainBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = _norm(c), PlainAttention(c), _norm(c), PlainMLP(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """nanoGPT's model, with slm's shape options written the obvious way; parameter names as
    slm's, so the same optimizer (Muon included) treats both alike."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.padded_vocab, c.n_embd),
            h=nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer)),
            ln_f=_norm(c)))
        if c.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(c.block_size, c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        T = idx.size(1)
        x, cos, sin = self.transformer.wte(idx), None, None
        if self.c.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        else:
            d = self.c.head_dim
            inv = 1.0 / self.c.rope_theta ** (torch.arange(0, d, 2, device=idx.device) / d)
            freqs = torch.outer(torch.arange(T, device=idx.device).float(), inv)
            cos, sin = freqs.cos(), freqs.sin()
        for block in self.transformer.h:
            x = block(x, cos, sin)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


# ----------------------------------------------------------------------------- timing


def trainer_step(model, cfg, dev, x):
    """One optimizer step as training does it (gradient accumulation, autocast, scaler)."""
    t = cfg.training
    opt = build_optimizer(model, t, dev.type)
    amp = hw.amp_dtype(dev, t.dtype)
    autocast = hw.autocast(dev, amp)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp == torch.float16 else None
    fwd = torch.compile(model) if t.compile and dev.type == "cuda" else model
    A = cfg.grad_accum()

    def step():
        for _ in range(A):
            with autocast():
                _, loss = fwd(x[:, :-1], x[:, 1:])
            (scaler.scale(loss / A) if scaler else loss / A).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(steps: dict, n: int, rounds: int, warmup: int, dev) -> dict[str, float]:
    """Seconds per step of each named step function: rounds of n steps, the models taking
    turns, the fastest round of each kept (a busy machine only ever slows a round down)."""
    sync = _sync(dev)
    for step in steps.values():
        for _ in range(warmup):
            step()
    best = dict.fromkeys(steps, math.inf)
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def _share(achieved: float, ceiling: float) -> str:
    share = 100 * achieved / ceiling
    if share > 100:
        return (f"MEASUREMENT ERROR ({share:.0f}% of {ceiling / 1e12:.3f}: the peak was measured "
                "while the machine was busy; run again)")
    return f"{share:.1f}% of {ceiling / 1e12:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (the fastest counts)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-reps", type=int, default=5, help="timings of each matmul size")
    ap.add_argument("--plain", action="store_true",
                    help="also time a plain nanoGPT-style model of the same shape; print the ratio")
    args, extra = ap.parse_known_args()
    cfg = load_config(args.config, split_overrides(extra))
    dev = resolve_device(args.device)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 256
    t = cfg.training
    if t.threads and dev.type == "cpu":
        torch.set_num_threads(t.threads)
    torch.manual_seed(0)
    B, T, A = t.batch_size, cfg.seq_len, cfg.grad_accum()
    x = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=dev)
    models = {"slm": GPT(cfg.model).to(dev)}
    if args.plain:
        models["plain"] = PlainGPT(cfg.model).to(dev)
    secs = time_steps({k: trainer_step(m, cfg, dev, x) for k, m in models.items()},
                      args.steps, args.rounds, args.warmup, dev)
    dtype = hw.amp_dtype(dev, t.dtype) or torch.float32
    measured, per_size = matmul_peak(dev, dtype, args.peak_reps)
    sheet = peak_flops(dev)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    fpt = models["slm"].flops_per_token(T)

    print(header())
    print(f"matmul peak ({str(dtype).removeprefix('torch.')}, best of {args.peak_reps} at each "
          "size): " + ", ".join(f"{n}: {f / 1e12:.3f}" for n, f in per_size.items())
          + f" TFLOP/s; kept {measured / 1e12:.3f}")
    print(f"| model | config | device | params | tokens/step | ms/step | tokens/s | model TFLOP/s "
          f"| share of measured matmul peak |{' MFU (datasheet) |' if sheet else ''} peak mem GB |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if sheet else ""))
    for name, m in models.items():
        tps = B * T * A / secs[name]
        achieved = tps * fpt
        print(f"| {name} | {args.config} | {dev} ({torch.get_num_threads()} threads) | "
              f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M | {B * T * A:,} | "
              f"{secs[name] * 1e3:.1f} | {tps:,.0f} | {achieved / 1e12:.4f} | "
              f"{_share(achieved, measured)} |{f' {_share(achieved, sheet)} |' if sheet else ''} "
              f"{'-' if mem is None else f'{mem:.2f}'} |")
    print(f"(fastest of {args.rounds} rounds of {args.steps} steps"
          + (", the models taking turns)" if args.plain else ")"))
    if args.plain:
        print(f"slm / plain tokens/s: {secs['plain'] / secs['slm']:.3f} "
              "(above 1: slm's step is faster than the plain model's)")


if __name__ == "__main__":
    main()
