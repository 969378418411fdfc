"""Cost: the price table, the FLOPs-based estimate, `slm cost`, and the budget stop in train()."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT

from src.errors import SLMError
from src.hardware import GPUS
from src.model.gpt import GPT
from src.tools import cost
from src.training.config import load_config
from src.training.trainer import train


def test_price_table_is_modals_list():
    from src.hardware import GPUS

    assert {k: g.price for k, g in GPUS.items()} == {
        "T4": 0.59, "L4": 0.80, "A10": 1.10, "L40S": 1.95, "A100-40GB": 2.10,
        "A100-80GB": 2.50, "RTX-PRO-6000": 3.03, "H100": 3.95, "H200": 4.54, "B200": 6.25,
    }
    assert cost.gpu_price("a100") == 2.10 and cost.gpu_price("A10G") == 1.10  # Modal's aliases
    assert cost.gpu_price("H100!") == 3.95 and cost.gpu_price("B200+") == 6.25


def test_cpu_and_memory_reservation_is_billed_per_container():
    core_h, gib_h = 0.0000131 * 3600, 0.00000222 * 3600  # Modal's per-second rates, per hour
    # the figure: 8 cores + 32 GiB is about $0.63/h on top of the GPU
    assert cost.cost_per_hour("T4", cpu=8, memory_mib=32768) == pytest.approx(
        0.59 + 8 * core_h + 32 * gib_h)
    assert 8 * core_h + 32 * gib_h == pytest.approx(0.633, abs=1e-3)
    # default reservation: the GPU table's per-GPU figures, times the GPUs and the nodes
    h100 = GPUS["H100"]
    one = h100.price + h100.cpu * core_h + h100.ram_gib * gib_h
    assert cost.cost_per_hour("H100") == pytest.approx(one)
    assert cost.cost_per_hour("H100:8") == pytest.approx(8 * one)
    assert cost.cost_per_hour("H100:8", nodes=2) == pytest.approx(16 * one)
    # non-preemptible (CPU-only functions): CPU and memory cost 3x
    assert cost.cost_per_hour("T4", cpu=1, memory_mib=1024, nonpreemptible=True) == pytest.approx(
        0.59 + 3 * (core_h + gib_h))


def test_estimate_and_budget_rate_count_the_reservation():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml")
    e = cost.estimate(cfg)
    assert e.reservation_per_hour > 0
    assert e.cost_usd == pytest.approx(e.hours * (e.price_per_gpu_hour * e.gpus
                                                  + e.reservation_per_hour))
    cfg.modal.cpu, cfg.modal.memory = 2.0, 4096  # the config's own reservation wins
    e2 = cost.estimate(cfg)
    assert (e2.cpu, e2.memory_mib) == (2.0, 4096) and e2.cost_usd < e.cost_usd
    assert cost.modal_cost_per_hour(cfg.modal) == pytest.approx(e2.cost_per_hour)
    assert "CPU and memory:  2 cores + 4 GiB reserved" in cost.estimate_text(cfg)


def test_every_gpu_the_config_accepts_has_a_price_and_a_peak():
    from src.hardware import ALIASES, GPUS, gpu_peak_tflops

    for kind in (*GPUS, *ALIASES):
        assert cost.gpu_price(kind) > 0
        assert gpu_peak_tflops(kind) > 0


def test_estimate_arithmetic():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml")
    e = cost.estimate(cfg, mfu=0.5)
    with torch.device("meta"):
        fpt = GPT(cfg.model).flops_per_token(cfg.seq_len)
    tokens = 8 * 8 * 1024 * 50_000  # batch x accum x seq_len x steps
    evals = 50_000 // 1000 + 1
    flops = fpt * tokens + evals * 1_048_576 * fpt / 3
    hours = flops / (GPUS["T4"].tflops * 1e12 * 0.5) / 3600
    assert (e.tokens, e.flops_per_token, e.gpus) == (tokens, fpt, 1)
    assert e.hours == pytest.approx(hours)
    t4 = GPUS["T4"]  # GPU + its default reservation (cores, GiB)
    assert e.cost_usd == pytest.approx(hours * (0.59 + t4.cpu * 0.0000131 * 3600
                                                + t4.ram_gib * 0.00000222 * 3600))
    assert e.attempts == math.ceil(hours * 3600 / 43200)


def test_more_gpus_for_the_same_tokens_cost_the_same_but_finish_sooner():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml", ["training.batch_tokens=524288"])
    one, eight = cost.estimate(cfg, "H100"), cost.estimate(cfg, "H100:8")
    assert one.tokens == eight.tokens
    assert eight.hours == pytest.approx(one.hours / 8)
    assert eight.cost_usd == pytest.approx(one.cost_usd)
    assert eight.cost_per_hour == pytest.approx(8 * one.cost_per_hour)  # reservation per GPU too


def test_budget_and_time_limit_notes():
    cfg = load_config(ROOT / "configs/gpt_1b.yaml", ["modal.max_cost_usd=10", "modal.retries=1"])
    text = cost.estimate_text(cfg)
    assert "stops at modal.max_cost_usd $10.00" in text
    assert "more than modal.retries+1 = 2" in text


def test_measured_mfu_from_a_run(tmp_path):
    rows = [{"step": i, "mfu": m} for i, m in enumerate([0.05, 0.1, 0.40, 0.42, 0.44], 1)]
    rows.insert(2, {"step": 3, "val/loss": 3.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cost.measured_mfu(tmp_path) == pytest.approx(0.42)
    (tmp_path / "cpu.jsonl").write_text(json.dumps({"step": 1, "mfu": None}) + "\n")
    with pytest.raises(SLMError, match="--mfu"):
        cost.measured_mfu(tmp_path / "cpu.jsonl")


def test_slm_cost_command(capsys, monkeypatch):
    from src.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["cost", "--config", "configs/gpt_350m.yaml", "--gpu", "H100:8",
                 "--training.max_steps", "1000", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "H100:8 at $3.95/GPU-hour = $31.60/hour" in out
    assert "40% MFU (given)" in out and "cost:" in out
    assert main(["cost", "--config", "configs/gpt_350m.yaml", "--gpu", "H900"]) == 2
    assert "unknown GPU 'H900'" in capsys.readouterr().err
    assert main(["train", "--config", "configs/gpt_124m.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cost on Modal (estimate):" in out and "T4 at $0.59" in out


# ----------------------------------------------------------------------------- during a run


def test_cost_is_logged_and_the_budget_stops_the_run_with_a_checkpoint(fast_cfg, tmp_path):
    rate = 3.6e9  # $1 per microsecond: the budget is spent by the first check
    cfg = fast_cfg(modal__max_cost_usd=1.0)
    lines = []
    res = train(cfg, data_root=tmp_path, use_wandb=False, cost_per_hour=rate, log=lines.append)
    t = cfg.training
    assert res.step == t.log_every < t.max_steps  # stopped at the first log step
    assert any("budget reached" in x for x in lines)
    assert res.final_checkpoint.is_file() and res.model_path.is_file()
    assert res.val_loss is not None  # evaluated before stopping
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    costs = [r["cost_usd"] for r in rows if "cost_usd" in r]
    assert costs and costs == sorted(costs) and costs[-1] >= 1.0

    again = train(cfg, data_root=tmp_path, use_wandb=False, cost_per_hour=rate, log=lines.append)
    assert again.step == res.step and "raise modal.max_cost_usd" in lines[-1]

    more = fast_cfg(modal__max_cost_usd=1e12)
    done = train(more, data_root=tmp_path, use_wandb=False, cost_per_hour=rate, log=lines.append)
    assert done.step == t.max_steps


def test_no_price_no_cost_column(fast_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("SLM_COST_PER_HOUR", raising=False)
    res = train(fast_cfg(training__max_steps=2, modal__max_cost_usd=0.01), data_root=tmp_path,
                use_wandb=False, log=lambda *a: None)
    assert res.step == 2  # a budget needs a price: without one it is ignored
    rows = (res.run_dir / "metrics.jsonl").read_text()
    assert "cost_usd" not in rows


def test_estimates_price_the_model_that_init_from_loads(fast_cfg, tmp_path, one_thread):
    # chat_tiny's own model keys are the defaults (GPT-2 small): priced as such, a fine-tune of a
    # 1M-parameter model came out 70x too dear
    from src import checkpoint as ckpt
    from src.model.gpt import GPTConfig
    from src.paths import RunLayout
    from src.tools.dryrun import describe

    base = fast_cfg(training__max_steps=2, training__num_samples=0)
    train(base, tmp_path, "cpu", "never", False, log=lambda *a: None)
    shape = ckpt.load(RunLayout(tmp_path, base.name).model_final)["config"]["model"]
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml", {"model.init_from": base.name})
    with pytest.raises(SLMError, match="training.seq_len: 128 .* 64 or less"):
        cost.estimate(cfg, root=tmp_path)  # chat_tiny's 128 tokens: more than the source takes
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml",
                      {"model.init_from": base.name, "training.seq_len": 64})
    small = GPT(GPTConfig.model_validate(shape)).flops_per_token(cfg.seq_len)
    e = cost.estimate(cfg, root=tmp_path)
    assert e.flops_per_token == pytest.approx(small, rel=0.02) and e.note is None
    text = describe(cfg, "cpu", tmp_path)
    assert f"n_layer: {shape['n_layer']}" in text and f"{e.flops_per_token:.2e}" in text
    away = cost.estimate(cfg, root=tmp_path / "elsewhere")  # the run is not on this machine
    assert "not on this machine" in away.note and away.flops_per_token > 10 * small
    assert "not on this machine" in cost.estimate_text(cfg, root=tmp_path / "elsewhere")
