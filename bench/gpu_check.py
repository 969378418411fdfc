"""One command to run once on a CUDA GPU: does each GPU path of slm work, and how fast is it?

    python bench/gpu_check.py                 # all checks on cuda:0
    python bench/gpu_check.py --skip smoke    # leave out a check (repeatable)
    python bench/gpu_check.py --batch 16,64 --out docs/gpu.md   # MFU at two batch sizes; save
    python bench/gpu_check.py --skip mfu --skip loop --configs chat_tiny   # a quick re-check

Prints one row per check as it finishes, then the table: the bf16 path, the fp16 path with its
grad scaler, which SDPA kernel runs (flash, memory-efficient, cuDNN or math), gpt_124m at T=1024
with torch.compile off and on (tokens/s and MFU against the GPU table's peak), where a compiled
step's GPU time goes (matmuls, attention, fused element-wise kernels, optimizer, idle), KV-cache
generation speed, slm's own training loop on gpt_124m (bf16, then fp16 with its scaler), a
50-step run stopped with SIGTERM and resumed (compared with an uninterrupted one), FSDP over the
GPUs (2+), and `--smoke` on every shipped config. On a machine without CUDA it says so and exits 0.

The checks are plain functions of a device, so the tests run them on a CPU with small models.
Put the table in docs/benchmarks.md with the GPU's name.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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


def _trainer(dev: torch.device, mcfg: GPTConfig, batch: int, seq: int, dtype, compile_: bool):
    """(model, step): step() runs one AdamW step on fixed random tokens under autocast(dtype)
    (fp16: with a grad scaler) and returns its loss."""
    torch.manual_seed(0)
    model = GPT(mcfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    ctx = hw.autocast(dev, dtype)
    x = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), device=dev)

    def step():
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
        return loss

    return model, step


def train_speed(dev: torch.device, mcfg: GPTConfig, batch: int, seq: int, dtype,
                steps: int = 10, compile_: bool = False) -> dict:
    """Tokens/s, MFU (None where the peak is unknown) and the last loss of AdamW steps on
    random tokens, under autocast(dtype) (fp16: with a grad scaler)."""
    model, step = _trainer(dev, mcfg, batch, seq, dtype, compile_)
    for _ in range(2):  # two warm-up steps (compilation, allocator) are not timed
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
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


def sdpa_in_use(dev: torch.device, dtype=torch.bfloat16, seq: int = 256) -> str:
    """The SDPA kernel PyTorch actually picks for slm's causal attention (forward and backward),
    read from the aten operator it dispatches to: cuDNN, flash, memory-efficient or math."""
    from torch.nn.functional import scaled_dot_product_attention
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(2, 12, seq, 64, device=dev, dtype=dtype, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scaled_dot_product_attention(q, q, q, is_causal=True).float().sum().backward()
        _sync(dev)
    ops = " ".join(e.key for e in prof.key_averages() if "scaled_dot_product" in e.key)
    for label, op in (("cuDNN", "cudnn_attention"), ("flash", "flash_attention"),
                      ("memory-efficient", "efficient_attention")):
        if op in ops:
            return label
    return "math"


def generation_speed(dev: torch.device, mcfg: GPTConfig, new_tokens: int = 64) -> float:
    """New tokens/s of KV-cache generation from a one-token prompt (batch 1)."""
    torch.manual_seed(0)
    model = GPT(mcfg).to(dev).eval()
    idx = torch.zeros((1, 1), dtype=torch.long, device=dev)
    for _ in model.generate(idx, 4, temperature=1.0):  # warm-up; generate yields each token
        pass
    _sync(dev)
    t0 = time.perf_counter()
    made = sum(1 for _ in model.generate(idx, new_tokens, temperature=1.0))
    _sync(dev)
    return made / (time.perf_counter() - t0)


# what a kernel (CUDA) or an operator (CPU) does, by its name; the first match wins
KINDS = (("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
         ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas|aten::(mm|addmm|bmm)\b",
                               re.I)),
         ("optimizer", re.compile(r"adam|multi_tensor|foreach|muon", re.I)),
         ("fused (triton)", re.compile(r"^triton_")))


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def where_time_goes(dev: torch.device, mcfg: GPTConfig, batch: int, seq: int, dtype,
                    steps: int = 5, compile_: bool = True) -> dict:
    """Profile `steps` training steps (after two warm-up steps): each kind's share of the
    device time, the idle share of the wall time, and the five longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    _, step = _trainer(dev, mcfg, batch, seq, dtype, compile_)
    for _ in range(2):
        step()
    _sync(dev)
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        wall_us = (time.perf_counter() - t0) * 1e6
    # kernels on CUDA (not the user annotations laid over them); operators on a CPU
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda
              and not getattr(e, "is_user_annotation", False) and "#" not in e.key
              and not e.key.startswith("ProfilerStep")]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {e.key: getattr(e, attr) for e in events if getattr(e, attr) > 0}
    busy = sum(times.values()) or 1.0
    share: dict[str, float] = {}
    for name, us in times.items():
        share[kind_of(name)] = share.get(kind_of(name), 0.0) + us / busy
    top = sorted(times.items(), key=lambda kv: -kv[1])[:5]
    return {"share": dict(sorted(share.items(), key=lambda kv: -kv[1])),
            "idle": max(0.0, 1 - busy / wall_us) if cuda else None,
            "step_ms": wall_us / steps / 1e3,
            "top": [(name[:60], us / busy) for name, us in top]}


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
            "--data-root", str(work), "--training.max_steps", str(steps),
            "--training.max_seconds", "null", "--training.checkpoint_every", "10",
            "--training.eval_every", "1000"]  # one data root: the data is prepared once
    for name in ("ref", "ref2"):  # two uninterrupted runs: the kernels' own nondeterminism
        assert _cli([*args, "--name", name]).wait() == 0, name
    lay = RunLayout(work, "run")
    p = _cli([*args, "--name", "run"])
    while not lay.step(20).exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    code = p.wait()
    assert _cli([*args, "--name", "run"]).wait() == 0
    sds = [ckpt.load(RunLayout(work, r).final)["model_state_dict"] for r in ("ref", "ref2", "run")]
    rerun = max(float((sds[0][k].float() - sds[1][k].float()).abs().max()) for k in sds[0])
    resumed = max(float((sds[0][k].float() - sds[2][k].float()).abs().max()) for k in sds[0])
    return ("stop + resume", "exact" if resumed == 0 else f"max |dw| {resumed:.2e}",
            f"{steps} steps, SIGTERM after step 20 (exit {code}); two uninterrupted runs "
            f"differ by {rerun:.2e} (the kernels' own nondeterminism)")


