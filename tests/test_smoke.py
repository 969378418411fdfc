"""--smoke (a rehearsal of a config's code path with a GPU forecast) and stopping mid-accumulation."""

from __future__ import annotations

import signal

import pytest
import torch

from src import checkpoint as ckpt
from src.data.loader import BatchLoader
from src.errors import Interrupted, SLMError
from src.model.gpt import GPT
from src.paths import RunLayout
from src.tools import smoke
from src.training.config import load_config
from src.training.trainer import train
from tests.conftest import ROOT, fast_args, run_cli


def test_plan_keeps_the_width_of_gpt_1b_and_says_what_it_reduced(tmp_path):
    cfg = load_config(ROOT / "configs" / "gpt_1b.yaml")
    scfg, notes = smoke.plan(cfg, tmp_path)
    m = scfg.model
    assert (m.n_embd, m.n_head, m.block_size) == (1600, 25, 1024)
    assert 1 <= m.n_layer < 48
    assert scfg.data.tokenizer == "gpt2" or m.vocab_size == 50257  # offline: bytes at GPT-2's vocab
    assert scfg.training.max_steps == smoke.SMOKE_STEPS and scfg.grad_accum() == 2
    assert scfg.name == "gpt_1b-smoke"
    text = "\n".join(notes)
    assert "depth 48 ->" in text and "fineweb-edu-10b" in text


def test_forecast_names_memory_dollars_and_what_is_assumed():
    cfg = load_config(ROOT / "configs" / "gpt_1b.yaml")
    text = smoke.forecast_text(cfg)
    assert "GB" in text and "$" in text and "A100-80GB" in text
    assert "MFU (assumed)" in text
    big = load_config(ROOT / "configs" / "gpt_1b.yaml", {"modal.gpu": "T4"})
    assert "does NOT fit" in smoke.forecast_text(big)


def test_rehearsal_resumes_exactly_and_leaves_real_runs_alone(fast_cfg, tmp_path, one_thread):
    cfg = fast_cfg(training__gradient_accumulation_steps=3)
    r = smoke.rehearse(cfg, tmp_path, "cpu", log=lambda *a: None)
    assert r.loss is not None and r.resumed_loss == r.loss
    assert r.checkpoint_gb > 0
    assert not RunLayout(tmp_path, cfg.name).run_dir.exists()
    assert RunLayout(tmp_path, cfg.name + "-smoke").final.is_file()


def test_slm_train_smoke_prints_the_forecast(corpus, tmp_path):
    p = run_cli("train", "--config", ROOT / "configs" / "tiny.yaml", "--smoke", "--no-wandb",
                "--device", "cpu", "--data-root", tmp_path, *fast_args(corpus))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "smoke rehearsal passed" in p.stdout and "forecast for the real run on T4" in p.stdout
    assert "$" in p.stdout and "MFU (assumed)" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_between_micro_steps_keeps_the_last_completed_step(fast_cfg, tmp_path, monkeypatch,
                                                                one_thread, sig):
    """A real signal arrives during step 3's accumulation: no further micro-step runs, step 2 is
    saved, and resuming ends with the same weights as an uninterrupted run."""
    accum, kw = 5, dict(training__gradient_accumulation_steps=5, training__max_steps=4,
                        training__checkpoint_every=1, training__eval_every=100)
    ref = train(fast_cfg(**kw), tmp_path / "ref", "cpu", use_wandb=False, log=lambda *a: None)
    calls = {"n": 0}
    real = BatchLoader.next_batch

    def counting(self, device):
        calls["n"] += 1
        if calls["n"] == 2 * accum + 2:  # the second micro-step of step 3
            signal.raise_signal(sig)
        return real(self, device)

    monkeypatch.setattr(BatchLoader, "next_batch", counting)
    with pytest.raises(Interrupted) as e:
        train(fast_cfg(**kw), tmp_path / "run", "cpu", use_wandb=False, log=lambda *a: None)
    assert e.value.signum == sig
    assert calls["n"] == 2 * accum + 2  # stopped before the next micro-step
    lay = RunLayout(tmp_path / "run", fast_cfg().name)
    assert ckpt.load(lay.step(2))["step"] == 2 and not lay.step(3).exists()
    monkeypatch.setattr(BatchLoader, "next_batch", real)
    res = train(fast_cfg(**kw), tmp_path / "run", "cpu", use_wandb=False, log=lambda *a: None)
    a, b = (ckpt.load(p)["model_state_dict"] for p in (ref.final_checkpoint, res.final_checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def small_model(fast_cfg, tmp_path):
    """(config, model file) of a shrunk tiny.yaml rehearsed once: block_size 64, 2 layers."""
    base = fast_cfg()
    smoke.rehearse(base, tmp_path, "cpu", log=lambda *a: None)
    return base, RunLayout(tmp_path, base.name + "-smoke").model_final


def test_smoke_of_a_chat_config_that_starts_from_a_trained_model(small_model, tmp_path,
                                                                  one_thread):
    # chat_tiny as shipped (init_from a run, chat data): the rehearsal must sample chat data, not
    # text, and keep the shape the source gives (its defaults would "disagree" with it)
    base, source = small_model
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml",
                      {"model.init_from": str(source), "training.seq_len": 64})
    said: list[str] = []
    assert smoke.run_smoke(cfg, tmp_path, "cpu", log=said.append) == 0
    text = "\n".join(said)
    assert "smoke rehearsal passed" in text and "chat train:" in text
    m = base.model
    assert f"3 steps of {m.n_layer} layers x {m.n_embd} wide" in text  # the source's shape
    flops = GPT(base.model.model_copy(update={"vocab_size": base.model_vocab})).flops_per_token(
        cfg.seq_len)
    assert f"{flops:.2e} FLOPs per token" in text  # the forecast is of that model, not 124M's


def test_init_from_a_model_shorter_than_training_seq_len_is_refused(small_model, tmp_path,
                                                                    one_thread):
    _, source = small_model  # block_size 64; chat_tiny trains on 128-token sequences
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml", {"model.init_from": str(source)})
    with pytest.raises(SLMError, match=r"training.seq_len: 128 .* block_size .* 64 or less"):
        train(cfg, tmp_path, "cpu", "never", False, log=lambda *a: None)


def test_smoke_of_a_config_whose_init_from_run_is_not_trained_names_it(tmp_path):
    cfg = load_config(ROOT / "configs" / "chat_tiny.yaml")
    with pytest.raises(SLMError, match="model.init_from 'tiny'.*train that run first"):
        smoke.run_smoke(cfg, tmp_path, "cpu", log=lambda *a: None)
