"""Generation: the KV cache changes speed, not output; batching, sampling controls, `slm sample`."""

from __future__ import annotations

import io

import pytest
import torch

from src import checkpoint as ckpt
from src.cli import main
from src.data.tokenizer import ByteTokenizer
from src.model.gpt import GPT, GPTConfig, KVCache, sample_next
from src.tools.sample import complete, print_samples
from src.training.config import validate_config

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {
    "gpt2": {},
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False),
    "value_embeds+unet_skips": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                    value_embeds=True, unet_skips=True),
}


def tiny_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=61, **kw)
    return GPT(cfg).eval()


def run(model, idx, n, **kw) -> torch.Tensor:
    return torch.cat(list(model.generate(idx, n, **kw)), dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_cache_gives_the_same_greedy_output(shape):
    model = tiny_model(**SHAPES[shape])
    idx = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(1))
    # 40 new tokens: past block_size (24), so the window slides too
    cached = run(model, idx, 40, temperature=0)
    plain = run(model, idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 40)
    assert torch.equal(cached, plain)


def test_cache_prefill_then_steps_matches_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 61, (2, 10))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 2, 10, "cpu")
    pre, _ = model(idx[:, :4], cache=cache)  # prefill 4
    chunk, _ = model(idx[:, 4:7], cache=cache)  # a chunk of 3 over the cache
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 10)]  # one at a time
    got = torch.cat([pre, chunk, *steps], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 10
    with pytest.raises(ValueError, match="KV cache holds 10"):
        model(idx[:, :1], cache=cache)


def test_generation_under_autocast_with_float32_weights():
    """An FSDP run's end: float32 weights (the resharded shard) and bf16 activations. The cache
    takes the keys' dtype, so attention never mixes bf16 queries with float32 keys."""
    model = tiny_model()
    idx = torch.randint(0, 61, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, idx, 6, temperature=0)
    assert out.shape == (2, 6)


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_prompts_of_different_lengths_match_one_by_one(shape):
    model = tiny_model(**SHAPES[shape])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 61, (1, n), generator=g) for n in (3, 9, 6)]
    width = 9
    batch = torch.cat([torch.cat([torch.zeros(1, width - p.size(1), dtype=torch.long), p], 1)
                       for p in prompts])
    pad = [width - p.size(1) for p in prompts]
    for use_cache in (True, False):
        together = run(model, batch, 30, temperature=0, pad=pad, use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone = run(model, p, 30, temperature=0)
            assert torch.equal(together[i], alone[0]), (i, use_cache)


def test_seed_repeats_and_changes_samples():
    model = tiny_model()
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = run(model, idx, 20, temperature=1.0, seed=5)
    b = run(model, idx, 20, temperature=1.0, seed=5)
    c = run(model, idx, 20, temperature=1.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        return {int(sample_next(logits, generator=g, **kw)) for _ in range(300)}

    assert draws() == {0, 1, 2, 3, 4}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_k=1) == {0}
    # softmax mass: 0.636, 0.234, 0.086, ... -> top_p 0.8 keeps the first two, 0.5 the first
    assert draws(top_p=0.8) == {0, 1}
    assert draws(top_p=0.5) == {0}
    assert draws(top_p=1e-9) == {0}
    assert int(sample_next(logits, temperature=0)) == 0


def test_generation_stops_when_every_row_hit_a_stop_token():
    model = tiny_model()
    idx = torch.zeros(2, 3, dtype=torch.long)
    free = run(model, idx, 30, temperature=0)
    stop = int(free[0, 4])  # row 0 produces this token at step 5
    stopped = run(model, idx, 30, temperature=0, stop_tokens=[stop])
    assert stopped.size(1) < 30
    assert torch.equal(stopped, free[:, : stopped.size(1)])
    assert all((row == stop).any() for row in stopped)  # every row produced it


def _checkpoint(tmp_path, seed=0):
    """An slm checkpoint of a tiny random model with the bytes tokenizer."""
    cfg = validate_config({"name": "t", "data": {"tokenizer": "bytes"}, "model": {
        "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}})
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    path = tmp_path / "m.pt"
    ckpt.save({"model_state_dict": model.state_dict(), "config": cfg.to_dict(),
               "tokenizer": ByteTokenizer().to_dict()}, path)
    return path, model.eval()


def test_complete_cuts_at_stop_strings_and_streams_the_same_text(tmp_path):
    _, model = _checkpoint(tmp_path)
    tok = ByteTokenizer()
    free = complete(model, tok, ["ab", "x"], max_new_tokens=30, temperature=0, stop_at_eot=False)
    stop = free[0][5:7]  # a string the first sample contains
    pieces = {0: [], 1: []}
    cut = complete(model, tok, ["ab", "x"], max_new_tokens=30, temperature=0, stop=[stop],
                   stop_at_eot=False, on_text=lambda r, s: pieces[r].append(s))
    assert cut[0] == free[0][: free[0].index(stop)]
    assert stop not in cut[0] and stop not in "".join(pieces[0])
    assert cut[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    assert ["".join(pieces[r]) for r in (0, 1)] == cut


def test_print_samples_streams_one_and_numbers_many(tmp_path):
    path, _ = _checkpoint(tmp_path)
    out = io.StringIO()
    print_samples(path, prompt="hi", n=1, max_new_tokens=12, temperature=0, out=out)
    one = out.getvalue()
    assert one.startswith("hi") and "--- sample" not in one
    out = io.StringIO()
    print_samples(path, prompt=["hi", "yo"], n=2, max_new_tokens=12, temperature=0, out=out,
                  batch_size=3)
    text = out.getvalue()
    assert [f"--- sample {i} ---" in text for i in (1, 2, 3, 4)] == [True] * 4
    # greedy: the same prompt gives the same sample alone or in a padded batch
    assert f"--- sample 1 ---\n{one}" in text


def test_slm_sample_cli(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    args = ["sample", str(path), "--prompt", "ab", "--max-new-tokens", "16", "--seed", "3"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == a and a.startswith("ab")
    assert main([*args, "--prompt", "cd", "--num-samples", "2", "--stop", "zz"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 4
    assert main(["sample", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_cache_takes_the_dtype_of_the_keys():
    """FSDP's final samples: the weights reported float32 (a resharded shard) while the keys
    were bf16; a cache made in the weights' dtype made attention mix the two and crash."""
    model = tiny_model()
    cache = KVCache(model.cfg, 1, 8, "cpu")
    k = torch.randn(1, model.cfg.n_head, 3, model.cfg.head_dim, dtype=torch.bfloat16)
    keys, values = cache.update(0, k, k)
    assert keys.dtype == values.dtype == torch.bfloat16 and torch.equal(keys, k)
