"""The GPT model: GPT-2's sizes, a sane start, it can learn, every architecture switch works."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT

from src.model.gpt import GPT, GPTConfig
from src.training.config import load_config

# GPT-2's published parameter counts (tied embeddings counted once, 50257-token vocab).
GPT2 = {"gpt_124m": 124_439_808, "gpt_350m": 354_823_168, "gpt_774m": 774_030_080,
        "gpt_1b": 1_557_611_200}


@pytest.mark.parametrize("name", list(GPT2))
def test_shipped_configs_have_gpt2_parameter_counts(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        exact = GPT(cfg.model.model_copy(update={"pad_vocab_multiple": 1}))
        padded = GPT(cfg.model)
    assert exact.num_params() == GPT2[name]
    assert abs(padded.num_params() - GPT2[name]) / GPT2[name] < 0.001  # vocab padded to 50304


def test_tiny_config_builds():
    model = GPT(load_config(ROOT / "configs/tiny.yaml").model)
    assert 0.5e6 < model.num_params() < 20e6


def small(**kw):
    return GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                        "vocab_size": 101, **kw})


def test_loss_at_init_is_uniform_guess():
    torch.manual_seed(0)
    m = GPT(small())
    x, y = torch.randint(0, 101, (2, 8, 32))
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(m.cfg.padded_vocab)) < 0.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(small())
    x = torch.randint(0, 101, (4, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize(
    "opts",
    [
        {"pos_emb": "rope"},
        {"norm": "rmsnorm", "bias": False},
        {"qk_norm": True},
        {"mlp": "swiglu"},
        {"mlp": "relu2"},
        {"tie_embeddings": False},
        {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "bias": False,
         "tie_embeddings": False},
        {"grad_checkpoint": True, "dropout": 0.1},
        {"value_embeds": True},
        {"unet_skips": True},
        {"value_embeds": True, "unet_skips": True, "grad_checkpoint": True, "n_layer": 3},
    ],
)
def test_architecture_switches_train(opts):
    torch.manual_seed(0)
    m = GPT(small(**opts))
    x = torch.randint(0, 101, (2, 17))
    logits, loss = m(x[:, :-1], x[:, 1:])
    assert logits.shape == (2, 16, m.cfg.padded_vocab)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert (m.lm_head.weight is m.transformer.wte.weight) == m.cfg.tie_embeddings


def test_value_embeds_add_token_tables_but_no_flops_and_skips_join_mirrored_blocks():
    plain, both = GPT(small(n_layer=5)), GPT(small(n_layer=5, value_embeds=True, unet_skips=True))
    V, C = plain.cfg.padded_vocab, plain.cfg.n_embd
    assert both.num_params() - plain.num_params() == 5 * V * C + 2  # 5 tables, 2 skip weights
    assert both.flops_per_token() == plain.flops_per_token()
    # block 4 reads block 0's input (the embeddings): its weight moves the logits
    x = torch.randint(0, 101, (1, 8))
    before, _ = both(x)
    with torch.no_grad():
        both.skip_weights[1] += 1.0
    assert not torch.allclose(both(x)[0], before)
    with pytest.raises(ValueError, match="unet_skips needs n_layer >= 2"):
        small(n_layer=1, unet_skips=True)


def test_chat_tokens_grow_every_token_table():
    """Fine-tuning for chat appends two tokens: the value tables grow with the embedding."""
    from src.training.init_from import grow_vocab

    m = GPT(small(value_embeds=True, tie_embeddings=False))
    grown = grow_vocab(m.state_dict(), m.cfg.padded_vocab + 64)
    bigger = GPT(small(value_embeds=True, tie_embeddings=False, vocab_size=101 + 64))
    bigger.load_state_dict(grown)  # every table has the new rows
    assert torch.equal(grown["transformer.ve.1.weight"][:101], m.transformer.ve[1].weight[:101])


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(small())(torch.zeros(1, 33, dtype=torch.long))


def test_flops_per_token_matches_6n_rule():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml").model
    with torch.device("meta"):
        m = GPT(cfg)
    n_matmul = 12 * 4 * 768 * 768 * 3 + 50304 * 768  # blocks' matrices (12*C^2 each) + head
    assert m.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 1024 * 768
