"""One command to run once on a CUDA GPU: does each GPU path of slm work, and how fast is it?

    python bench/gpu_check.py                 # all checks on cuda:0
    python bench/gpu_check.py --skip smoke    # leave out a check (repeatable)

Prints one table row per check: the bf16 path, the fp16 path with its grad scaler, which SDPA
kernel runs (flash, memory-efficient, cuDNN or math), gpt_124m at T=1024 with torch.compile off
and on (tokens/s and MFU against the GPU table's peak), KV-cache generation speed, a 50-step run
stopped with SIGTERM and resumed (compared with an uninterrupted one), FSDP over the GPUs (2+),
and `--smoke` on every shipped config. On a machine without CUDA it says so and exits 0.

The checks are plain functions of a device, so the tests run them on a CPU with small models.
Put the table in docs/benchmarks.md with the GPU's name.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from src import hardware as hw  # noqa: E402
from src.model.gpt import GPT, GPTConfig  # noqa: E402

Row = tuple[str, str, str]  # (check, result, detail)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_speed(dev: torch.device, mcfg: GPTConfig, batch: int, seq: int, dtype,
                steps: int = 10, compile_: bool = False) -> dict:
    """Tokens/s, MFU (None where the peak is unknown) and the last loss of AdamW steps on
    random tokens, under autocast(dtype) (fp16: with a grad scaler)."""
    torch.manual_seed(0)
    model = GPT(mcfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    ctx = hw.autocast(dev, dtype)
    x = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), device=dev)
    loss = None
    for i in range(steps + 2):  # two warm-up steps (compilation, allocator) are not timed
        if i == 2:
            _sync(dev)
            t0 = time.perf_counter()
        with ctx():
            _, loss = fwd(x[:, :-1], x[:, 1:])
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    tps = steps * batch * seq / (time.perf_counter() - t0)
    peak = hw.peak_flops(dev)
    return {"tokens_per_sec": tps, "loss": loss.item(),
            "mfu": tps * model.flops_per_token(seq) / peak if peak else None,
            "peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def sdpa_kernels(dev: torch.device, dtype=torch.bfloat16, seq: int = 256) -> dict[str, bool]:
    """Which scaled_dot_product_attention kernels accept slm's causal attention shape here;
    PyTorch picks the first that works in the order flash, efficient, cudnn, math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q = torch.randn(2, 12, seq, 64, device=dev, dtype=dtype)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                scaled_dot_product_attention(q, q, q, is_causal=True)
            out[name.lower()] = True
        except (RuntimeError, AttributeError):
            out[name.lower()] = False
    return out


def generation_speed(dev: torch.device, mcfg: GPTConfig, new_tokens: int = 64) -> float:
    """New tokens/s of KV-cache generation from a one-token prompt (batch 1)."""
    torch.manual_seed(0)
    model = GPT(mcfg).to(dev).eval()
    idx = torch.zeros((1, 1), dtype=torch.long, device=dev)
    model.generate(idx, 4, temperature=1.0, top_k=None)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    model.generate(idx, new_tokens, temperature=1.0, top_k=None)
    _sync(dev)
    return new_tokens / (time.perf_counter() - t0)


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_local.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_and_resume(device: str, steps: int = 50, work: Path | None = None) -> Row:
    """A `steps`-step tiny.yaml run stopped by SIGTERM after its step-20 checkpoint and re-run,
    against an uninterrupted run: the largest weight difference (0 = exact)."""
    from src import checkpoint as ckpt
    from src.paths import RunLayout

    work = Path(work or tempfile.mkdtemp(prefix="gpu_check_"))
    args = ["--config", "configs/tiny.yaml", "--no-wandb", "--device", device,
            "--training.max_steps", str(steps), "--training.max_seconds", "null",
            "--training.checkpoint_every", "10", "--training.eval_every", "1000"]
    for root in ("ref", "ref2"):  # two uninterrupted runs: the kernels' own nondeterminism
        assert _cli([*args, "--data-root", str(work / root)]).wait() == 0, root
    lay = RunLayout(work / "run", "tiny")
    p = _cli([*args, "--data-root", str(work / "run")])
    while not lay.step(20).exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    code = p.wait()
    assert _cli([*args, "--data-root", str(work / "run")]).wait() == 0
    sds = [ckpt.load(RunLayout(work / r, "tiny").final)["model_state_dict"]
           for r in ("ref", "ref2", "run")]
    rerun = max(float((sds[0][k].float() - sds[1][k].float()).abs().max()) for k in sds[0])
    resumed = max(float((sds[0][k].float() - sds[2][k].float()).abs().max()) for k in sds[0])
    return ("stop + resume", "exact" if resumed == 0 else f"max |dw| {resumed:.2e}",
            f"{steps} steps, SIGTERM after step 20 (exit {code}); two uninterrupted runs "
            f"differ by {rerun:.2e} (the kernels' own nondeterminism)")


