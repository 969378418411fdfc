"""Language-modelling metrics of a model on held-out text: loss, perplexity, bits per byte.

The text is cut into the same fixed windows as the evaluation during training (seq_len + 1
tokens, stride seq_len, from the start of the split), so `slm eval` on a run's own validation
shards with the same eval_tokens reproduces the val/loss that training logged.
"""

from __future__ import annotations

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


@torch.no_grad()
def lm_metrics(model, tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int,
               batch_size: int, autocast=None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte over windows of seq_len tokens."""
    dev = next(model.parameters()).device
    seq_len = min(seq_len, model.cfg.block_size)
    n_win = (len(tokens) - 1) // seq_len
    if n_win < 1:  # shorter than one window: score what there is
        windows = [tokens]
    else:
        windows = [tokens[k * seq_len : k * seq_len + seq_len + 1] for k in range(n_win)]
    tb = torch.as_tensor(token_bytes, dtype=torch.float64, device=dev)
    nats = nbytes = 0.0
    ntok = 0
    model.eval()
    for i in range(0, len(windows), batch_size):
        buf = torch.as_tensor(np.stack(windows[i : i + batch_size]), device=dev)
        x, y = buf[:, :-1], buf[:, 1:]
        with autocast() if autocast else torch.autocast(dev.type, enabled=False):
            logits, _ = model(x)
        lp = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                             reduction="none")
        nats += lp.double().sum().item()
        nbytes += tb[y].sum().item()
        ntok += y.numel()
    loss = nats / ntok
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50)),
            "val/bpb": nats / max(nbytes, 1.0) / math.log(2), "val/tokens": ntok}
