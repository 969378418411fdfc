"""`slm export --to gguf`: a file that transformers' GGUF reader (not ours) turns back into the
same model, tokenizer and chat template."""

from __future__ import annotations

import copy

import pytest
import torch

from src.cli import main
from src.data.tokenizer import EOT, GPT2Tokenizer
from src.tools.gguf import export_gguf, rope_interleave
from tests.test_export import MODERN, TEXT, make_tokenizer, ours, save_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

# Shapes transformers' GGUF reader can rebuild: it takes GPT-2's position count from its own
# default (1024) rather than the file, and Qwen3's head size likewise (128). llama.cpp reads both.
GPT2 = dict(block_size=1024)
LLAMA = dict(MODERN, bias=False)
QWEN3 = dict(MODERN, bias=False, qk_norm=True, n_embd=256)  # 2 heads of 128


def load_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf(path):
    """(model, tokenizer) as transformers reads the file."""
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), load_tokenizer(path)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind,opts,arch", [
    ("bpe", GPT2, "GPT2LMHeadModel"),
    ("bytes", dict(GPT2, bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    ("bytes", LLAMA, "LlamaForCausalLM"),  # 257 tokens in 320 rows: the padding is dropped
    ("bpe", dict(LLAMA, tie_embeddings=False, rope_theta=500.0), "LlamaForCausalLM"),
    ("bpe", QWEN3, "Qwen3ForCausalLM"),
])
def test_transformers_reads_the_gguf_as_the_same_model(tmp_path, capsys, kind, opts, arch):
    tok = make_tokenizer(kind)
    model = save_checkpoint(tmp_path / "m.pt", tok, **opts)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "m.pt"), "--to", "gguf", str(out)]) == 0
    assert f"-m {out}" in capsys.readouterr().out  # how to run it
    hf, hf_tok = load_gguf(out)
    assert type(hf).__name__ == arch
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.eot_id] + tok.encode(TEXT)  # end-of-text first, as slm samples
    assert hf_tok.decode(ids[0], skip_special_tokens=True) == TEXT
    assert hf_tok.eos_token == EOT
    ids = ids[:, :32]
    got = logits(hf, ids)
    assert got.shape[-1] == tok.vocab_size
    torch.testing.assert_close(got, ours(model, ids), atol=1e-4, rtol=0)


