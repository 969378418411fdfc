"""Training throughput of a config on this machine: tokens/s, model FLOP/s, and their share of the
machine's measured matmul FLOP/s (CPU) or of the GPU's datasheet peak (MFU).

    python bench/bench_train.py --config configs/tiny.yaml [--steps 20] [--device cpu] [--model.n_layer 6 ...]

Random tokens stand in for data (throughput does not depend on them); the model, optimizer,
precision and compile settings are the ones training uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from src import hardware as hw  # noqa: E402
from src.cli import split_overrides  # noqa: E402
from src.hardware import peak_flops, resolve_device  # noqa: E402
from src.model.gpt import GPT  # noqa: E402
from src.training.config import load_config  # noqa: E402
from src.training.optim import build_optimizer  # noqa: E402


def matmul_flops(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 (CPU) or bf16 (GPU) matmul FLOP/s: the practical ceiling for this machine."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args, extra = ap.parse_known_args()
    cfg = load_config(args.config, split_overrides(extra))
    dev = resolve_device(args.device)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 256
    t = cfg.training
    torch.manual_seed(0)
    model = GPT(cfg.model).to(dev)
    opt = build_optimizer(model, t, dev.type)
    amp = hw.amp_dtype(dev, t.dtype)
    autocast = hw.autocast(dev, amp)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp == torch.float16 else None
    fwd = torch.compile(model) if t.compile and dev.type == "cuda" else model
    B, T, A = t.batch_size, cfg.seq_len, cfg.grad_accum()
    x = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

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

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = B * T * A / dt
    fpt = model.flops_per_token(T)
    achieved = tps * fpt
    peak = peak_flops(dev)
    ceiling = peak or matmul_flops(dev)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    print(f"| config | device | params | tokens/step | ms/step | tokens/s | model TFLOP/s | "
          f"{'MFU' if peak else 'share of matmul peak'} | peak mem GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {dev} ({torch.get_num_threads()} threads) | "
          f"{model.num_params() / 1e6:.2f}M | {B * T * A:,} | {dt * 1e3:.1f} | {tps:,.0f} | "
          f"{achieved / 1e12:.4f} | {100 * achieved / ceiling:.1f}% of {ceiling / 1e12:.3f} | "
          f"{'-' if mem is None else f'{mem:.2f}'} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
