"""What a run costs on Modal, before it starts: GPU-hours and dollars from FLOPs.

    slm cost --config configs/gpt_350m.yaml
    slm cost --config configs/gpt_124m.yaml --gpu H100:8 --training.max_steps 20000
    slm cost --config configs/gpt_124m.yaml --metrics data/checkpoints/gpt_124m/metrics.jsonl

    hours   = FLOPs per token x tokens / (GPU peak FLOP/s x MFU x GPUs)
    dollars = hours x (price per GPU-hour x GPUs + reserved CPU cores and memory) x nodes

FLOPs per token come from the model (6N + attention), tokens from the config's budget, the peak
and the price from the GPU table in src/hardware.py (Modal's list prices). MFU (model FLOPs utilisation) is ASSUMED_MFU unless --mfu gives one or
--metrics points at a run's metrics.jsonl with measured MFU. Container start-up and data
preparation are not included.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from src.errors import SLMError
from src.hardware import gpu_spec, parse_gpu, reservation, reservation_per_hour
from src.paths import RunLayout
from src.training.metrics import read_metrics

ASSUMED_MFU = 0.35  # a well-tuned GPT on one modern GPU reaches 35-50%; small models and T4s less


def gpu_price(kind: str) -> float:
    """USD per GPU-hour of one GPU of this kind ('H100', 'A100-80GB', ...)."""
    return gpu_spec(kind).price


def gpu_count(gpu: str, nodes: int = 1) -> tuple[str, int]:
    """'H100:8' with 2 nodes -> ('H100', 16): the GPU kind and how many are billed."""
    try:
        kind, n = parse_gpu(gpu)
    except ValueError as e:
        raise SLMError(f"--gpu: {e}") from None
    return kind, n * nodes


def container_reservation(gpu: str, cpu: float | None = None, memory_mib: int | None = None
                          ) -> tuple[float, int]:
    """(cores, MiB) one container on `gpu` reserves: the given figures, else the GPU table's."""
    try:
        return reservation(gpu, cpu, memory_mib)
    except ValueError as e:
        raise SLMError(f"--gpu: {e}") from None


def cost_per_hour(gpu: str, nodes: int = 1, cpu: float | None = None,
                  memory_mib: int | None = None, nonpreemptible: bool = False) -> float:
    """USD per hour of a run on `gpu` ('H100:8') across `nodes` containers: the GPUs plus each
    container's reserved CPU cores and memory (default: the GPU table's per-GPU reservation)."""
    kind, n = gpu_count(gpu, nodes)
    cores, mib = container_reservation(gpu, cpu, memory_mib)
    return gpu_price(kind) * n + reservation_per_hour(cores, mib, nonpreemptible) * nodes


def modal_cost_per_hour(m) -> float:
    """USD per hour of a run with the config's `modal:` section `m` (GPUs, CPU, memory, nodes)."""
    return cost_per_hour(m.gpu, m.nodes, m.cpu, m.memory)


@dataclass
class Estimate:
    gpu: str
    gpus: int
    price_per_gpu_hour: float
    flops_per_token: float
    tokens: int
    flops: float
    peak_tflops: float
    mfu: float
    mfu_source: str
    hours: float
    cost_usd: float
    attempts: int
    cpu: float = 0.0  # cores reserved per container
    memory_mib: int = 0  # MiB reserved per container
    reservation_per_hour: float = 0.0  # USD per hour for the CPU and memory of all containers
    note: str | None = None  # model.init_from's source not here: the config's shape is priced

    @property
    def cost_per_hour(self) -> float:
        return self.price_per_gpu_hour * self.gpus + self.reservation_per_hour


