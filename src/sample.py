"""Generate text from a checkpoint with its own tokenizer: `slm sample CHECKPOINT --prompt ...`."""

from __future__ import annotations

import sys

import torch

from src.data.tokenizer import from_dict
from src.errors import SLMError
from src.model.gpt import GPT
from src.training import checkpoint as ckpt
from src.training.config import config_from_dict
from src.training.hardware import resolve_device


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, config) from any slm checkpoint or final model file."""
    state = ckpt.load(path)
    missing = [k for k in ("config", "tokenizer") if k not in state]
    if missing:
        raise SLMError(
            f"{path} has no {' or '.join(missing)}: it was not written by slm, so its model "
            "cannot be rebuilt; give a checkpoint from checkpoints/<name>/ or models/"
        )
    cfg = config_from_dict(state["config"])
    model = GPT(cfg.model)
    ckpt.load_weights(model, state["model_state_dict"], path)
    dev = resolve_device(device)
    return model.to(dev).eval(), from_dict(state["tokenizer"], str(path)), cfg


def print_samples(path, prompt="", n=1, max_new_tokens=200, temperature=0.8, top_k=200,
                  top_p=None, seed=None, device="cpu", stop=None, out=sys.stdout):
    model, tok, _ = load_model(path, device)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed if seed is not None else torch.seed())
    ids = [tok.eot_id] + (tok.encode(prompt) if prompt else [])
    for i in range(n):
        if n > 1:
            print(f"--- sample {i + 1} ---", file=out)
        out.write(prompt)
        new, shown = [], ""
        for t in model.generate(torch.tensor([ids], device=dev), max_new_tokens, temperature,
                                top_k, top_p, generator=g):
            new.append(int(t))
            text = tok.decode(new)
            if stop and stop in text:
                out.write(text[len(shown): text.index(stop)])
                shown = text
                break
            out.write(text[len(shown):])  # stream as tokens arrive
            out.flush()
            shown = text
        out.write("\n")
    out.flush()
