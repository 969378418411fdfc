"""What every benchmark prints with its figures: the machine, the software and the command.

    from common import header
    print(header())        # machine: CPU model, cores, ISA; torch; command: python bench/...

A figure means little without the machine that produced it and a way to produce it again.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# instruction-set extensions that decide CPU matmul speed, as /proc/cpuinfo names them
ISA = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16",
       "avx512_vnni": "AVX-512-VNNI", "amx_tile": "AMX", "amx_bf16": "AMX-BF16",
       "asimd": "NEON", "sve": "SVE", "sve2": "SVE2"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip(), v.strip())
    return out


def cpu_model() -> str:
    info = _cpuinfo()
    return (info.get("model name") or info.get("Model") or platform.processor()
            or platform.machine() or "unknown CPU")


def isa() -> list[str]:
    """The matmul-relevant ISA extensions this CPU reports (in ISA's order)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [name for flag, name in ISA.items() if flag in flags]


def cores() -> tuple[int, int]:
    """(cores this process may use, cores the machine has)."""
    total = os.cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)), total
    except AttributeError:  # macOS
        return total, total


def torch_info() -> str:
    """torch's version (and, when torch is loaded, its threads and the CPU kernels it picked)."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "torch not installed"
    torch = sys.modules.get("torch")
    if torch is None:
        return f"torch {version}"
    extra = [f"{torch.get_num_threads()} threads"]
    cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if cap:
        extra.append(f"CPU kernels {cap()}")
    if torch.cuda.is_available():
        extra.append(f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    return f"torch {version} ({', '.join(extra)})"


def machine() -> str:
    usable, total = cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu_model()}, {usable} of {total} cores usable, ISA "
            f"{' '.join(isa()) or 'without AVX2/AVX-512/AMX/NEON'}; "
            f"load average {load:.1f}; {torch_info()}; Python {platform.python_version()}")


def command() -> str:
    """The command line that ran this script, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return "python " + shlex.join([str(script), *sys.argv[1:]])


def header() -> str:
    return f"{machine()}\ncommand: {command()}"
