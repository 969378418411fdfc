"""`slm export CHECKPOINT --to hf OUT_DIR | --to safetensors OUT | --to gguf OUT.gguf`: take a
model elsewhere.

    slm export data/models/tiny_final.pt --to hf exported/tiny
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
        m = AutoModelForCausalLM.from_pretrained('exported/tiny'); \\
        t = AutoTokenizer.from_pretrained('exported/tiny')"
    slm export data/models/tiny_final.pt --to safetensors exported/tiny.safetensors

--to hf writes a transformers model folder: config.json, model.safetensors, generation_config.json
and the tokenizer (tokenizer.json, tokenizer_config.json). GPT-2-style models become
GPT2LMHeadModel; rope + rmsnorm + swiglu models LlamaForCausalLM (Qwen3ForCausalLM with qk_norm);
other option mixes are refused by name (see src/model/hf.py). Needs the `transformers` package.

--to safetensors writes our own weights (model.safetensors naming as in src/model/gpt.py) and a
JSON file beside them (same name, .json) with the run's config and tokenizer; `slm sample` and
`slm eval` read the pair directly.

--to gguf writes one file for llama.cpp and Ollama (weights, tokenizer; src/tools/gguf.py and
docs/gguf.md); it refuses to replace an existing file unless --force. Needs the `gguf` package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from src.data.tokenizer import EOT, from_dict
from src.errors import SLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_FORMAT = "slm-safetensors-v1"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder, safetensors or GGUF",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_N.pt, final.pt or models/<name>_final.pt")
    p.add_argument("out", help="OUT_DIR for --to hf; a .safetensors file for --to safetensors; "
                   "a .gguf file for --to gguf (llama.cpp, Ollama: see docs/gguf.md)")
    p.add_argument("--to", required=True, choices=["hf", "safetensors", "gguf"],
                   help="output format")
    p.add_argument("--force", action="store_true", help="--to gguf: overwrite an existing OUT")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weight precision of the export (default float32, as trained)")
    p.set_defaults(fn=cmd_export)


def cmd_export(args, extra) -> int:
    if extra:
        raise SLMError(f"unknown option(s) for export: {' '.join(extra)}")
    from src.tools.sample import load_model

    model, tok, cfg = load_model(args.checkpoint, "cpu")
    if args.to == "hf":
        out = export_hf(model, tok, args.out, DTYPES[args.dtype])
        print(f"wrote {out} ({model.num_params() / 1e6:.2f}M params); load it with\n"
              f"  AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
              f"  AutoTokenizer.from_pretrained({str(out)!r})")
    elif args.to == "gguf":
        from src.tools.gguf import export_gguf

        out = export_gguf(model, tok, args.out, DTYPES[args.dtype], force=args.force, name=cfg.name)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); run it with llama.cpp:\n"
              f"  llama-completion -m {out} -no-cnv -p 'Once upon a time' -n 64\n"
              "or in Ollama (a Modelfile): see docs/gguf.md")
    else:
        out = export_safetensors(model, tok, cfg, args.out, DTYPES[args.dtype])
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


# ----------------------------------------------------------------------------- Hugging Face


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SLMError("--to hf needs the transformers package: pip install transformers "
                       "(or pip install -e '.[hf]')") from None
    transformers.utils.logging.disable_progress_bar()
    return transformers


def export_hf(model, tok, out_dir, dtype=torch.float32) -> Path:
    """Write a transformers model folder that computes the same logits as model."""
    from src.model.hf import hf_config, to_hf

    cfg = model.cfg
    conf_kw = hf_config(cfg, tok.eot_id)  # refuses unmatched options before anything is written
    hf_tok = hf_tokenizer(tok, cfg.block_size)
    tf = _transformers()
    conf = tf.AutoConfig.for_model(**conf_kw)
    hf_model = tf.AutoModelForCausalLM.from_config(conf)
    missing, unexpected = hf_model.load_state_dict(to_hf(model.state_dict(), cfg), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise SLMError(f"export to {conf.model_type}: weights do not line up (missing "
                       f"{missing[:3]}, unexpected {unexpected[:3]}); please report this")
    hf_model.to(dtype).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    tc = out / "tokenizer_config.json"  # the class name every transformers version knows
    tc.write_text(json.dumps({**json.loads(tc.read_text()),
                              "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiktoken_to_tokenizers(enc, eot: str = EOT):
    """A `tokenizers` byte-level BPE equal to a tiktoken encoding with GPT-2's split pattern."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    ranks = enc._mergeable_ranks
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731

    def last_merge(token: bytes, rank: int):
        parts = [bytes([x]) for x in token]  # replay BPE with merges ranked below this token's
        while len(parts) > 2:
            merged = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            best = min(range(len(merged)), key=merged.__getitem__)
            if merged[best] >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return parts

    vocab = {spell(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(t) > 1:
            parts = last_merge(t, r)
            if len(parts) == 2:
                merges.append((spell(parts[0]), spell(parts[1])))
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(eot, special=True)])
    return hf


