"""Text generation over a model and its tokenizer: batched, streamed, with stop strings.

    from src.checkpoint import load_model
    from src.model.generate import complete
    model, tok, _ = load_model("data/models/tiny_final.pt")
    print(complete(model, tok, ["def "], max_new_tokens=50, seed=1)[0])

The tokens come from GPT.generate (KV cache, padded batches) in src/model/gpt.py; this module
turns them into text: prompts are left-padded after an end-of-text token, UTF-8 pieces and stop
strings are held back until they are safe to show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


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
