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
docs/gguf.md).

Every form refuses to replace what is already there (an existing file, or a non-empty folder
for --to hf) unless --force. Needs the `gguf` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from src import validate
from src.checkpoint import load_model, safetensors_target, save_safetensors
from src.data.chat import CHAT_TEMPLATE
from src.data.tokenizer import CHAT_TOKENS, EOT, tokenizers_object
from src.errors import SLMError
from src.model.hf import hf_config, to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint, out, to: str, dtype: str = "float32", force: bool = False) -> str:
    """`slm export`: write a checkpoint in another format; returns what to tell the user."""
    if dtype not in DTYPES:
        raise SLMError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if to not in ("hf", "safetensors", "gguf"):
        raise SLMError(f"--to {to}: use hf, safetensors or gguf")
    if to == "hf":  # every target is checked before the model is read
        validate.empty_folder(out, "export folder", force)
    elif to == "gguf":
        validate.new_file(out, "export target", force)
    else:
        safetensors_target(out, force)
    model, tok, config = load_model(checkpoint, "cpu")
    if to == "hf":
        out = export_hf(model, tok, out, DTYPES[dtype])
        return (f"wrote {out} ({model.num_params() / 1e6:.2f}M params); load it with\n"
                f"  AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
                f"  AutoTokenizer.from_pretrained({str(out)!r})")
    if to == "gguf":
        from src.tools.gguf import export_gguf

        template = CHAT_TEMPLATE if getattr(tok, "chat_ids", None) is not None else None
        out = export_gguf(model, tok, out, DTYPES[dtype], chat_template=template, force=force,
                          name=config.get("name"))
        return (f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); run it with llama.cpp:\n"
                f"  llama-completion -m {out} -no-cnv -p 'Once upon a time' -n 64\n"
                "or in Ollama (a Modelfile): see docs/gguf.md")
    out = save_safetensors(model, tok, config, out, DTYPES[dtype])
    return f"wrote {out} and {out.with_suffix('.json')}"


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
    gc = out / "generation_config.json"
    if getattr(tok, "chat_ids", None) is not None and gc.is_file():  # replies end at <|im_end|>
        g = json.loads(gc.read_text())
        gc.write_text(json.dumps({**g, "eos_token_id": [tok.eot_id, tok.chat_ids[1]]}, indent=2))
    for f in out.iterdir():
        if f.is_file():
            validate.user_mode(f)
    return out


def hf_tokenizer(tok, block_size: int):
    """A transformers fast tokenizer (saved as tokenizer.json) with end-of-text as bos/eos/pad."""
    obj = tokenizers_object(tok)
    if obj.token_to_id(EOT) != tok.eot_id:
        raise SLMError(f"tokenizer export: {EOT} has id {obj.token_to_id(EOT)}, the model uses "
                       f"{tok.eot_id}; please report this")
    tf = _transformers()
    chat = {}
    if getattr(tok, "chat_ids", None) is not None:  # a chat model: its template
        chat = {"chat_template": CHAT_TEMPLATE, "additional_special_tokens": list(CHAT_TOKENS)}
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=obj, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None,
        model_max_length=block_size, clean_up_tokenization_spaces=False, **chat)