def fsdp_check(gpus: int, work: Path) -> Row:
    """tiny.yaml for a few steps under torchrun with training.parallelism fsdp."""
    if gpus < 2:
        return ("FSDP", "skipped", "needs 2+ GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", str(ROOT / "train_local.py"), "--config",
           "configs/tiny.yaml", "--no-wandb", "--data-root", str(work / "fsdp"),
           "--training.parallelism", "fsdp", "--training.max_steps", "20",
           "--training.max_seconds", "null"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return ("FSDP", "ok" if p.returncode == 0 else f"FAILED ({p.returncode})",
            f"{gpus} GPUs, tiny.yaml 20 steps" + ("" if p.returncode == 0 else
                                                 ": " + p.stdout[-300:].replace("\n", " ")))


def smoke_all(device: str, work: Path) -> list[Row]:
    """--smoke on every shipped config (a failure is a row, not a crash)."""
    rows = []
    for c in sorted((ROOT / "configs").glob("*.yaml")):
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "train_local.py"), "--config", str(c),
                            "--smoke", "--no-wandb", "--device", device, "--data-root",
                            str(work / "smoke")], cwd=ROOT, capture_output=True, text=True)
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        rows.append((f"--smoke {c.stem}", "ok" if p.returncode == 0 else "FAILED",
                     f"{time.time() - t0:.0f} s; {tail[0][:120]}"))
    return rows


def gpt_124m(vocab: int = 50304) -> GPTConfig:
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=vocab)


def _fmt(r: dict) -> str:
    mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
    mem = f", peak {r['peak_gb']:.1f} GB" if r["peak_gb"] else ""
    return f"{r['tokens_per_sec']:,.0f} tok/s{mfu}{mem}, loss {r['loss']:.3f}"


def checks(dev: torch.device, skip: set[str], work: Path) -> list[Row]:
    """Every check on one CUDA device, in the order of the printed table."""
    rows: list[Row] = []
    small = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50304)
    bf16 = hw.native_bf16(dev)
    if "precision" not in skip:
        for dt in ((torch.bfloat16,) if bf16 else ()) + (torch.float16,):
            r = train_speed(dev, small, 8, 256, dt)
            rows.append((f"{str(dt)[6:]} autocast", "ok" if r["loss"] == r["loss"] else "NaN",
                         _fmt(r) + (" (GradScaler)" if dt == torch.float16 else "")))
        if not bf16:
            rows.append(("bfloat16 autocast", "no", "no native bf16 (compute capability < 8.0)"))
    dtype = torch.bfloat16 if bf16 else torch.float16
    if "sdpa" not in skip:
        k = sdpa_kernels(dev, dtype)
        first = next((n for n, ok in k.items() if ok), "none")
        rows.append(("SDPA kernel", first, ", ".join(f"{n} {'yes' if ok else 'no'}"
                                                      for n, ok in k.items())))
    if "mfu" not in skip:
        for comp in (False, True):
            r = train_speed(dev, gpt_124m(), 16, 1024, dtype, steps=20, compile_=comp)
            rows.append((f"gpt_124m T=1024 compile {'on' if comp else 'off'}", "ok", _fmt(r)))
    if "generate" not in skip:
        rows.append(("KV-cache generation", f"{generation_speed(dev, gpt_124m()):,.0f} tok/s",
                     "gpt_124m, batch 1, fp32"))
    if "resume" not in skip:
        rows.append(stop_and_resume(dev.type, work=work / "resume"))
    if "fsdp" not in skip:
        rows.append(fsdp_check(torch.cuda.device_count(), work))
    if "smoke" not in skip:
        rows += smoke_all(dev.type, work)
    return rows


def table(rows: list[Row]) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'check':<{w}} | result | detail |", f"|{'-' * (w + 2)}|---|---|"]
    return "\n".join([*lines, *(f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", action="append", default=[],
                    choices=["precision", "sdpa", "mfu", "generate", "resume", "fsdp", "smoke"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: bench/gpu_check.py checks GPU paths only; run it "
              "on a machine with an NVIDIA GPU (nothing was checked)")
        return 0
    from common import header

    dev = torch.device("cuda")
    print(header())
    print(f"GPU: {torch.cuda.get_device_name(dev)} (peak {hw.peak_flops(dev) or 0:.3g} FLOP/s "
          "from the GPU table)")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        print(table(checks(dev, set(args.skip), Path(work))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