def rounded(model, dtype):
    """model with its matrices stored at dtype and read back, as a 16-bit GGUF holds them."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dtype).float())
    return m


@pytest.mark.parametrize("opts", [GPT2, QWEN3])
@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 6e-2)])
def test_16_bit_export_halves_the_file_and_keeps_the_logits(tmp_path, opts, dtype, tol):
    tok = make_tokenizer("bpe")
    model = save_checkpoint(tmp_path / "m.pt", tok, **opts)
    full, half = tmp_path / "full.gguf", tmp_path / "half.gguf"
    export_gguf(model, tok, full)
    assert main(["export", str(tmp_path / "m.pt"), "--to", "gguf", str(half),
                 "--dtype", dtype]) == 0
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    ids = torch.tensor([[tok.eot_id] + tok.encode(TEXT)])[:, :32]
    got = logits(load_gguf(half)[0], ids)
    # exactly our model with 16-bit matrices, and within 16-bit tolerance of the float32 one
    torch.testing.assert_close(got, ours(rounded(model, getattr(torch, dtype)), ids),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(got, ours(model, ids), atol=tol, rtol=0)


def test_chat_template_is_embedded_when_given(tmp_path):
    tok = make_tokenizer("bpe")
    model = save_checkpoint(tmp_path / "m.pt", tok, **LLAMA)
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    export_gguf(model, tok, tmp_path / "chat.gguf", chat_template=template)
    hf_tok = load_tokenizer(tmp_path / "chat.gguf")
    assert hf_tok.chat_template == template
    text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<user>hi\n<assistant>"
    export_gguf(model, tok, tmp_path / "base.gguf")
    assert load_tokenizer(tmp_path / "base.gguf").chat_template is None


def test_gpt2_kind_tokenizer_is_embedded(tmp_path):
    """The tiktoken path (GPT-2's own BPE), with a small encoding built here: GPT-2's files
    need a download."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    for word in ["re", "tu", "rn", "ret", "urn", "return", " r", " x", "de", "def", " def", "  "]:
        ranks.setdefault(word.encode(), len(ranks))
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tok = object.__new__(GPT2Tokenizer)
    tok.enc = tiktoken.Encoding("t", pat_str=pat, mergeable_ranks=ranks,
                                special_tokens={EOT: len(ranks)})
    tok.vocab_size, tok.eot_id = len(ranks) + 1, len(ranks)
    model = save_checkpoint(tmp_path / "m.pt", make_tokenizer("bytes"), vocab_size=tok.vocab_size)
    export_gguf(model, tok, tmp_path / "m.gguf")
    hf_tok = load_tokenizer(tmp_path / "m.gguf")
    for text in [TEXT, "def undefined(): return  x"]:
        assert hf_tok(text).input_ids == [tok.eot_id] + tok.enc.encode_ordinary(text)


def test_rope_permutation_turns_half_rotation_into_llama_cpp_pairs():
    """llama.cpp's `llama` rotates (x[2i], x[2i+1]) by pos * theta^(-2i/D); ours rotates
    (x[i], x[i + D/2]) by the same angle. Permuted rows, rotated llama.cpp's way, are our
    rotation permuted: attention scores (dot products of queries and keys) are unchanged."""
    H, D, pos, theta = 3, 8, 5, 10000.0
    angle = pos * theta ** (-torch.arange(0, D, 2).double() / D)  # (D/2,)
    cos, sin = angle.cos(), angle.sin()
    x = torch.randn(H * D, dtype=torch.float64)

    def ours_(v):  # per head: first half with second half
        a, b = v.view(H, D).chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).reshape(-1)

    def llama_cpp(v):  # per head: adjacent pairs
        a, b = v.view(H, D // 2, 2).unbind(-1)
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).reshape(-1)

    torch.testing.assert_close(llama_cpp(rope_interleave(x, H)), rope_interleave(ours_(x), H))
    assert not torch.allclose(llama_cpp(x), ours_(x))  # without it the rotations differ
    w = torch.randn(H * D, 4)  # a weight matrix permutes by rows, like the vector
    torch.testing.assert_close(rope_interleave(w, H) @ torch.ones(4),
                               rope_interleave(w @ torch.ones(4), H))


def test_an_existing_file_is_kept_unless_force(tmp_path, capsys):
    tok = make_tokenizer("bytes")
    save_checkpoint(tmp_path / "m.pt", tok)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    cmd = ["export", str(tmp_path / "m.pt"), "--to", "gguf", str(out)]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    assert main([*cmd, "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kind,opts,named", [
    ("char", {}, "char tokenizer"),
    ("bytes", dict(mlp="relu2"), "model.mlp: relu2"),
    ("bytes", dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", value_embeds=True,
                   unet_skips=True), "model.value_embeds: true and model.unet_skips: true"),
])
def test_what_gguf_cannot_hold_is_refused_by_name(tmp_path, capsys, kind, opts, named):
    save_checkpoint(tmp_path / "m.pt", make_tokenizer(kind), **opts)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "m.pt"), "--to", "gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_float16_refuses_weights_beyond_its_range(tmp_path):
    from src.errors import SLMError

    tok = make_tokenizer("bytes")
    model = save_checkpoint(tmp_path / "m.pt", tok)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5
    with pytest.raises(SLMError, match="bfloat16 or float32"):
        export_gguf(model, tok, tmp_path / "m.gguf", dtype=torch.float16)
    assert not (tmp_path / "m.gguf").exists()
    export_gguf(model, tok, tmp_path / "m.gguf", dtype=torch.bfloat16)  # its range is float32's


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    save_checkpoint(tmp_path / "m.pt", make_tokenizer("bytes"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert main(["export", str(tmp_path / "m.pt"), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    assert "pip install gguf" in capsys.readouterr().err
