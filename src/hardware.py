"""Devices and their peak FLOP/s (for MFU)."""

from __future__ import annotations

import torch

from src.errors import SLMError

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (no sparsity).
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "T4": 65.0,
    "B200": 2250.0,
}


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
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SLMError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise SLMError(f"--device {name}: use auto, cpu, cuda or mps")
    return torch.device(name)


def gpu_peak_tflops(gpu_name: str) -> float | None:
    """Peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    up = gpu_name.upper()
    if "H100" in up and "PCIE" in up:
        return 756.0
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in up:
            return GPU_PEAK_TFLOPS[key]
    return None


def peak_flops(device: torch.device) -> float | None:
    """FLOP/s the device can do at best, or None where unknown (CPUs: see bench/)."""
    if device.type == "cuda":
        tf = gpu_peak_tflops(torch.cuda.get_device_name(device))
        return tf * 1e12 if tf else None
    return None
