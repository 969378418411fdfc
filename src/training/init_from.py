"""`model.init_from`: start from GPT-2's weights, a Hugging Face model folder, or an slm model.

    model:
      init_from: gpt2            # gpt2 | gpt2-medium | gpt2-large | gpt2-xl (from the hub, cached)
      init_from: path/to/folder  # a transformers model folder (save_pretrained)
      init_from: path/to/x.pt    # an slm checkpoint, model file or .safetensors export
      init_from: tiny            # a run name: <data_root>/models/tiny_final.pt

Chat fine-tuning (data.format: chat) adds the chat tokens to a bytes, char or gpt2 tokenizer that
lacks them; the source's embedding (and output layer) then grows by their rows, initialised to the
mean of the others.

The source fixes the model's shape; the name maps between layouts are src/model/hf.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from src import checkpoint as ckpt
from src.errors import SLMError
from src.model.gpt import GPTConfig, shape_of
from src.model.hf import GPT2_SIZES, HUB_ORG, from_hf, shape_from_hf
from src.training.groups import is_token_embedding


def read_hf_folder(path: str | Path, weights: bool = True) -> tuple[dict, dict]:
    """(config dict, state dict) of a saved transformers model folder (safetensors or .bin)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SLMError(f"{path}: no readable config.json ({e}); is it a Hugging Face model "
                       "folder (saved with save_pretrained)?") from None
    if not weights:
        return config, {}
    files = []
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            names = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            files = [path / n for n in names]
        elif (path / single).is_file():
            files = [path / single]
        if files:
            break
    if not files:
        raise SLMError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
    sd = {}
    for f in files:
        sd |= ckpt.load_tensors(f)
    return config, sd


def fetch_gpt2(name: str) -> Path:
    """Download (once; cached by huggingface_hub) GPT-2's config and safetensors weights."""
    repo = f"{HUB_ORG}/{name}"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except ImportError:
        raise SLMError("model.init_from gpt2*: needs the huggingface_hub package "
                       "(pip install huggingface_hub)") from None
    except Exception as e:  # offline, hub errors, missing cache
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SLMError(
            f"model.init_from {name}: could not get {repo} from the Hugging Face hub ({why}). "
            f"Connect once (it is cached in {os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
            f"or save it elsewhere with transformers' save_pretrained and set model.init_from to "
            "that folder"
        ) from None


def _gpt2_config(name: str) -> dict:
    n_layer, n_head, n_embd = GPT2_SIZES[name]
    return {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "n_positions": 1024, "vocab_size": 50257}


def source_path(src: str, root) -> str:
    """model.init_from with a run name resolved to <root>/models/<name>_final.pt (when that file
    exists and src is not itself a path)."""
    if src in GPT2_SIZES or Path(src).expanduser().exists() or root is None:
        return src
    final = Path(root) / "models" / f"{src}_final.pt"
    return str(final) if final.is_file() else src


def source_tokenizer(src: str, root):
    """The tokenizer of an slm model named by model.init_from (None for other sources)."""
    from src.data.tokenizer import GPT2Tokenizer, from_dict

    if src in GPT2_SIZES:
        return GPT2Tokenizer()
    path = Path(source_path(src, root)).expanduser()
    if not path.exists():
        raise SLMError(_missing(src, root))
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        return ckpt.read_safetensors(path, False)[2]
    state = ckpt.load(path)
    return from_dict(state["tokenizer"], str(path)) if "tokenizer" in state else None


def _read_slm(path: Path, weights: bool) -> tuple[dict, dict | None, str | None]:
    """(model config, state dict, tokenizer id) of an slm checkpoint or safetensors export."""
    if path.suffix == ".safetensors":
        cfg, sd, tok = ckpt.read_safetensors(path, weights)
        return cfg["model"], sd, tok.id
    state = ckpt.load(path, mmap=not weights)  # shape only: the tensors are never read
    tid = state.get("tokenizer_id")
    if "tokenizer" in state:  # a chat tokenizer built on this one is the same tokenizer
        from src.data.tokenizer import from_dict, with_chat

        try:
            tid = [tid, with_chat(from_dict(state["tokenizer"])).id]
        except SLMError:  # a bpe without chat tokens; gpt2's files offline
            pass
    return state["config"]["model"], state["model_state_dict"] if weights else None, tid


def _read_source(src: str, weights: bool) -> tuple | None:
    """(shape, HF state dict, slm state dict, slm tokenizer id(s)) of a resolved init_from
    source, the state dicts None without weights; None when there is no such source here."""
    path = Path(src).expanduser()
    if src in GPT2_SIZES:
        hf_cfg, hf_sd = read_hf_folder(fetch_gpt2(src)) if weights else (_gpt2_config(src), None)
    elif path.is_dir():
        hf_cfg, hf_sd = read_hf_folder(path, weights)
    elif path.is_file():
        mc, slm_sd, slm_tok = _read_slm(path, weights)
        return shape_of(mc), None, slm_sd, slm_tok
    else:
        return None
    return shape_from_hf(hf_cfg, f"model.init_from {src}"), hf_sd, None, None


def with_source_shape(cfg, root=None, strict: bool = False) -> tuple:
    """(cfg with the shape model.init_from's source gives, None), reading no weights: for the
    checks before any data work and for estimates (--dry-run, `slm cost`, launches). A source
    not on this machine (a run trained on the Modal volume, say) gives (cfg unchanged, a note),
    or with strict the error training would meet later. A seq_len the source cannot take is
    refused."""
    if not cfg.model.init_from:
        return cfg, None
    src = source_path(cfg.model.init_from, root)
    read = _read_source(src, False)
    if read is None and strict:
        raise SLMError(_missing(src, root))
    if read is None:
        return cfg, (f"model.init_from {src} is not on this machine: the estimate uses the "
                     "config's own model keys, not the shape that run will load")
    m = cfg.model
    shape = {k: v for k, v in read[0].items() if k not in m.model_fields_set or k == "vocab_size"}
    m = GPTConfig.model_validate({**m.model_dump(), **shape})
    _check_seq_len(cfg, m, src)
    return cfg.model_copy(update={"model": m}), None