def train_loop(device: str, work: Path, dtype: str = "bfloat16", steps: int = 60,
               config: str = "configs/gpt_124m.yaml", extra: tuple[str, ...] = ()) -> Row:
    """slm's own trainer (train_local.py) on `config` for `steps` steps at its configured batch,
    on the embedded corpus with a byte tokenizer at GPT-2's padded vocabulary (no download):
    the tokens/s and MFU it logs once compiled, and whether the loss went down."""
    from src.paths import RunLayout
    from src.training.metrics import read_metrics

    name = f"loop-{Path(config).stem}-{dtype}"
    args = ["--config", config, "--no-wandb", "--device", device, "--data-root", str(work),
            "--name", name, "--data.source", "python-stdlib", "--data.tokenizer", "bytes",
            "--model.vocab_size", "50304", "--training.dtype", dtype,
            "--training.max_steps", str(steps), "--training.max_seconds", "null",
            "--training.warmup_steps", "10", "--training.eval_every", "100000",
            "--training.checkpoint_every", "100000", "--training.log_every", "10", *extra]
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "train_local.py"), *args], cwd=ROOT,
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
    label = f"training loop {Path(config).stem} {dtype}"
    if p.returncode != 0:
        return (label, f"FAILED ({p.returncode})", (p.stdout + p.stderr)[-400:].replace("\n", " "))
    rows = [r for r in read_metrics(RunLayout(work, name).metrics) if "train/loss" in r]
    facts = {k: v for r in read_metrics(RunLayout(work, name).metrics) for k, v in r.items()
             if k == "compiled"}
    last, first = rows[-1], rows[0]
    mfu = f", MFU {last['mfu']:.1%}" if last.get("mfu") else ""
    mem = f", peak {last['memory/peak_gb']:.1f} GB" if last.get("memory/peak_gb") else ""
    return (label, "ok" if last["train/loss"] < first["train/loss"] else "loss did not fall",
            f"{last['tokens_per_sec']:,.0f} tok/s over steps {rows[-2]['step'] + 1}-"
            f"{last['step']}{mfu}{mem}; loss {first['train/loss']:.2f} -> "
            f"{last['train/loss']:.2f}; compiled {facts.get('compiled')}; "
            f"{time.time() - t0:.0f} s in all")


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


