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

