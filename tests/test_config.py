"""Config loading: shipped configs load, bad configs are refused with every problem named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from src.errors import ConfigError, SLMError
from src.hardware import parse_gpu
from src.training.config import load_config

SHIPPED = ["tiny", "gpt_124m", "gpt_350m", "gpt_774m", "gpt_1b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.training.learning_rate > 0 and cfg.modal.timeout <= 86400


def test_seed_keys_keep_their_meaning():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml")
    assert cfg.modal.gpu == "T4"
    assert cfg.training.batch_size == 8 and cfg.training.gradient_accumulation_steps == 8
    assert cfg.tokens_per_step() == 8 * 8 * 1024
    assert load_config(ROOT / "configs/gpt_350m.yaml").modal.gpu == "A100-40GB"


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_one_error_lists_every_problem(tmp_path):
    def mutate(c):
        c["training"]["learning_rate"] = -0.001
        c["training"]["bogus_knob"] = 3
        c["model"]["n_layer"] = "many"
        c["modal"]["gpu"] = "H1000"

    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, mutate))
    msg = str(e.value)
    assert "training.learning_rate" in msg and "greater than 0" in msg
    assert "training.bogus_knob: unknown key" in msg
    assert "model.n_layer" in msg and "'many'" in msg
    assert "modal.gpu" in msg and "H1000" in msg and "did you mean H100" in msg
    assert "4 problem(s)" in msg


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = _write(tmp_path, lambda c: c["training"].update(learning_rat=1e-3))
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(p)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"model.n_embd": 100, "model.n_head": 3}, "divisible by n_head"),
        ({"training.seq_len": 512}, "training.seq_len: 512 is longer than model.block_size 128"),
        ({"model.vocab_size": 1000}, "model.vocab_size: 1000 is smaller than the bpe tokenizer's 2048"),
        ({"data.tokenizer": "gpt2", "model.vocab_size": 50000}, "smaller than the gpt2"),
        ({"data.tokenizer": "bytes", "model.vocab_size": 100}, "smaller than the bytes"),
        ({"modal.timeout": 100000}, "modal.timeout"),
        ({"modal.gpu": "H100:16"}, "1 to 8 H100 GPUs"),
        ({"name": "my run/1"}, "name"),
        ({"training.schedule": "exp"}, "training.schedule"),
    ],
)
def test_impossible_values_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny.yaml", overrides)
    assert needle in str(e.value)


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["training.learning_rate=3e-4", "model.n_layer=6", "training.compile=false",
         "data.source=some/dir"],
    )
    assert cfg.training.learning_rate == 3e-4 and cfg.model.n_layer == 6
    assert cfg.training.compile is False and cfg.data.source == "some/dir"


def test_vocab_comes_from_the_tokenizer():
    assert load_config(ROOT / "configs/tiny.yaml").model.vocab_size == 2048
    assert load_config(ROOT / "configs/tiny.yaml", {"data.tokenizer": "bytes"}).model.vocab_size == 257
    assert load_config(ROOT / "configs/tiny.yaml", {"data.tokenizer": "char"}).model.vocab_size is None


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  n_layer: 4\n   n_head: [4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_config(p)


def test_missing_file_lists_shipped_configs():
    with pytest.raises(SLMError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_gpu_strings():
    assert parse_gpu("H100:8") == ("H100", 8)
    assert parse_gpu("a100-80gb") == ("A100-80GB", 1)
    with pytest.raises(ValueError):
        parse_gpu("RTX4090")


def test_seed_validation_command_fails_loudly(tmp_path):
    """The seed's `python -c "...load_config(...)"` validation exits non-zero naming the key."""
    p = _write(tmp_path, lambda c: c["training"].update(batch_size=0))
    code = f"from src.training.config import load_config; load_config({str(p)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "training.batch_size" in r.stderr