def smoke_one(device: str, work: Path, config: Path, timeout: float = 900) -> Row:
    """--smoke on one config; its run folder is deleted after (a 1B model's two checkpoints
    with AdamW state take ~40 GB of disk). A config whose model.init_from names the run of a
    shipped config (chat_tiny: tiny) starts from that config's smoke model, rehearsed first."""
    from src.training.config import load_config

    t0 = time.time()
    root = work / "smoke" / config.stem
    base = load_config(config).model.init_from
    smoke = [sys.executable, str(ROOT / "train_local.py"), "--smoke", "--no-wandb", "--device",
             device, "--data-root", str(root)]
    try:
        if base and (ROOT / "configs" / f"{base}.yaml").is_file():
            subprocess.run([*smoke, "--config", str(ROOT / "configs" / f"{base}.yaml")], cwd=ROOT,
                           capture_output=True, timeout=timeout)
            smoke += ["--model.init_from", str(root / "models" / f"{base}-smoke_final.pt")]
        p = subprocess.run([*smoke, "--config", str(config)], cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return (f"--smoke {config.stem}", "TIMEOUT", f"over {timeout:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = (p.stdout + p.stderr).strip().splitlines()
    said = [ln.strip() for ln in lines if re.match(r"\s*(smoke rehearsal|error)", ln)]
    return (f"--smoke {config.stem}", "ok" if p.returncode == 0 else "FAILED",
            f"{time.time() - t0:.0f} s; " + " / ".join((said or lines)[-2:])[:300])


def smoke_all(device: str, work: Path, jobs: int = 1,
              names: tuple[str, ...] = ()) -> Iterator[Row]:
    """--smoke on every shipped config (or those named), smallest model first, `jobs` at a time
    and the largest alone (a failure is a row, not a crash)."""
    from src.training.config import load_config

    def size(c: Path) -> int:
        m = load_config(c).model
        return m.n_layer * m.n_embd ** 2

    configs = sorted((c for c in (ROOT / "configs").glob("*.yaml")
                      if not names or c.stem in names), key=size)
    if not configs:
        return
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # the largest alone: its checkpoints' disk
        yield from pool.map(lambda c: smoke_one(device, work, c), configs[:-1])
    yield smoke_one(device, work, configs[-1])


def gpt_124m(vocab: int = 50304) -> GPTConfig:
    return GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=vocab)


def _fmt(r: dict) -> str:
    mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
    mem = f", peak {r['peak_gb']:.1f} GB" if r["peak_gb"] else ""
    return f"{r['tokens_per_sec']:,.0f} tok/s{mfu}{mem}, loss {r['loss']:.3f}"


def _fmt_profile(p: dict) -> str:
    idle = f"; GPU idle {p['idle']:.0%} of the wall time" if p["idle"] is not None else ""
    return (f"{p['step_ms']:.1f} ms/step; " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                        p["share"].items()) + idle +
            "; longest: " + ", ".join(f"{n} {v:.0%}" for n, v in p["top"][:3]))


