"""The benchmarks measure what they say: the plain model is slm's shape, a share above 100% is
flagged, the machine and command are printed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_train  # noqa: E402
import common  # noqa: E402

from src.model.gpt import GPT, GPTConfig  # noqa: E402

SHAPES = {
    "gpt2": {},
    "modern": {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu",
               "bias": False},
    "relu2-untied": {"mlp": "relu2", "tie_embeddings": False},
}


@pytest.mark.parametrize("opts", SHAPES.values(), ids=SHAPES.keys())
def test_plain_model_is_slms_model_written_plainly(opts):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, **opts)
    torch.manual_seed(0)
    slm, plain = GPT(cfg), bench_train.PlainGPT(cfg)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in slm.state_dict().items()}
    plain.load_state_dict(slm.state_dict())
    idx = torch.randint(0, 100, (2, 16))
    logits, loss = slm(idx, idx)
    plain_logits, plain_loss = plain(idx, idx)
    torch.testing.assert_close(plain_logits, logits)
    torch.testing.assert_close(plain_loss, loss)


def test_a_share_above_the_measured_peak_is_flagged_not_reported():
    assert bench_train._share(0.5e12, 1e12) == "50.0% of 1.000"
    flagged = bench_train._share(1.4e12, 1e12)
    assert flagged.startswith("MEASUREMENT ERROR") and "140%" in flagged


def test_matmul_peak_is_the_best_over_sizes():
    best, per_size = bench_train.matmul_peak(torch.device("cpu"), torch.float32, reps=2,
                                             sizes=(32, 64))
    assert set(per_size) == {32, 64} and best == max(per_size.values()) > 0


def test_header_names_the_machine_the_software_and_the_command():
    text = common.header()
    assert text.startswith("machine: ") and "cores usable" in text and "torch " in text
    assert "\ncommand: python " in text
    if Path("/proc/cpuinfo").is_file() and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "AVX2" in common.isa()
