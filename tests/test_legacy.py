"""Runs written by an older slm (tests/legacy/v1, made by tests/legacy/make_legacy.py at commit
a1ee763) still load and resume exactly with today's code."""

import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch

from src.cli import main

FIXTURE = Path(__file__).parent / "legacy" / "v1"
ROOT = Path("/tmp/slm-legacy-fixture")  # the dataset key holds the source's absolute path
MTIME = 1_700_000_000


@pytest.fixture
def legacy_root():
    with open("/tmp/slm-legacy-fixture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(ROOT, ignore_errors=True)
        shutil.copytree(FIXTURE, ROOT)
        os.utime(ROOT / "corpus.txt", (MTIME, MTIME))
        yield ROOT
        shutil.rmtree(ROOT, ignore_errors=True)


@pytest.mark.parametrize("name", ["legacy_adamw", "legacy_muon"])
def test_old_checkpoint_resumes_bit_identical(legacy_root, name, capsys):
    reference = torch.load(legacy_root / "models" / f"{name}_final.pt", weights_only=True)
    (legacy_root / "models" / f"{name}_final.pt").unlink()
    datasets = sorted(p.name for p in (legacy_root / "datasets").iterdir())
    rc = main(["train", "--config", str(legacy_root / f"{name}.yaml"), "--data-root",
               str(legacy_root), "--no-wandb", "--device", "cpu"])
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out
    # the old dataset folder was used as it is, not prepared again
    assert sorted(p.name for p in (legacy_root / "datasets").iterdir()) == datasets
    new = torch.load(legacy_root / "models" / f"{name}_final.pt", weights_only=True)
    assert new["step"] == reference["step"] == 6
    # Bit-identical on the machine that wrote the fixture; another CPU's kernels may round the
    # last bit differently, so allow float noise. A resume that lost the optimizer state, the
    # schedule or the data position moves the weights by ~1e-3, far outside this tolerance.
    for k, v in reference["model_state_dict"].items():
        assert torch.allclose(new["model_state_dict"][k], v, rtol=0, atol=2e-6), k


def test_old_model_file_samples(legacy_root, capsys):
    rc = main(["sample", str(legacy_root / "models" / "legacy_muon_final.pt"), "--prompt", "the",
               "--max-new-tokens", "8", "--seed", "1"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("the")