def tokenizers_object(tok):
    """Our tokenizer as a Hugging Face `tokenizers.Tokenizer` with the same ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if tok.kind == "bpe":
        return Tokenizer.from_str(tok.tok.to_str())
    if tok.kind == "gpt2":
        return tiktoken_to_tokenizers(tok.enc)
    if tok.kind == "bytes":  # one token per byte, ids = byte values: BPE without merges
        b2u = bytes_to_unicode()
        hf = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)} | {EOT: 256}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    elif tok.kind == "char":  # one token per character
        if EOT in tok.stoi:
            raise SLMError("this char tokenizer cannot be exported: it has a character named "
                           f"{EOT!r}")
        hf = Tokenizer(models.BPE(vocab={**tok.stoi, EOT: tok.eot_id}, merges=[]))
        hf.decoder = decoders.Fuse()
    else:
        raise SLMError(f"tokenizer kind {tok.kind!r} cannot be exported")
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return hf


def hf_tokenizer(tok, block_size: int):
    """A transformers fast tokenizer (saved as tokenizer.json) with end-of-text as bos/eos/pad."""
    obj = tokenizers_object(tok)
    if obj.token_to_id(EOT) != tok.eot_id:
        raise SLMError(f"tokenizer export: {EOT} has id {obj.token_to_id(EOT)}, the model uses "
                       f"{tok.eot_id}; please report this")
    tf = _transformers()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=obj, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None,
        model_max_length=block_size, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- safetensors


def export_safetensors(model, tok, cfg, out, dtype=torch.float32) -> Path:
    """Our weights as safetensors (tied weights stored once) plus a .json with config and
    tokenizer."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tied = model.cfg.tie_embeddings
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, str(out), metadata={"format": "pt", "slm": SAFETENSORS_FORMAT})
    meta = {"format": SAFETENSORS_FORMAT, "config": cfg.to_dict(), "tokenizer": tok.to_dict()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return out


def read_safetensors(path, weights: bool = True):
    """(config dict, state dict or None, tokenizer) of an `--to safetensors` export."""
    path = Path(path)
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise SLMError(f"{path}: its config {side} is missing or unreadable ({e}); keep the "
                       ".json written by `slm export --to safetensors` beside the weights"
                       ) from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise SLMError(f"{side}: not written by `slm export --to safetensors`")
    sd = None
    if weights:
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(path).items()}
        if "lm_head.weight" not in sd:  # stored once when tied
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return meta["config"], sd, from_dict(meta["tokenizer"])


def load_safetensors(path):
    """(model, tokenizer, config) from an `--to safetensors` export."""
    from src.model.gpt import GPT
    from src.training.config import config_from_dict

    raw, sd, tok = read_safetensors(path)
    cfg = config_from_dict(raw)
    model = GPT(cfg.model)
    model.load_state_dict(sd)
    return model, tok, cfg
