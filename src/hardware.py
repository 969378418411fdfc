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
    price: float  # USD per GPU-hour on Modal (list price)
    max_count: int = 8  # GPUs Modal gives one container


GPUS = {g.name: g for g in (
    GPU("T4", 65.0, 16, 0.59),
    GPU("L4", 121.0, 24, 0.80),
    GPU("A10", 125.0, 24, 1.10, max_count=4),
    GPU("L40S", 362.0, 48, 1.95),
    GPU("A100-40GB", 312.0, 40, 2.10),
    GPU("A100-80GB", 312.0, 80, 2.50),
    GPU("H100", 989.0, 80, 3.95),  # SXM; the PCIe card is 756
    GPU("H200", 989.0, 141, 4.54),
    GPU("B200", 2250.0, 180, 6.25),
)}
ALIASES = {"A10G": "A10", "A100": "A100-40GB"}  # other names Modal accepts for the same cards
_GPU_RE = re.compile(r"^(?P<type>[A-Za-z0-9-]+?)(?::(?P<count>\d+))?$")


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
        if key in up or key.split("-")[0] in up:
            return gpu_spec(key).tflops
    return None


def peak_flops(device: torch.device) -> float | None:
    """FLOP/s one device can do at best, or None where unknown (CPUs: see bench/)."""
    if device.type == "cuda":
        tf = gpu_peak_tflops(torch.cuda.get_device_name(device))
        return tf * 1e12 if tf else None
    return None


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0+ (Ampere). torch.cuda.is_bf16_supported()
    also counts emulation (a T4 says yes), which would train slowly and without tensor cores."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


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
