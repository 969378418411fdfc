"""slm plan: a budget becomes a config that costs what was asked, fits its GPU and loads."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from src.cli import main
from src.hardware import gpu_spec
from src.model.gpt import GPT
from src.tools import plan as planlib
from src.tools.cost import estimate, modal_cost_per_hour
from src.training.config import load_config
from src.training.memory import memory_estimate_gb


def _plan(args, capsys) -> tuple[int, str, str]:
    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _dollars(text: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("cost:"))
    return float(re.search(r"\$([0-9,]+\.[0-9]+)", line)[1].replace(",", ""))


@pytest.mark.parametrize("gpu,budget", [("H100", 20), ("A100-80GB:2", 7.5)])
def test_a_dollar_plan_costs_its_budget_by_slm_cost_and_loads(gpu, budget, tmp_path, capsys):
    out_file = tmp_path / "plan.yaml"
    rc, out, err = _plan(["--budget", str(budget), "--gpu", gpu, "-o", str(out_file)], capsys)
    assert rc == 0, err
    assert "compute-optimal" in out and "smaller, trained longer" in out
    assert "largest that fits" in out and "assumed" in out  # the MFU is labelled assumed
    cfg = load_config(out_file)
    assert cfg.name == "plan" and cfg.modal.gpu == gpu
    assert cfg.modal.max_cost_usd == budget
    assert main(["cost", "--config", str(out_file)]) == 0
    usd = _dollars(capsys.readouterr().out)
    assert abs(usd - budget) <= 0.05 * budget, usd
    # the run's own cost stop uses the same price per hour
    assert modal_cost_per_hour(cfg.modal) * cfg.training.max_seconds / 3600 == pytest.approx(
        budget, rel=0.01)


def test_hours_and_flops_budgets_land_on_their_figure(capsys):
    base = load_config(planlib.DEFAULT_BASE["gpu"])
    t = planlib.target_for({"hours": 3.0}, "H100:8", None, None)
    opts = planlib.plan(t, base, log=lambda m: None)
    assert 2 <= len(opts) <= 4
    for o in opts:
        e = estimate(o.cfg)
        assert 0.95 * 3 <= e.hours <= 3.0
        assert o.cfg.modal.timeout >= e.hours * 3600  # one attempt is enough
    t = planlib.target_for({"flops": 1e19}, "A100-80GB", None, None)
    for o in planlib.plan(t, base, log=lambda m: None):
        assert 0.95e19 <= estimate(o.cfg).flops <= 1e19


def test_every_option_fits_the_memory_it_claims(capsys):
    base = load_config(planlib.DEFAULT_BASE["gpu"])
    for gpu, usd in (("T4", 30), ("H100", 20), ("L4:4", 12)):
        t = planlib.target_for({"budget": usd}, gpu, None, None)
        kind = gpu.split(":")[0]
        n = int(gpu.split(":")[1]) if ":" in gpu else 1
        for o in planlib.plan(t, base, log=lambda m: None):
            with torch.device("meta"):
                model = GPT(o.cfg.model)
            assert model.num_params() == o.params
            need = memory_estimate_gb(model, o.cfg, n)["total_gb"]
            assert need == pytest.approx(o.memory_gb)
            assert need <= planlib.MEMORY_SHARE * gpu_spec(kind).memory_gb
            assert o.cfg.tokens_per_step(n) <= o.tokens


def test_options_follow_the_rules():
    base = load_config(planlib.DEFAULT_BASE["gpu"])
    t = planlib.target_for({"budget": 20}, "H100", None, None)
    best, smaller, largest = planlib.plan(t, base, log=lambda m: None)
    assert 10 <= best.tokens_per_param <= 40  # Chinchilla's ~20, one size step either way
    assert smaller.params <= best.params / 2 and smaller.tokens > best.tokens
    assert largest.params > best.params
    assert best.cfg.training.learning_rate > largest.cfg.training.learning_rate  # wider: lower
    for o in (best, smaller, largest):
        t = o.cfg.training
        per_step = estimate(o.cfg).hours * 60 / t.max_steps  # minutes
        assert 20 <= t.checkpoint_every * per_step <= 30 or t.checkpoint_every == t.max_steps
        assert t.eval_every < t.checkpoint_every


def test_a_long_plan_spans_modal_attempts():
    base = load_config(planlib.DEFAULT_BASE["gpu"])
    t = planlib.target_for({"hours": 60}, "T4", None, None)
    o = planlib.plan(t, base, log=lambda m: None)[0]
    m = o.cfg.modal
    attempts = -(-estimate(o.cfg).hours * 3600 // m.timeout)
    assert m.timeout == 86400 and m.retries >= attempts - 1 + planlib.PREEMPTION_RETRIES - 1
    assert any("attempts" in n for n in o.notes)


@pytest.mark.parametrize("args,says", [
    (["--budget", "-5", "--gpu", "H100"], "--budget"),
    (["--budget", "0", "--gpu", "H100"], "--budget"),
    (["--budget", "nan", "--gpu", "H100"], "--budget"),
    (["--budget", "0.01", "--gpu", "H100"], "too small"),
    (["--hours", "0.000001", "--gpu", "T4"], "too small"),
    (["--flops", "1e9", "--gpu", "H100"], "too small"),
    (["--budget", "20", "--gpu", "X100"], "unknown GPU"),
    (["--budget", "20", "--gpu", "H100:9"], "1 to 8"),
    (["--budget", "20", "--hours", "2", "--gpu", "H100"], "one budget"),
    (["--gpu", "H100"], "one budget"),
    (["--budget", "20", "--device", "cpu"], "--budget is dollars"),
    (["--budget", "20", "--gpu", "H100", "--pick", "9"], "--pick"),
])
def test_nonsense_budgets_are_one_error_line(args, says, capsys):
    rc, out, err = _plan(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err
    assert "Traceback" not in err


def test_a_bad_base_override_names_the_key(capsys):
    rc, _, err = _plan(["--budget", "20", "--gpu", "H100", "--training.nosuch", "1"], capsys)
    assert rc == 2 and err.startswith("error:") and "training.nosuch: unknown key" in err


def test_an_existing_output_is_not_overwritten(tmp_path, capsys):
    out_file = tmp_path / "mine.yaml"
    out_file.write_text("my: notes\n")
    rc, _, err = _plan(["--budget", "5", "--gpu", "L4", "-o", str(out_file)], capsys)
    assert rc == 2 and "--force" in err and out_file.read_text() == "my: notes\n"


def test_cpu_plan_times_this_machine_and_checks_the_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(planlib, "CPU_PROBE_SECONDS", 0.1)
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2000)  # ~56 KB: far fewer tokens than asked
    out_file = tmp_path / "cpu.yaml"
    rc, out, err = _plan(["--device", "cpu", "--minutes", "2", "--data.source", str(text),
                          "-o", str(out_file)], capsys)
    assert rc == 0, err
    assert "tokens/s" in err and "timed" in err  # it measured the sizes it plans with
    assert "$0" in out and "WARNING data" in out and "epochs" in out
    cfg = load_config(out_file)
    assert cfg.training.max_seconds == 120 and cfg.data.source == str(text)
    assert cfg.model.n_layer >= 1 and cfg.training.max_steps > 0


def test_the_data_check_reads_a_prepared_manifest(tmp_path):
    from src.data.prepare import prepare

    text = tmp_path / "corpus.txt"
    text.write_text("alpha beta gamma delta\n" * 3000)
    cfg = load_config(planlib.DEFAULT_BASE["cpu"], [f"data.source={text}", "data.tokenizer=bytes"])
    ds = prepare(cfg, tmp_path, log=lambda m: None)
    have = ds.manifest["train"]["tokens"]
    note = planlib.data_note(cfg, have * 3, tmp_path)
    assert f"{have:,} tokens" in note and "3.0 epochs" in note and "prepared" in note
    assert "WARNING" not in planlib.data_note(cfg, have // 2, tmp_path)
    hub = load_config(planlib.DEFAULT_BASE["gpu"])  # fineweb-edu-10b: its known size
    assert "10.0B GPT-2 tokens" in planlib.data_note(hub, 10**9, tmp_path)


def test_the_written_config_is_plain_yaml_without_a_name(tmp_path, capsys):
    out_file = tmp_path / "run42.yaml"
    assert _plan(["--hours", "1", "--gpu", "H100", "-o", str(out_file)], capsys)[0] == 0
    raw = yaml.safe_load(out_file.read_text())
    assert "name" not in raw and raw["model"]["n_layer"] >= 2
    assert load_config(out_file).name == "run42"


def test_the_base_configs_container_settings_do_not_change_the_price(tmp_path, capsys):
    out_file = tmp_path / "p.yaml"
    rc, _, err = _plan(["--budget", "20", "--gpu", "H100", "--modal.nodes", "2", "--modal.gpu",
                        "H100:8", "--modal.cpu", "64", "-o", str(out_file)], capsys)
    assert rc == 0, err
    cfg = load_config(out_file)
    assert (cfg.modal.nodes, cfg.modal.gpu, cfg.modal.cpu) == (1, "H100", None)
    assert estimate(cfg).cost_usd == pytest.approx(20, rel=0.05)


def test_a_budget_beyond_the_largest_shape_says_so():
    base = load_config(planlib.DEFAULT_BASE["gpu"])
    best = planlib.plan(planlib.target_for({"flops": 1e23}, "H100:8", None, None), base,
                        log=lambda m: None)[0]
    assert best.label == "largest on the ladder" and best.cfg.model.n_layer == planlib.MAX_DEPTH
    assert any("beyond slm's largest shape" in n for n in best.notes)