def _check_seq_len(cfg, m, src: str) -> None:
    if (cfg.training.seq_len or 0) > m.block_size:
        raise SLMError(f"training.seq_len: {cfg.training.seq_len} is longer than the "
                       f"{m.block_size}-token block_size of model.init_from {src}; set "
                       f"training.seq_len to {m.block_size} or less")


def _missing(src: str, root) -> str:
    if Path(src).suffix in (".pt", ".safetensors") or "/" in src or "\\" in src:
        return f"model.init_from {src!r}: no such file or folder; check the path"
    where = f" nor a run with {Path(root) / 'models' / (src + '_final.pt')}" if root else ""
    return (f"model.init_from {src!r}: not one of {', '.join(GPT2_SIZES)} nor an existing path "
            f"(a Hugging Face model folder or an slm checkpoint){where}; train that run first "
            "or fix the name")


def grow_vocab(sd: dict, vocab: int) -> dict:
    """Token-table (and untied output) rows added up to vocab, set to the mean of the others."""
    out = dict(sd)
    for k in [k for k in out if is_token_embedding(k) or k == "lm_head.weight"]:
        if out[k].shape[0] < vocab:
            w = out[k]
            extra = w.mean(0, keepdim=True).expand(vocab - w.shape[0], -1)
            out[k] = torch.cat([w, extra])
    return out


def resolve_init(cfg, tok, load_weights: bool = True, log=print, root=None) -> dict | None:
    """Apply `model.init_from` to cfg.model (its shape keys) and return the weights to load.

    The source fixes the model's shape: keys the config leaves out are taken from it, keys it
    sets must agree (block_size may be smaller: positions are cropped). Its vocab must be the
    tokenizer's. load_weights=False only sets the shape (resuming: the checkpoint has weights).
    """
    src, m = source_path(cfg.model.init_from, root), cfg.model
    if src in GPT2_SIZES and tok.kind != "gpt2":
        raise SLMError(f"model.init_from {src} needs data.tokenizer: gpt2 (GPT-2's weights "
                       f"expect its 50257 token ids); this config uses {tok.kind}")
    read = _read_source(src, load_weights)
    if read is None:
        raise SLMError(_missing(src, root))
    shape, hf_sd, slm_sd, slm_tok = read
    if slm_tok is not None and tok.id not in (slm_tok if isinstance(slm_tok, list) else [slm_tok]):
        raise SLMError(f"model.init_from {src}: that model was trained with another tokenizer "
                       "than this config's data; use the same data.tokenizer and source")

    # chat tokens appended to a bytes/char/gpt2 vocab: the embedding grows
    grow = getattr(tok, "chat", False) and shape["vocab_size"] == tok.vocab_size - 2
    if grow:
        shape = {**shape, "vocab_size": tok.vocab_size}
    if shape["vocab_size"] != tok.vocab_size:
        raise SLMError(f"model.init_from {src}: its vocab has {shape['vocab_size']} tokens, this "
                       f"config's {tok.kind} tokenizer {tok.vocab_size}; use the tokenizer the "
                       "model was trained with")
    conflicts = []
    for k, v in shape.items():
        ours = getattr(m, k)
        if k not in m.model_fields_set or ours == v or k == "vocab_size":
            continue
        if k == "block_size" and (ours < v or shape["pos_emb"] == "rope"):
            continue  # fewer positions: cropped
        if k in ("mlp_ratio", "rope_theta") and abs(ours - v) < 1e-9:
            continue
        conflicts.append(f"model.{k}: {ours} here, {v} in {src}")
    if conflicts:
        raise SLMError("model.init_from fixes the model's shape, and the config disagrees: "
                       + "; ".join(conflicts)
                       + ". Remove these keys from the config (or match them)")
    updates = {k: v for k, v in shape.items() if k not in m.model_fields_set or k == "vocab_size"}
    vocab, multiple = shape["vocab_size"], updates.get("pad_vocab_multiple", m.pad_vocab_multiple)
    if "pad_vocab_multiple" not in shape and vocab % multiple:
        # padded rows would add untrained logits to the softmax: keep the source's exact vocab
        if "pad_vocab_multiple" in m.model_fields_set and multiple != 1:
            raise SLMError(f"model.pad_vocab_multiple: {multiple} would add untrained rows to "
                           f"{src}'s {vocab} tokens; remove the key")
        updates["pad_vocab_multiple"] = 1
    cfg.model = m = GPTConfig.model_validate({**m.model_dump(), **updates})
    _check_seq_len(cfg, m, src)
    if not load_weights:
        return None
    log(f"model.init_from {src}: {m.n_layer} layers, {m.n_embd} wide, vocab {m.vocab_size}")
    if grow:
        slm_sd = grow_vocab(slm_sd, m.padded_vocab) if slm_sd is not None else None
    if slm_sd is not None:
        if m.block_size < shape["block_size"] and "transformer.wpe.weight" in slm_sd:
            slm_sd = {**slm_sd, "transformer.wpe.weight": slm_sd["transformer.wpe.weight"][
                : m.block_size]}
        return slm_sd
    sd = from_hf(hf_sd, m)
    return grow_vocab(sd, m.padded_vocab) if grow else sd
