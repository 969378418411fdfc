"""The CPU recipe's pieces: start-up that skips torch._dynamo, the token embedding's own learning
rate, and a shipped tiny that still exports exactly (transformers and GGUF)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_embedding_lr_is_the_token_embeddings_own_undecayed_group(optimizer, tied):
    from src.model.gpt import GPT
    from src.training.config import load_config
    from src.training.optim import build_optimizer, set_lr

    keys = [f"training.optimizer={optimizer}", f"model.tie_embeddings={tied}",
            "data.vocab_size=300", "model.n_layer=1"]
    plain = load_config(ROOT / "configs/tiny.yaml", keys + ["training.embedding_lr=null"])
    cfg = load_config(ROOT / "configs/tiny.yaml", keys + ["training.embedding_lr=0.05"])
    model = GPT(cfg.model)
    before = build_optimizer(model, plain.training, "cpu").param_groups
    groups = build_optimizer(model, cfg.training, "cpu").param_groups
    wte = model.transformer.wte.weight
    own = [g for g in groups if any(p is wte for p in g["params"])]
    assert len(own) == 1 and own[0]["params"] == [wte]
    assert own[0]["lr"] == 0.05 and own[0]["weight_decay"] == 0.0
    assert groups[-1] is own[0]  # appended: the other groups keep their order
    was = [g for g in before if any(p is wte for p in g["params"])][0]  # unset: as before
    assert was["lr"] == cfg.training.learning_rate and was["weight_decay"] == 0.1
    assert len(before) == len(groups) - (not tied or optimizer == "adamw")
    opt = build_optimizer(model, cfg.training, "cpu")
    set_lr(opt, 0.5)  # the schedule scales it like every other group
    assert opt.param_groups[-1]["lr"] == 0.025


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_value_embeds_learn_in_the_token_tables_group(optimizer):
    from src.model.gpt import GPT
    from src.training.config import load_config
    from src.training.optim import build_optimizer

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"training.optimizer={optimizer}", "data.vocab_size=300", "model.n_layer=2",
        "model.value_embeds=true", "model.unet_skips=true"])
    model = GPT(cfg.model)
    groups = build_optimizer(model, cfg.training, "cpu").param_groups
    tables = [model.transformer.wte.weight, *(e.weight for e in model.transformer.ve)]
    assert groups[-1]["params"] == tables and groups[-1]["lr"] == cfg.training.embedding_lr
    skip = [g for g in groups if any(p is model.skip_weights for p in g["params"])][0]
    assert skip["weight_decay"] == 0.0 and skip.get("kind") != "muon"


@pytest.mark.parametrize("options", [{}, {"model.value_embeds": True, "model.unet_skips": True}],
                         ids=["plain", "value_embeds+unet_skips"])
def test_embedding_lr_resumes_exactly(fast_cfg, tmp_path, options):
    from src import checkpoint as ckpt
    from src.training.trainer import train

    cfg = fast_cfg(**{"training.max_steps": 8, "training.optimizer": "muon",
                      "training.embedding_lr": 0.05, "model.tie_embeddings": False, **options})
    train(cfg, data_root=tmp_path / "a", use_wandb=False, log=lambda *a: None)
    train(cfg, data_root=tmp_path / "b", use_wandb=False, log=lambda *a: None,
          resume=str(tmp_path / "a/checkpoints/tiny/step_4.pt"))
    wa, wb = (ckpt.load(tmp_path / r / "checkpoints/tiny/final.pt")["model_state_dict"]
              for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _tiny_architecture(**shape) -> dict:
    """configs/tiny.yaml's model options (not its size): what must export exactly."""
    from src.training.config import read_yaml

    m = read_yaml(ROOT / "configs/tiny.yaml")["model"]
    keep = ("pos_emb", "norm", "qk_norm", "mlp", "bias", "tie_embeddings", "mlp_ratio")
    return {**{k: m[k] for k in keep if k in m}, **shape}


def test_the_shipped_tiny_exports_exactly_to_transformers(tmp_path):
    pytest.importorskip("transformers")
    from src.data.tokenizer import ByteTokenizer
    from src.tools.export import export_hf
    from tests.test_export import hf_logits, ours, save_checkpoint

    model = save_checkpoint(tmp_path / "m.pt", ByteTokenizer(), **_tiny_architecture())
    export_hf(model, ByteTokenizer(), tmp_path / "hf")
    ids = torch.randint(0, 257, (2, 32))
    got, name = hf_logits(tmp_path / "hf", ids)
    assert name == "Qwen3ForCausalLM"
    torch.testing.assert_close(got, ours(model, ids))


def test_the_shipped_tiny_exports_exactly_to_gguf(tmp_path):
    pytest.importorskip("gguf")
    from src.tools.gguf import export_gguf
    from tests.test_export import make_tokenizer, ours, save_checkpoint
    from tests.test_gguf import load_gguf, logits

    tok = make_tokenizer("bpe")  # transformers' GGUF reader wants Qwen3's head size, 128
    model = save_checkpoint(tmp_path / "m.pt", tok, **_tiny_architecture(n_embd=256))
    export_gguf(model, tok, tmp_path / "m.gguf")
    hf, _ = load_gguf(tmp_path / "m.gguf")
    ids = torch.tensor([tok.encode("def main(x):\n    return x")])
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    torch.testing.assert_close(logits(hf, ids), ours(model, ids), atol=1e-4, rtol=0)
