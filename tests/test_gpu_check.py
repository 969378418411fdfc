"""bench/gpu_check.py: its checks run on a CPU with small models; without CUDA it exits cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402

from src.model.gpt import GPTConfig  # noqa: E402

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256)
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_speed_trains_under_autocast(dtype, one_thread):
    r = gpu_check.train_speed(CPU, SMALL, 2, 32, dtype, steps=2)
    assert r["tokens_per_sec"] > 0 and r["loss"] == r["loss"]  # finite, not NaN
    assert r["mfu"] is None  # no datasheet peak for a CPU


def test_sdpa_kernels_name_the_ones_that_run():
    k = gpu_check.sdpa_kernels(CPU, torch.float32, seq=32)
    assert list(k) == ["flash_attention", "efficient_attention", "cudnn_attention", "math"]
    assert k["math"] is True


def test_sdpa_in_use_names_the_kernel_torch_picks():
    assert gpu_check.sdpa_in_use(CPU, torch.float32, seq=32) == "flash"  # flash_attention_for_cpu
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        assert gpu_check.sdpa_in_use(CPU, torch.float32, seq=32) == "math"


def test_generation_speed_times_real_tokens(one_thread, monkeypatch):
    calls = []
    forward = gpu_check.GPT.forward
    monkeypatch.setattr(gpu_check.GPT, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    tps = gpu_check.generation_speed(CPU, SMALL, new_tokens=8)
    assert tps > 0 and len(calls) >= 8 + 4  # one forward per new token (and the warm-up's)
    text = gpu_check.table([("KV-cache generation", f"{tps:.0f} tok/s", "small")])
    assert text.splitlines()[0].startswith("| check") and "KV-cache generation" in text


def test_fsdp_needs_two_gpus(tmp_path):
    assert gpu_check.fsdp_check(1, tmp_path)[1] == "skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),  # a cutlass kernel, but attention
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused (triton)"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernels_are_sorted_by_what_they_do(name, kind):
    assert gpu_check.kind_of(name) == kind


def test_where_time_goes_adds_up(one_thread):
    p = gpu_check.where_time_goes(CPU, SMALL, 2, 32, None, steps=2, compile_=False)
    assert abs(sum(p["share"].values()) - 1) < 1e-6 and p["share"]["matmul"] > 0
    assert p["step_ms"] > 0 and len(p["top"]) == 5 and p["idle"] is None
    assert "matmul" in gpu_check._fmt_profile(p)


def test_smoke_of_named_configs_only(tmp_path):
    # chat_tiny starts from tiny's model: the check rehearses tiny first, in the same folder
    rows = list(gpu_check.smoke_all("cpu", tmp_path, names=("chat_tiny",)))
    assert [r[0] for r in rows] == ["--smoke chat_tiny"] and rows[0][1] == "ok", rows
    assert not (tmp_path / "smoke" / "chat_tiny").exists()  # its folder is deleted after


def test_unknown_smoke_config_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--configs", "tiny,gpt_9b"])
    assert "configs/gpt_9b.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch", "abc"], ["--batch", "16,0"], ["--smoke-jobs", "x"],
                                  ["--smoke-jobs", "0"]])
def test_bad_numbers_are_refused_by_flag(argv, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(argv)
    assert argv[0] in capsys.readouterr().err
