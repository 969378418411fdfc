"""Language-modelling metrics of a model on held-out text: loss, perplexity, bits per byte.

The text is cut into the same fixed windows as the evaluation during training (seq_len + 1
tokens, stride seq_len, from the start of the split), so `slm eval` on a run's own validation
shards with the same eval_tokens reproduces the val/loss that training logged.
"""

from __future__ import annotations

import contextlib
import math
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from src.data.loader import TokenStream
from src.data.prepare import dataset_dir, split_documents
from src.errors import SLMError


def run_val_tokens(data_cfg, tok, data_root, max_tokens: int | None) -> np.ndarray | None:
    """The first max_tokens (+1) tokens of a run's prepared validation shards, if present and
    written with this tokenizer; None otherwise."""
    out = dataset_dir(data_cfg, data_root)
    if not (out / "manifest.json").is_file():
        return None
    from src.data.prepare import load_dataset

    ds = load_dataset(out)
    if ds.tokenizer.id != tok.id or not ds.val:
        return None
    stream = TokenStream(ds.val, tok.id)
    n = stream.n_tokens if max_tokens is None else min(stream.n_tokens, max_tokens + 1)
    return np.asarray(stream.read(0, n), dtype=np.int64)


def source_tokens(data_cfg, tok, split: str, max_tokens: int | None, data_root="data") -> np.ndarray:
    """Tokens of a data source's validation split (or of all of it), encoded with tok the way
    shards are written (each document followed by end-of-text); stops reading when enough."""
    docs = split_documents(data_cfg, data_root, "val" if split == "val" else None)
    out, n = [], 0
    while batch := list(islice(docs, 64)):
        for ids in tok.encode_batch(batch):
            out.append(np.asarray(ids + [tok.eot_id], dtype=np.int64))
            n += len(ids) + 1
        if max_tokens is not None and n > max_tokens:
            break
    if n < 2:
        raise SLMError(f"data.source {data_cfg.source}: the {split} split has no text to evaluate")
    arr = np.concatenate(out)
    return arr if max_tokens is None else arr[: max_tokens + 1]


def token_windows(tokens: np.ndarray, seq_len: int, batch_size: int):
    """Batches (x, y) of windows of seq_len + 1 tokens at stride seq_len, from the start."""
    n_win = (len(tokens) - 1) // seq_len
    if n_win < 1:  # shorter than one window: score what there is
        windows = [tokens]
    else:
        windows = [tokens[k * seq_len : k * seq_len + seq_len + 1] for k in range(n_win)]
    for i in range(0, len(windows), batch_size):
        buf = torch.as_tensor(np.stack(windows[i : i + batch_size]).astype(np.int64))
        yield buf[:, :-1], buf[:, 1:]


@torch.no_grad()
def evaluate(model, batches, token_bytes, autocast=None, reduce=None, lockstep=None,
             seq_len: int | None = None) -> dict:
    """Loss (nats/token), perplexity and bits per byte of model over batches of (x, y).

    The one evaluation routine: training's periodic eval and `slm eval` both call it.
    reduce(t) sums a tensor over processes (several ranks each score their share).
    lockstep(n) -> the most batches any rank has (FSDP): every rank then runs as many forwards,
    padding with forwards of seq_len tokens whose results are dropped, since each forward
    gathers weights from all ranks.
    """
    dev = next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    nats, nbytes, ntok = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3))
    tb = torch.as_tensor(token_bytes, device=dev)
    if lockstep is not None:
        batches = list(batches)
        for _ in range(lockstep(len(batches)) - len(batches)):
            with ctx():
                model(torch.zeros(1, seq_len, dtype=torch.long, device=dev))
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)
        with ctx():
            logits, _ = model(x)
        lp = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                             reduction="none", ignore_index=-1)  # -1: not scored (chat data)
        nats += lp.double().sum()
        ntok += (y >= 0).sum()
        nbytes += tb[y.clamp(min=0)].double().mul(y >= 0).sum()
    if reduce is not None:
        for t in (nats, nbytes, ntok):
            reduce(t)
    model.train(was_training)
    loss = (nats / ntok).item()
    bpb = (nats / max(nbytes.item(), 1.0) / math.log(2)).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50)), "val/bpb": bpb,
            "val/tokens": int(ntok.item())}