def checks(dev: torch.device, skip: set[str], work: Path, batches: tuple[int, ...] = (16,),
           smoke_jobs: int = 1, smoke_configs: tuple[str, ...] = ()) -> Iterator[Row]:
    """Every check on one CUDA device, in the order of the printed table, each row as it is
    measured (a long check never hides the rows before it)."""
    small = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50304)
    bf16 = hw.native_bf16(dev)
    if "precision" not in skip:
        for dt in ((torch.bfloat16,) if bf16 else ()) + (torch.float16,):
            r = train_speed(dev, small, 8, 256, dt)
            yield (f"{str(dt)[6:]} autocast", "ok" if r["loss"] == r["loss"] else "NaN",
                   _fmt(r) + (" (GradScaler)" if dt == torch.float16 else ""))
        if not bf16:
            yield ("bfloat16 autocast", "no", "no native bf16 (compute capability < 8.0)")
    dtype = torch.bfloat16 if bf16 else torch.float16
    if "sdpa" not in skip:
        k = sdpa_kernels(dev, dtype)
        yield ("SDPA kernel", sdpa_in_use(dev, dtype), "the one torch picks; each alone: " +
               ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in k.items()))
    if "mfu" not in skip:
        for b, comp in [(batches[0], False), *((b, True) for b in batches)]:
            r = train_speed(dev, gpt_124m(), b, 1024, dtype, steps=20, compile_=comp)
            yield (f"gpt_124m {b}x1024 compile {'on' if comp else 'off'}", "ok", _fmt(r))
    if "profile" not in skip:
        yield (f"gpt_124m {batches[0]}x1024 GPU time", "profiled",
               _fmt_profile(where_time_goes(dev, gpt_124m(), batches[0], 1024, dtype)))
    if "generate" not in skip:
        yield ("KV-cache generation", f"{generation_speed(dev, gpt_124m()):,.0f} tok/s",
               "gpt_124m, batch 1, fp32")
    if "loop" not in skip:
        yield train_loop(dev.type, work / "loop", "bfloat16" if bf16 else "float16")
        yield train_loop(dev.type, work / "loop", "float16", steps=30)
    if "resume" not in skip:
        yield stop_and_resume(dev.type, work=work / "resume")
    if "fsdp" not in skip:
        yield fsdp_check(torch.cuda.device_count(), work)
    if "smoke" not in skip:
        yield from smoke_all(dev.type, work, smoke_jobs, smoke_configs)


def table(rows: list[Row]) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'check':<{w}} | result | detail |", f"|{'-' * (w + 2)}|---|---|"]
    return "\n".join([*lines, *(f"| {a:<{w}} | {b} | {c} |" for a, b, c in rows)])


def _batches(text: str) -> tuple[int, ...]:
    """'16,64' -> (16, 64): positive whole numbers, or argparse's error naming the value."""
    try:
        out = tuple(int(b) for b in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers, e.g. 16,64")
    return out


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", action="append", default=[],
                    choices=["precision", "sdpa", "mfu", "profile", "generate", "loop", "resume",
                             "fsdp", "smoke"])
    ap.add_argument("--batch", default="16", type=_batches,
                    help="gpt_124m batch sizes (at T=1024) to measure compiled, comma-separated; "
                         "the first is also measured eagerly and profiled (default 16)")
    ap.add_argument("--smoke-jobs", type=_count, default=1,
                    help="--smoke runs at a time (default 1; they share the GPU)")
    ap.add_argument("--configs", default="",
                    help="--smoke only these shipped configs, comma-separated (default: all)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    batches = args.batch
    names = tuple(n for n in args.configs.split(",") if n)
    unknown = [n for n in names if not (ROOT / "configs" / f"{n}.yaml").is_file()]
    if unknown:
        ap.error(f"--configs: no configs/{unknown[0]}.yaml; shipped: "
                 + ", ".join(sorted(c.stem for c in (ROOT / "configs").glob("*.yaml"))))
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: bench/gpu_check.py checks GPU paths only; run it "
              "on a machine with an NVIDIA GPU (nothing was checked)")
        return 0
    from common import header

    dev = torch.device("cuda")
    head = (f"{header()}\nGPU: {torch.cuda.get_device_name(dev)} (peak "
            f"{hw.peak_flops(dev) or 0:.3g} FLOP/s from the GPU table)")
    print(head, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for row in checks(dev, set(args.skip), Path(work), batches, args.smoke_jobs, names):
            rows.append(row)
            print(" | ".join(row), flush=True)
            if args.out:
                Path(args.out).write_text(f"{head}\n\n{table(rows)}\n", encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
