"""The CPU recipe's pieces: start-up that skips torch._dynamo, and the tiny config's options."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

MUON_WITHOUT_DYNAMO = """
import sys, torch
from src.model.gpt import GPT
from src.training.config import load_config
from src.training.muon import MuonWithAdamW
cfg = load_config("configs/tiny.yaml", ["data.vocab_size=300", "model.n_layer=1"])
model = GPT(cfg.model)
opt = MuonWithAdamW(model, cfg.training)
x = torch.randint(0, 300, (2, 8))
model(x, x)[1].backward()
opt.step()
opt.zero_grad(set_to_none=True)
opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""


def test_muon_optimizer_never_imports_dynamo():
    """Building, stepping, saving and loading Muon leaves torch._dynamo unimported (a second of
    start-up on a CPU, where nothing is compiled)."""
    r = subprocess.run([sys.executable, "-c", MUON_WITHOUT_DYNAMO], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == "False"
