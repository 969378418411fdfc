"""Export to transformers / safetensors and import (model.init_from): the same logits everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from src import checkpoint as ckpt
from src.checkpoint import load_model
from src.cli import main
from src.data.tokenizer import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    tiktoken_to_tokenizers,
)
from src.errors import SLMError
from src.model.gpt import GPT
from src.model.hf import from_hf, shape_from_hf
from src.tools.export import export_hf
from src.training.config import apply_overrides, read_yaml, validate_config
from src.training.init_from import resolve_init
from src.training.trainer import train
from tests.conftest import FAST, ROOT

transformers = pytest.importorskip("transformers")
TEXT = "def main(x):\n    return x + 1  # é ü 😀\n\nclass A:\n    pass\n"
MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer(kind):
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer("".join(sorted(set(TEXT))))
    return BPETokenizer.train([TEXT] * 20, 300)


def save_checkpoint(path, tok, seed=0, **model):
    """An slm checkpoint holding a tiny model with random (non-zero) weights everywhere."""
    data = {"tokenizer": tok.kind}
    if tok.kind == "bpe":
        data["vocab_size"] = tok.vocab_size
    cfg = validate_config({"name": "t", "data": data, "model": {
        "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32,
        "vocab_size": tok.vocab_size, **model}})
    torch.manual_seed(seed)
    m = GPT(cfg.model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms too, so none is trivially 0/1
    ckpt.save({"model_state_dict": m.state_dict(), "config": cfg.to_dict(),
               "tokenizer": tok.to_dict()}, path)
    return m.eval()


def hf_logits(folder, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(ids).logits, type(hf).__name__


def ours(model, ids):
    with torch.no_grad():
        return model(ids)[0][..., : model.cfg.vocab_size]


@pytest.mark.parametrize("kind", ["bpe", "bytes", "char"])
def test_hf_export_gives_the_same_logits_and_tokens(tmp_path, kind, capsys):
    tok = make_tokenizer(kind)
    model = save_checkpoint(tmp_path / "m.pt", tok)
    if kind == "bytes":  # 257 tokens, 320 rows: the padding is dropped
        assert model.cfg.padded_vocab == 320
    assert main(["export", str(tmp_path / "m.pt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(TEXT)
    assert hf_tok.decode(ids[0]) == TEXT
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == tok.eot_id
    ids = ids[:, :32]
    got, arch = hf_logits(tmp_path / "hf", ids)
    assert arch == "GPT2LMHeadModel" and got.shape[-1] == tok.vocab_size
    torch.testing.assert_close(got, ours(model, ids))


@pytest.mark.parametrize("opts,arch", [
    (dict(MODERN, bias=False), "LlamaForCausalLM"),
    (dict(MODERN, bias=True, tie_embeddings=False), "LlamaForCausalLM"),
    (dict(MODERN, bias=False, qk_norm=True, rope_theta=500.0), "Qwen3ForCausalLM"),
    (dict(bias=False, tie_embeddings=False, mlp_ratio=3.0), "GPT2LMHeadModel"),
])
def test_modern_options_export_to_the_matching_architecture(tmp_path, opts, arch):
    tok = ByteTokenizer()
    model = save_checkpoint(tmp_path / "m.pt", tok, **opts)
    export_hf(model, tok, tmp_path / "hf")
    ids = torch.randint(0, 257, (2, 32))
    got, name = hf_logits(tmp_path / "hf", ids)
    assert name == arch
    torch.testing.assert_close(got, ours(model, ids))
    # and back: the folder imports as the same model
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    from src.model.gpt import GPTConfig

    back = GPT(GPTConfig(**shape_from_hf(cfg, "t"), pad_vocab_multiple=1)).eval()
    from safetensors.torch import load_file

    back.load_state_dict(from_hf(load_file(tmp_path / "hf" / "model.safetensors"), back.cfg))
    torch.testing.assert_close(ours(back, ids), got)


@pytest.mark.parametrize("opts,named", [
    (dict(mlp="relu2"), "model.mlp: relu2"),
    (dict(pos_emb="rope"), "model.norm: layernorm, model.mlp: gelu"),
    (dict(qk_norm=True), "model.qk_norm: True"),
    (dict(MODERN, qk_norm=True, bias=True), "model.bias: true with qk_norm"),
    (dict(MODERN, value_embeds=True), "model.value_embeds: true"),
    (dict(MODERN, unet_skips=True), "model.unet_skips: true"),
])
def test_options_without_an_equivalent_are_refused_by_name(tmp_path, capsys, opts, named):
    save_checkpoint(tmp_path / "m.pt", ByteTokenizer(), **opts)
    assert main(["export", str(tmp_path / "m.pt"), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert named in err and "--to safetensors" in err
    assert not (tmp_path / "hf").exists()


def test_safetensors_export_is_weights_plus_json_and_loads_back(tmp_path, capsys):
    tok = make_tokenizer("bpe")
    model = save_checkpoint(tmp_path / "m.pt", tok, mlp="relu2")  # any options
    assert main(["export", str(tmp_path / "m.pt"), "--to", "safetensors",
                 str(tmp_path / "out" / "tiny")]) == 0
    st, side = tmp_path / "out" / "tiny.safetensors", tmp_path / "out" / "tiny.json"
    from safetensors.torch import load_file

    weights = load_file(st)
    assert "lm_head.weight" not in weights  # tied: stored once
    assert set(weights) == set(model.state_dict()) - {"lm_head.weight"}
    meta = json.loads(side.read_text())
    assert meta["config"]["model"]["mlp"] == "relu2" and meta["tokenizer"]["kind"] == "bpe"
    back, back_tok, _ = load_model(st)
    ids = torch.tensor([tok.encode(TEXT)[:32]])
    torch.testing.assert_close(ours(back, ids), ours(model, ids))
    assert back_tok.id == tok.id
    assert main(["sample", str(st), "--max-new-tokens", "4", "--seed", "1"]) == 0


def test_tiktoken_encodings_convert_to_the_same_tokens():
    tiktoken = pytest.importorskip("tiktoken")
    # a small GPT-2-style encoding: bytes in a shuffled order, then merges (ranks = ids), each
    # token reachable from two earlier ones as in a trained BPE
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    words = ["re", "tu", "rn", "ret", "urn", "retu", "return", " r", " x", "de", "def", " def"]
    for word in [*words, "  "]:
        ranks.setdefault(word.encode(), len(ranks))
    pat = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    enc = tiktoken.Encoding("t", pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={EOT: len(ranks)})
    hf = tiktoken_to_tokenizers(enc)
    for text in [TEXT, "return returned  def undefined rx", "re tu rn ret urn"]:
        assert hf.encode(text).ids == enc.encode_ordinary(text)
        assert hf.decode(hf.encode(text).ids) == text
    assert hf.token_to_id(EOT) == len(ranks)


# ----------------------------------------------------------------------------- import


def tiny_gpt2(folder, vocab=257, **kw):
    """A randomly initialised transformers GPT2LMHeadModel saved like a hub download."""
    torch.manual_seed(1)
    conf = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2,
                                   n_head=2, bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kw)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    hf.save_pretrained(folder)
    return hf


def fast_config(corpus, **kw):
    o = {**FAST, "data.source": str(corpus), "data.tokenizer": "bytes", "training.threads": 1,
         "training.num_samples": 0, **kw}
    raw = apply_overrides(read_yaml(ROOT / "configs" / "tiny.yaml"), o)
    raw["data"].pop("vocab_size")  # the bytes tokenizer has a fixed vocab
    return validate_config(raw)


def test_import_then_export_round_trip_gives_the_same_logits(tmp_path, corpus):
    hf = tiny_gpt2(tmp_path / "src")
    cfg = fast_config(corpus, **{"model.init_from": str(tmp_path / "src")})
    sd = resolve_init(cfg, ByteTokenizer(), log=lambda *a: None)
    assert cfg.model.pad_vocab_multiple == 1  # 257 rows exactly: no untrained padding
    model = GPT(cfg.model).eval()
    model.load_state_dict(sd)
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(ours(model, ids), want)
    export_hf(model, ByteTokenizer(), tmp_path / "out")
    got, _ = hf_logits(tmp_path / "out", ids)
    torch.testing.assert_close(got, want)


def test_init_from_checks_shape_and_tokenizer(tmp_path, corpus):
    tiny_gpt2(tmp_path / "src")
    # the config sets a different width: named, with the fix
    cfg = fast_config(corpus, **{"model.init_from": str(tmp_path / "src"), "model.n_embd": 32})
    with pytest.raises(SLMError, match=r"model.n_embd: 32 here, 64 in"):
        resolve_init(cfg, ByteTokenizer())
    # a smaller block_size crops the positions; keys the config leaves out come from the source
    cfg = fast_config(corpus, **{"model.init_from": str(tmp_path / "src"), "model.block_size": 16})
    sd = resolve_init(cfg, ByteTokenizer(), log=lambda *a: None)
    assert sd["transformer.wpe.weight"].shape == (16, 64) and cfg.model.block_size == 16
    # another tokenizer's ids
    cfg = fast_config(corpus, **{"model.init_from": str(tmp_path / "src")})
    with pytest.raises(SLMError, match="its vocab has 257 tokens"):
        resolve_init(cfg, make_tokenizer("bpe"))
    cfg = fast_config(corpus, **{"model.init_from": "gpt2"})
    with pytest.raises(SLMError, match="needs data.tokenizer: gpt2"):
        resolve_init(cfg, ByteTokenizer())
    cfg = fast_config(corpus, **{"model.init_from": "nothing"})  # a run name: which run
    with pytest.raises(SLMError, match="not one of gpt2, gpt2-medium.*train that run first"):
        resolve_init(cfg, ByteTokenizer(), root=tmp_path)
    for path in (tmp_path / "nothing", tmp_path / "model.pt", "gone.safetensors"):  # a path
        cfg = fast_config(corpus, **{"model.init_from": str(path)})
        with pytest.raises(SLMError, match="no such file or folder"):
            resolve_init(cfg, ByteTokenizer(), root=tmp_path)


def test_gpt2_from_the_hub_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cfg = validate_config({"name": "t", "data": {"tokenizer": "gpt2"},
                           "model": {"init_from": "gpt2-medium"}})

    class GPT2Ids:  # GPT-2's tokenizer identity (its files need the network too)
        kind, vocab_size, id = "gpt2", 50257, "gpt2"

    with pytest.raises(SLMError, match="could not get openai-community/gpt2-medium"):
        resolve_init(cfg, GPT2Ids(), log=lambda *a: None)
    # resuming needs only the shape, known without the network
    assert resolve_init(cfg, GPT2Ids(), load_weights=False) is None
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (24, 16, 1024, 1024)
    assert (m.vocab_size, m.padded_vocab) == (50257, 50257)


def test_training_starts_from_the_imported_weights(tmp_path, corpus):
    hf = tiny_gpt2(tmp_path / "src")
    cfg = fast_config(corpus, **{
        "model.init_from": str(tmp_path / "src"), "model.dropout": 0.0, "training.max_steps": 1,
        "training.learning_rate": 1e-9, "training.warmup_steps": 0, "training.weight_decay": 0.0})
    res = train(cfg, data_root=tmp_path / "data", device="cpu", use_wandb=False,
                log=lambda *a: None)
    model, _, saved = load_model(res.model_path)
    assert saved["model"]["init_from"] == str(tmp_path / "src") and saved["model"]["pad_vocab_multiple"] == 1
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(ours(model, ids), want, atol=1e-4, rtol=1e-4)  # one step of lr 1e-9
    # resuming the finished run re-applies the source's shape and finds it complete
    again = train(cfg, data_root=tmp_path / "data", device="cpu", use_wandb=False,
                  log=lambda *a: None)
    assert again.step == 1
