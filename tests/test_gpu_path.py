"""GPU-path arithmetic that must hold before the first paid run (checked here without a GPU)."""

from __future__ import annotations

import pytest

from src import hardware as hw


def test_mfu_counts_every_gpus_peak():
    """8 GPUs each at a real 40%: the run's MFU is 40%, not 320%."""
    peak = 989e12  # one H100's dense bf16 FLOP/s
    flops_per_token = 6 * 124e6
    tps = 8 * 0.4 * peak / flops_per_token  # every rank's tokens
    assert hw.mfu(tps, flops_per_token, peak, 8) == pytest.approx(0.4)
    assert hw.mfu(tps / 8, flops_per_token, peak, 1) == pytest.approx(0.4)
    assert hw.mfu(tps, flops_per_token, None, 8) is None  # unknown peak (CPUs): no figure



@pytest.mark.parametrize("cap,want", [((7, 5), "float16"), ((8, 0), "bfloat16"),
                                      ((9, 0), "bfloat16")], ids=["T4", "A100", "H100"])
def test_auto_precision_follows_the_gpus_real_capability(monkeypatch, cap, want):
    # torch.cuda.is_bf16_supported() says yes on a T4 (emulation): the choice must not use it
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert hw.amp_dtype(cuda, "auto") == getattr(torch, want)
    assert hw.native_bf16(cuda) == (want == "bfloat16")
    assert hw.amp_dtype(torch.device("cpu"), "auto") is None  # CPUs train in float32
    assert hw.amp_dtype(cuda, "float32") is None


def test_muon_orthogonalises_in_float32_without_native_bf16(monkeypatch):
    import torch

    from src.training import muon

    seen = []
    monkeypatch.setattr(muon, "native_bf16", lambda device: seen.append(device) or False)
    g = torch.randn(8, 4)
    out = muon.orthogonalize(g)
    assert seen and out.dtype == torch.float32
    s = torch.linalg.svdvals(out)  # Newton-Schulz pushes the singular values towards 1
    assert float(s.min()) > 0.5 and float(s.max()) < 1.5


def test_explicit_bf16_on_a_gpu_that_emulates_it_is_warned_about():
    text = hw.emulated_bf16_warning("Tesla T4", (7, 5), "bfloat16")
    assert "Tesla T4" in text and "7.5" in text and "float16" in text and "auto" in text
    assert hw.emulated_bf16_warning("NVIDIA A100-SXM4-80GB", (8, 0), "bfloat16") is None
    assert hw.emulated_bf16_warning("Tesla T4", (7, 5), "auto") is None  # auto picks float16
