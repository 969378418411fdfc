"""Generate text from a checkpoint with its own tokenizer: `slm sample CHECKPOINT --prompt ...`.

    slm sample data/models/tiny_final.pt --prompt "def " --max-new-tokens 200 --seed 1
    slm sample final.pt --prompt "def " --prompt "class " --num-samples 3 --stop "\\n\\n"

One sample streams as it is generated; several prompts and samples are generated together in
batches (prompts of different lengths are left-padded) and printed as each batch finishes. A
sample ends at --max-new-tokens, at the end-of-text token, or just before a --stop string.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from src.data.tokenizer import from_dict
from src.errors import SLMError
from src.model.gpt import GPT
from src import checkpoint as ckpt
from src.training.config import config_from_dict
from src.hardware import resolve_device


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, config) from any slm checkpoint, final model file, or
    `slm export --to safetensors` file."""
    if Path(path).suffix == ".safetensors":
        from src.tools.export import load_safetensors

        model, tok, cfg = load_safetensors(path)
    else:
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
        tok = from_dict(state["tokenizer"], str(path))
    dev = resolve_device(device)
    return model.to(dev).eval(), tok, cfg


def encode_prompts(tok, prompts: Sequence[str], device="cpu"):
    """(idx (B, T), pad (B,)): each prompt after an end-of-text token, left-padded to one length."""
    rows = [[tok.eot_id] + (tok.encode(p) if p else []) for p in prompts]
    width = max(len(r) for r in rows)
    pad = [width - len(r) for r in rows]
    idx = [[tok.eot_id] * n + r for n, r in zip(pad, rows, strict=True)]
    return torch.tensor(idx, device=device), torch.tensor(pad, device=device)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text not yet safe to show: an unfinished UTF-8 character, or the
    start of a stop string that the next tokens may complete."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def complete(model, tok, prompts: Sequence[str], max_new_tokens=200, temperature=0.8, top_k=200,
             top_p=None, seed=None, generator=None, stop: Sequence[str] = (), stop_at_eot=True,
             on_text: Callable[[int, str], None] | None = None, use_cache=True) -> list[str]:
    """Generate a continuation of every prompt in one batch; returns the new text of each.

    on_text(row, piece) receives each row's text as soon as it is safe to show (streaming).
    """
    dev = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else torch.seed())
    stop = [s for s in stop if s]
    idx, pad = encode_prompts(tok, prompts, dev)
    B = len(prompts)
    ids: list[list[int]] = [[] for _ in range(B)]
    texts, shown, done = [""] * B, [0] * B, [False] * B
    stream = model.generate(idx, max_new_tokens, temperature, top_k, top_p, generator=generator,
                            use_cache=use_cache, pad=pad if int(pad.max()) else None,
                            stop_tokens=[tok.eot_id] if stop_at_eot else None)
    for step in stream:
        for r, t in enumerate(step[:, 0].tolist()):
            if done[r]:
                continue
            if stop_at_eot and t == tok.eot_id:
                done[r] = True
            else:
                ids[r].append(t)
                texts[r] = tok.decode(ids[r])
            hits = [texts[r].find(s) for s in stop if s in texts[r]]
            if hits:
                texts[r], done[r] = texts[r][: min(hits)], True
            if on_text:
                end = len(texts[r]) if done[r] else len(texts[r]) - _held_back(texts[r], stop)
                if end > shown[r]:
                    on_text(r, texts[r][shown[r] : end])
                    shown[r] = end
        if all(done):
            stream.close()
            break
    if on_text:
        for r in range(B):
            if len(texts[r]) > shown[r]:
                on_text(r, texts[r][shown[r] :])
    return texts


def print_samples(path, prompt="", n=1, max_new_tokens=200, temperature=0.8, top_k=200,
                  top_p=None, seed=None, device="cpu", stop=None, out=None, batch_size=8,
                  stop_at_eot=True):
    """Print n samples for each prompt (a string or a list of them) to out (stdout)."""
    out = out or sys.stdout
    model, tok, _ = load_model(path, device)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if batch_size < 1:
        raise SLMError(f"--batch-size must be at least 1 (got {batch_size})")
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev)
    g.manual_seed(seed if seed is not None else torch.seed())
    jobs = [p for p in prompts for _ in range(n)]
    numbered = len(jobs) > 1
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  generator=g, stop=stops, stop_at_eot=stop_at_eot)
        if len(chunk) == 1:  # one sample: stream it as it is generated
            if numbered:
                print(f"--- sample {b + 1} ---", file=out)
            out.write(chunk[0])
            out.flush()

            def write(_row, piece):
                out.write(piece)
                out.flush()

            complete(model, tok, chunk, on_text=write, **kw)
            out.write("\n")
        else:
            for i, text in enumerate(complete(model, tok, chunk, **kw)):
                print(f"--- sample {b + i + 1} ---\n{chunk[i]}{text}", file=out)
        out.flush()
