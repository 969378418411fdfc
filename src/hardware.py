"""Devices: the GPU table (peak FLOP/s, memory, Modal price), device choice, mixed precision.

The GPU table is the one place these facts live: config validation, `slm cost`, the MFU shown
during training and `--dry-run` all read it.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass

import torch

from src.errors import SLMError


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # dense bf16/fp16 tensor-core peak per GPU, no sparsity (vendors' data sheets)
    memory_gb: float  # per GPU
    price: float  # USD per GPU-hour on Modal (list price; see docs/cost.md for sources and dates)
    max_count: int = 8  # GPUs Modal gives one container (Modal's GPU guide)
    cpu: float = 4.0  # default CPU cores reserved per GPU (billed: see CPU_CORE_HOUR)
    ram_gib: int = 16  # default GiB of memory reserved per GPU (billed: see MEMORY_GIB_HOUR)


# Modal bills every container's CPU and memory reservation (or use, if higher) on top of the GPU.
CPU_CORE_HOUR = 0.0000131 * 3600  # USD per physical core-hour ($0.0000131 / core / s)
MEMORY_GIB_HOUR = 0.00000222 * 3600  # USD per GiB-hour ($0.00000222 / GiB / s)
NONPREEMPTIBLE_FACTOR = 3.0  # CPU and memory of nonpreemptible (CPU-only) functions cost 3x

GPUS = {g.name: g for g in (
    GPU("T4", 65.0, 16, 0.59, cpu=4, ram_gib=16),
    GPU("L4", 121.0, 24, 0.80, cpu=4, ram_gib=16),
    GPU("A10", 125.0, 24, 1.10, max_count=4, cpu=4, ram_gib=16),
    GPU("L40S", 362.0, 48, 1.95, cpu=8, ram_gib=32),
    GPU("A100-40GB", 312.0, 40, 2.10, cpu=8, ram_gib=32),
    GPU("A100-80GB", 312.0, 80, 2.50, cpu=8, ram_gib=48),
    GPU("RTX-PRO-6000", 500.0, 96, 3.03, cpu=8, ram_gib=48),  # price: not confirmed, see cost.md
    GPU("H100", 989.0, 80, 3.95, cpu=8, ram_gib=48),  # SXM; the PCIe card is 756
    GPU("H200", 989.0, 141, 4.54, cpu=8, ram_gib=64),
    GPU("B200", 2250.0, 180, 6.25, cpu=8, ram_gib=64),
)}
# Other names Modal accepts: A10G (older name), A100 (40 or 80 GB; priced as 40), H100! (an H100,
# never upgraded to an H200), B200+ (a B200 or a B300, billed as a B200).
ALIASES = {"A10G": "A10", "A100": "A100-40GB", "H100!": "H100", "B200+": "B200"}
CLUSTER_GPUS = ("H100", "H200", "B200")  # multi-node clusters: all 8 GPUs of a host (Modal's docs)
_GPU_RE = re.compile(r"^(?P<type>[A-Za-z0-9-]+?[!+]?)(?::(?P<count>\d+))?$")


def gpu_spec(kind: str) -> GPU:
    """The table's row for a Modal GPU name ('H100', 'a100', 'A10G', ...)."""
    key = ALIASES.get(kind.upper(), kind.upper())
    if key not in GPUS:
        raise SLMError(f"unknown GPU '{kind}'; known: {', '.join(GPUS)}")
    return GPUS[key]


def parse_gpu(gpu: str) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8). Raises ValueError (config validation) for what Modal refuses."""
    m = _GPU_RE.match(gpu.strip())
    kind = m and m["type"].upper()
    names = (*GPUS, *ALIASES)
    if not m or kind not in names:
        near = difflib.get_close_matches(gpu.split(":")[0].upper(), names, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"unknown GPU '{gpu}'{hint}; use one of {', '.join(GPUS)}, with :N for "
                         "N GPUs")
    n = int(m["count"] or 1)
    cap = gpu_spec(kind).max_count
    if not 1 <= n <= cap:
        raise ValueError(f"GPU count {n} in '{gpu}': Modal gives 1 to {cap} {kind} GPUs per "
                         "container")
    return kind, n


def reservation(gpu: str, cpu: float | None = None, memory_mib: int | None = None
                ) -> tuple[float, int]:
    """(cores, MiB) a training container on `gpu` ('H100:8') reserves: given, else per GPU."""
    kind, n = parse_gpu(gpu)
    spec = gpu_spec(kind)
    return (cpu if cpu is not None else spec.cpu * n,
            memory_mib if memory_mib is not None else spec.ram_gib * 1024 * n)


def reservation_per_hour(cores: float, memory_mib: int, nonpreemptible: bool = False) -> float:
    """USD per hour for a container's reserved CPU cores and memory."""
    rate = cores * CPU_CORE_HOUR + memory_mib / 1024 * MEMORY_GIB_HOUR
    return rate * (NONPREEMPTIBLE_FACTOR if nonpreemptible else 1.0)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise SLMError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise SLMError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise SLMError(f"--device {name}: use auto, cpu, cuda or mps")
    return torch.device(name)


def gpu_peak_tflops(gpu_name: str) -> float | None:
    """Peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3' or a Modal name ('A100')."""
    up = gpu_name.upper()
    if "H100" in up and "PCIE" in up:
        return 756.0
    for key in sorted([*GPUS, *ALIASES], key=len, reverse=True):
        if key in up or key.replace("-", " ") in up or (
                not key.startswith("RTX") and key.split("-")[0] in up):
            return gpu_spec(key).tflops
    return None


def peak_flops(device: torch.device) -> float | None:
    """FLOP/s one device can do at best, or None where unknown (CPUs: see bench/)."""
    if device.type == "cuda":
        tf = gpu_peak_tflops(torch.cuda.get_device_name(device))
        return tf * 1e12 if tf else None
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float | None,
        devices: int) -> float | None:
    """Model FLOPs utilisation of a run: the FLOP/s of all its tokens (every rank's) over the
    peak of all its devices (one GPU's peak would show 8 GPUs at 40% as 320%)."""
    if not peak_per_device:
        return None
    return tokens_per_sec * flops_per_token / (peak_per_device * max(devices, 1))


BF16_CAPABILITY = (8, 0)  # CUDA compute capability with bf16 in hardware (Ampere and later)


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0+ (Ampere). torch.cuda.is_bf16_supported()
    also counts emulation (a T4 says yes), which would train slowly and without tensor cores."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_CAPABILITY


def emulated_bf16_warning(gpu_name: str, capability: tuple[int, int], dtype: str) -> str | None:
    """A warning when training.dtype asks for bfloat16 on a GPU that only emulates it."""
    if dtype != "bfloat16" or tuple(capability) >= BF16_CAPABILITY:
        return None
    return (f"warning: training.dtype bfloat16 on {gpu_name} (compute capability "
            f"{capability[0]}.{capability[1]}, bf16 needs 8.0) is emulated: no tensor cores, "
            "several times slower, and torch.compile refuses it. training.dtype: auto picks "
            "float16 with a gradient scaler on this GPU")


def amp_dtype(device: torch.device, name: str = "auto") -> torch.dtype | None:
    """The autocast dtype for training.dtype on this device; None means plain float32.

    auto: bf16 on GPUs with native bf16, fp16 (with a grad scaler) on older GPUs, fp32 on CPU/MPS.
    """
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return None if name == "float32" else getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context-manager factory: `with autocast(): ...` runs under mixed precision (or not)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
