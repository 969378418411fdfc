"""`slm export CHECKPOINT --to gguf OUT.gguf`: one file for llama.cpp and Ollama.

    slm export data/models/tiny_final.pt --to gguf exported/tiny.gguf
    slm export data/models/tiny_final.pt --to gguf exported/tiny-f16.gguf --dtype float16
    llama-completion -m exported/tiny.gguf -no-cnv -p "def main(" -n 64   # llama.cpp

The file holds the weights, the shape (llama.cpp's metadata keys) and the tokenizer (byte-level
BPE, llama.cpp's "gpt2" tokenizer model), and the chat template when one is given. The
architectures are the ones `--to hf` uses (src/model/hf.py): GPT-2-style models become llama.cpp's
`gpt2`, rope + rmsnorm + swiglu models `llama`, and with qk_norm `qwen3`. llama.cpp's `llama`
rotates interleaved pairs where ours (and transformers') rotate the two halves of each head, so
the query and key rows are permuted for it, as llama.cpp's own converter does.

--dtype float16 or bfloat16 stores the matrices in 16 bits (about half the file); vectors (norms,
biases) stay float32, as llama.cpp's converter keeps them. Needs the `gguf` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from src.data.tokenizer import EOT
from src.errors import SLMError
from src.model.hf import LN_EPS, RMS_EPS, architecture, to_hf

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
F16_MAX = 65504.0


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SLMError("--to gguf needs the gguf package: pip install gguf "
                       "(or pip install -e '.[hf]')") from None
    return gguf


def export_gguf(model, tok, out_path, dtype=torch.float32, chat_template: str | None = None,
                force: bool = False, name: str = "slm") -> Path:
    """Write model and tokenizer as one GGUF file; refuses to replace one unless force."""
    _gguf()  # missing package: say so before any work
    out = Path(out_path)
    if out.suffix != ".gguf":
        out = out.with_name(out.name + ".gguf")
    if out.is_dir():
        raise SLMError(f"{out} is a folder; give the .gguf file to write, e.g. {out}/model.gguf")
    if out.exists() and not force:
        raise SLMError(f"{out} already exists; pass --force to overwrite it, or choose another name")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SLMError(f"--to gguf: dtype {dtype} is not supported; use float32, float16 or "
                       "bfloat16")
    arch = architecture(model.cfg)  # refuses option mixes llama.cpp has no architecture for
    tokens, types, merges = gguf_vocab(tok, model.cfg.vocab_size)
    tensors = gguf_tensors(model, arch)

    writer = _writer_class()(None, arch)
    _write_shape(writer, model.cfg, arch, name, dtype)
    _write_tokenizer(writer, tok, tokens, types, merges, chat_template)
    for tname, t in tensors.items():
        array, raw = _array(t, dtype, tname)
        writer.add_tensor(tname, array, raw_dtype=raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:  # written beside, then renamed: a crash never leaves a half file under the real name
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        big = sum(t.numel() for t in tensors.values()) > 50_000_000
        writer.write_tensors_to_file(progress=big)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- metadata


def _writer_class():
    """gguf's writer, plus empty arrays, which the format allows and it refuses."""
    gguf = _gguf()

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _write_shape(w, cfg, arch: str, name: str, dtype) -> None:
    """llama.cpp's hyperparameter keys for arch (the ones its converter writes)."""
    gguf = _gguf()
    w.add_name(name)
    w.add_file_type({torch.float32: gguf.LlamaFileType.ALL_F32,
                     torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                     torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(LN_EPS)
        return
    w.add_head_count_kv(cfg.n_head)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)


def gguf_vocab(tok, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level tokenizer, n_vocab entries long."""
    from src.data.tokenizer import tokenizers_object

    gguf = _gguf()
    if tok.kind == "char":
        raise SLMError("--to gguf: a char tokenizer cannot be exported (llama.cpp reads text as "
                       "bytes through byte-level BPE); train with data.tokenizer: bpe, gpt2 or "
                       "bytes, or use --to hf or --to safetensors")
    obj = tokenizers_object(tok)
    vocab = obj.get_vocab(with_added_tokens=True)
    if obj.token_to_id(EOT) != tok.eot_id or max(vocab.values()) >= n_vocab:
        raise SLMError(f"--to gguf: the tokenizer ({len(vocab)} tokens, {EOT} at "
                       f"{obj.token_to_id(EOT)}) does not match the model's vocab of {n_vocab} "
                       f"with {EOT} at {tok.eot_id}; please report this")
    special = {t.content for t in obj.get_added_tokens_decoder().values() if t.special}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # ids no text maps to, as llama.cpp names them
    types = [gguf.TokenType.USER_DEFINED] * n_vocab
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = gguf.TokenType.CONTROL if s in special else gguf.TokenType.NORMAL
    raw = json.loads(obj.to_str())["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw]
    return tokens, [int(t) for t in types], merges


def _write_tokenizer(w, tok, tokens, types, merges, chat_template) -> None:
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split pattern, which ours use (ByteLevel use_regex)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf = _gguf()  # llama.cpp needs the key even with no merges (the bytes tokenizer)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    w.add_pad_token_id(tok.eot_id)
    w.add_add_bos_token(True)  # documents follow an end-of-text in training, as `slm sample`
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


# ----------------------------------------------------------------------------- tensors


def rope_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Query/key rows from rotate-half order (x_i paired with x_{i+D/2}) to llama.cpp's `llama`
    order (pairs adjacent): per head, row 2i+j takes row j*D/2+i."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names and in the layouts arch expects."""
    gguf = _gguf()
    cfg = model.cfg
    hf = to_hf(model.state_dict(), cfg)  # transformers' names: gguf maps them to llama.cpp's
    if cfg.tie_embeddings:
        del hf["lm_head.weight"]  # no output.weight: llama.cpp reuses the token embedding
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, cfg.n_layer)
    out = {}
    for k, v in hf.items():
        if arch == "gpt2" and k.endswith(_CONV1D):
            v = v.t()  # back from transformers' Conv1D to (out, in), which llama.cpp reads
        if arch == "llama" and (".q_proj." in k or ".k_proj." in k):
            v = rope_interleave(v, cfg.n_head)
        gname = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise SLMError(f"--to gguf: no llama.cpp name for {k}; please report this")
        out[gname] = v.detach().float().contiguous()
    return out


def _array(t: torch.Tensor, dtype, name: str):
    """(numpy array, raw GGML type or None) of one tensor at the export precision."""
    if t.dim() <= 1 or dtype == torch.float32:
        return t.numpy(), None
    if dtype == torch.float16:
        if t.abs().max() > F16_MAX:
            raise SLMError(f"--dtype float16: {name} has values beyond float16's range "
                           f"(±{F16_MAX:g}); use --dtype bfloat16 or float32")
        return t.half().numpy(), None
    # numpy has no bfloat16: hand the raw 16-bit patterns over, typed as BF16
    return t.bfloat16().view(torch.int16).numpy(), _gguf().GGMLQuantizationType.BF16
