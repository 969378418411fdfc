"""Shared fixtures: a small local corpus and configs small enough to train in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Overrides that make configs/tiny.yaml train in a few seconds.
FAST = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 64,
    "model.block_size": 64,
    "data.vocab_size": 512,
    "training.batch_size": 4,
    "training.max_steps": 12,
    "training.warmup_steps": 2,
    "training.eval_every": 6,
    "training.eval_tokens": 2048,
    "training.checkpoint_every": 4,
    "training.log_every": 2,
    "training.num_samples": 1,
    "training.sample_tokens": 8,
    "training.max_seconds": None,  # step budgets only: the schedule must not depend on time
    # GPT-2's architecture and AdamW, as the tests were written for (tiny.yaml's modern
    # options and Muon have tests of their own)
    "model.pos_emb": "learned",
    "model.norm": "layernorm",
    "model.mlp": "gelu",
    "model.qk_norm": False,
    "model.bias": True,
    "model.tie_embeddings": True,
    "training.optimizer": "adamw",
    "training.embedding_lr": None,
    "training.learning_rate": 3e-3,
}


@pytest.fixture
def one_thread():
    """Tiny models: more threads only add contention on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """60 standard-library modules copied into a folder: a real, small, local text corpus."""
    d = tmp_path_factory.mktemp("corpus")
    lib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(lib.glob("*.py"))[:60]:
        (d / (p.stem + ".txt")).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture
def fast_cfg(corpus):
    """fast_cfg(**overrides) -> Config: tiny.yaml shrunk, reading the local corpus."""
    from src.training.config import load_config

    def make(**kw):
        o = {**FAST, "data.source": str(corpus), **{k.replace("__", "."): v for k, v in kw.items()}}
        return load_config(ROOT / "configs" / "tiny.yaml", o)

    return make


def fast_args(corpus, **kw) -> list[str]:
    """Command-line flags equivalent to fast_cfg, for subprocess runs of train_local.py."""
    o = {**FAST, "data.source": str(corpus), **{k.replace("__", "."): v for k, v in kw.items()}}
    out = []
    for k, v in o.items():
        out += [f"--{k}", "null" if v is None else str(v)]
    return out


def run_cli(*args, cwd=ROOT, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m src <args>` (the slm command) in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "src", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