def measured_mfu(metrics_path: str | Path) -> float:
    """Median MFU of the second half of a run's logged steps (past compile and warm-up)."""
    p = Path(metrics_path)
    if p.is_dir():
        p = RunLayout.of_run_dir(p).metrics
    if not p.is_file():
        raise SLMError(f"--metrics {metrics_path}: no such metrics.jsonl")
    vals = [float(v) for r in read_metrics(p)
            if isinstance(v := r.get("mfu"), (int, float)) and v > 0]
    if not vals:
        raise SLMError(f"{p} has no MFU figures (runs on a CPU do not measure it); use --mfu")
    return statistics.median(vals[len(vals) // 2:])


def _flops_per_token(cfg) -> float:
    mcfg = cfg.model.model_copy(update={"vocab_size": cfg.model_vocab})  # char: 256 until known
    return _model_flops(mcfg.model_dump_json(), cfg.seq_len)


@functools.lru_cache(maxsize=256)
def _model_flops(model_json: str, seq_len: int) -> float:
    import torch

    from src.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig.model_validate_json(model_json)).flops_per_token(seq_len)


def estimate(cfg, gpu: str | None = None, mfu: float | None = None,
             mfu_source: str | None = None, root=None) -> Estimate:
    """Expected hours and dollars of cfg on Modal (gpu defaults to cfg.modal.gpu). With
    model.init_from, of the shape its source gives (a run name is looked up under root)."""
    from src.paths import data_root
    from src.training.init_from import with_source_shape

    cfg, note = with_source_shape(cfg, data_root(root))
    gpu = gpu or cfg.modal.gpu
    kind, n = gpu_count(gpu, cfg.modal.nodes)
    t = cfg.training
    per_step = cfg.tokens_per_step(n)
    tokens = per_step * t.max_steps
    if t.max_tokens:
        tokens = min(tokens, math.ceil(t.max_tokens / per_step) * per_step)
    fpt = _flops_per_token(cfg)
    steps = tokens // per_step
    evals = steps // t.eval_every + 1
    flops = fpt * tokens + evals * t.eval_tokens * fpt / 3  # evaluation: forward passes only
    peak = gpu_spec(kind).tflops
    if mfu is None:
        mfu, mfu_source = ASSUMED_MFU, "assumed"
    if not 0 < mfu <= 1:
        raise SLMError(f"--mfu {mfu}: give the utilisation as a fraction, e.g. 0.4")
    hours = flops / (peak * 1e12 * mfu * n) / 3600
    if t.max_seconds:
        hours = min(hours, t.max_seconds / 3600)
    price = gpu_price(kind)
    m = cfg.modal
    # an explicit reservation in the config applies to the config's GPU; another --gpu gets its own
    same = gpu == m.gpu
    cores, mib = container_reservation(gpu, m.cpu if same else None, m.memory if same else None)
    extra = reservation_per_hour(cores, mib) * m.nodes
    return Estimate(
        gpu=gpu, gpus=n, price_per_gpu_hour=price, flops_per_token=fpt, tokens=tokens,
        flops=flops, peak_tflops=peak, mfu=mfu, mfu_source=mfu_source or "given",
        hours=hours, cost_usd=hours * (price * n + extra),
        attempts=max(1, math.ceil(hours * 3600 / m.timeout)),
        cpu=cores, memory_mib=mib, reservation_per_hour=extra, note=note,
    )


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def estimate_text(cfg, gpu: str | None = None, mfu: float | None = None,
                  mfu_source: str | None = None, root=None) -> str:
    e = estimate(cfg, gpu, mfu, mfu_source, root)
    m = cfg.modal
    nodes = f" x {m.nodes} nodes" if m.nodes > 1 else ""
    lines = [
        "cost on Modal (estimate):",
        f"  GPU:             {e.gpu}{nodes} at ${e.price_per_gpu_hour:.2f}/GPU-hour = "
        f"${e.price_per_gpu_hour * e.gpus:.2f}/hour",
        f"  CPU and memory:  {e.cpu:g} cores + {e.memory_mib / 1024:g} GiB reserved per container "
        f"= ${e.reservation_per_hour:.2f}/hour (total ${e.cost_per_hour:.2f}/hour)",
        f"  work:            {e.flops:.2e} FLOPs ({e.tokens:,} tokens x "
        f"{e.flops_per_token:.2e} FLOPs/token, with evaluation)",
        f"  speed:           {100 * e.mfu:.0f}% MFU ({e.mfu_source}) of {e.peak_tflops:.0f} "
        f"TFLOP/s per GPU",
        f"  time:            {_hours(e.hours)} ({e.hours * e.gpus:.1f} GPU-hours)",
        f"  cost:            ${e.cost_usd:,.2f} (plus container start-up and data preparation)",
    ]
    if e.note:
        lines.append(f"  note:            {e.note}")
    if e.attempts > 1:
        fits = e.attempts <= m.retries + 1
        lines.append(
            f"  attempts:        {e.attempts} of modal.timeout {_hours(m.timeout / 3600)}; "
            + ("each continues from the last checkpoint" if fits else
               f"more than modal.retries+1 = {m.retries + 1}: re-run the command when it stops, "
               "and it continues")
        )
    if m.max_cost_usd is not None and e.cost_usd > m.max_cost_usd:
        share = 100 * m.max_cost_usd / e.cost_usd
        lines.append(f"  budget:          stops at modal.max_cost_usd ${m.max_cost_usd:,.2f}, "
                     f"about {share:.0f}% of the way")
    return "\n".join(lines)
