"""Generated tokens/s with and without the KV cache, for the tiny and gpt_124m shapes.

    python bench/bench_generate.py                                  # both shapes, 512 new tokens, CPU
    python bench/bench_generate.py --shapes gpt_124m --uncached-steps 0   # time every uncached step
    python bench/bench_generate.py --device cuda --batch 8

Random weights (speed does not depend on them), one prompt of --prompt-tokens tokens, greedy.
With the cache each new token costs one position; without it every step re-reads the whole
sequence, so its cost grows with the length. Timing all 512 uncached steps of the 124M model
takes many minutes on a CPU: by default the uncached rate of a large shape is measured on
--uncached-steps steps spread evenly over the run (each a real forward at that step's length;
the mean step time times the number of steps estimates the total) and marked "sampled".
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.model.gpt import GPT  # noqa: E402
from src.training.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(shape: str, args, device) -> dict:
    cfg = load_config(CONFIGS / f"{shape}.yaml").model
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    P = args.prompt_tokens
    N = min(args.new_tokens, cfg.block_size - P)  # tiny's window is 256: fewer new tokens fit
    idx = torch.randint(0, cfg.vocab_size, (args.batch, P), device=device)

    def gen(n, use_cache):
        for _ in model.generate(idx, n, temperature=0, use_cache=use_cache):
            pass

    gen(4, True)  # warm-up
    gen(2, False)
    t_cached = timed(lambda: gen(N, True), device)
    k = args.uncached_steps
    if k <= 0 or k >= N or model.num_params() < 50e6:
        t_plain, note = timed(lambda: gen(N, False), device), "measured"
    else:  # a real forward (plus the pick of the token) at k evenly spaced step lengths
        full = torch.randint(0, cfg.vocab_size, (args.batch, P + N), device=device)
        steps = [round(i * (N - 1) / (k - 1)) for i in range(k)]
        with torch.no_grad():
            times = [timed(lambda s=s: model(full[:, : P + s])[0][:, -1].argmax(-1), device)
                     for s in steps]
        t_plain, note = sum(times) / k * N, f"sampled {k} of {N} steps"
    rate = lambda t: args.batch * N / t  # noqa: E731
    return {"shape": shape, "params": model.num_params(), "new": N, "cached": rate(t_cached),
            "plain": rate(t_plain), "speedup": t_plain / t_cached, "note": note,
            "t_cached": t_cached, "t_plain": t_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,gpt_124m", help="config names under configs/")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--uncached-steps", type=int, default=8,
                    help="uncached steps timed for shapes over 50M params (0 = all of them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# {' '.join(['python', *sys.argv])}")
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; batch {args.batch}, prompt "
          f"{args.prompt_tokens} tokens, up to {args.new_tokens} new tokens (block_size allowing), "
          "greedy, random weights")
    print(f"{'shape':<10} {'params':>8} {'new':>5} {'cache tok/s':>12} {'no-cache tok/s':>15} "
          f"{'speedup':>8}  uncached timing")
    for shape in args.shapes.split(","):
        r = bench(shape.strip(), args, device)
        print(f"{r['shape']:<10} {r['params'] / 1e6:>7.1f}M {r['new']:>5} {r['cached']:>12.1f} "
              f"{r['plain']:>15.2f} {r['speedup']:>7.1f}x  {r['note']} "
              f"({r['t_cached']:.1f} s vs {r['t_plain']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
