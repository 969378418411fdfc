"""HellaSwag (Zellers et al., 2019): pick the right one of four endings for a short context.

Each ending is scored by the model's log-likelihood of its tokens after the context (the
context starts after an end-of-text token, the ending is preceded by a space). `acc` picks the
ending with the highest total log-likelihood; `acc_norm` the highest mean log-likelihood per
token, which does not favour short endings and is the figure usually quoted for small models.

The standard validation file (10,042 examples) is downloaded once and cached:
    $SLM_CACHE_DIR (default ~/.cache/slm)/hellaswag_val.jsonl
or given as a local copy (`--hellaswag-file`, `training.hellaswag_file`). Its rows are JSON
objects with `ctx` (str), `endings` (list of 4 str) and `label` (index of the right ending).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from src.errors import SLMError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"


def cache_dir() -> Path:
    base = os.environ.get("SLM_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm"
    return Path(base)


def locate(path: str | Path | None = None, download: bool = True) -> Path | None:
    """The HellaSwag file to use: `path` if given, else the cached copy, else (download=True) a
    fresh download into the cache. None when there is no copy and download is False."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise SLMError(f"HellaSwag file {p} does not exist; give the path of "
                           f"hellaswag_val.jsonl (from {URL})")
        return p
    cached = cache_dir() / FILE_NAME
    if cached.is_file():
        return cached
    if not download:
        return None
    url = os.environ.get("SLM_HELLASWAG_URL", URL)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # URLError, timeouts, refused connections
        tmp.unlink(missing_ok=True)
        why = getattr(e, "reason", None) or e
        raise SLMError(
            f"could not download HellaSwag from {url} ({why}). Without network, copy "
            f"hellaswag_val.jsonl here from a machine that has it and pass --hellaswag-file PATH "
            f"(or put it at {cached})"
        ) from None
    tmp.replace(cached)
    return cached


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a HellaSwag jsonl file, checked; the first `limit` if given."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ctx, endings, label = row["ctx"], row["endings"], int(row["label"])
                ok = isinstance(ctx, str) and len(endings) >= 2 and 0 <= label < len(endings)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise SLMError(f"{path}:{n}: not a HellaSwag row (needs ctx: str, endings: "
                               "list of str, label: index of the right ending)")
            out.append({"ctx": ctx, "endings": [str(e) for e in endings], "label": label})
            if limit and len(out) >= limit:
                break
    if not out:
        raise SLMError(f"{path}: no HellaSwag examples in the file")
    return out


def example_rows(tok, ex: dict, block_size: int) -> list[tuple[list[int], int]]:
    """(tokens, n_ending_tokens) per ending: end-of-text, context, " " + ending, cut to the
    model's window from the left."""
    ctx = [tok.eot_id] + tok.encode(ex["ctx"])
    rows = []
    for e in ex["endings"]:
        end = tok.encode(" " + e)[: block_size]
        rows.append(((ctx + end)[-block_size - 1 :], len(end)))  # +1: the first is never scored
    return rows


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], int]], autocast=None) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each row's last n tokens, in one batch."""
    dev = next(model.parameters()).device
    T = max(len(r) for r, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
    y = torch.full((len(rows), T), -1, dtype=torch.long, device=dev)
    for i, (r, n) in enumerate(rows):  # right-padded: causal attention never sees the padding
        t = torch.tensor(r, device=dev)
        x[i, : len(r) - 1] = t[:-1]
        y[i, len(r) - 1 - n : len(r) - 1] = t[len(r) - n :]
    with autocast() if autocast else torch.autocast(dev.type, enabled=False):
        logits, _ = model(x)
    lp = -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
    return [(float(s), n) for s, (_, n) in zip(lp.sum(1).tolist(), rows, strict=True)]


def accuracy(scores: list[list[tuple[float, int]]], labels: list[int]) -> dict:
    """acc (highest total log-likelihood) and acc_norm (highest mean per token) of each example."""
    acc = norm = 0
    for sc, label in zip(scores, labels, strict=True):
        acc += max(range(len(sc)), key=lambda i: sc[i][0]) == label
        norm += max(range(len(sc)), key=lambda i: sc[i][0] / max(sc[i][1], 1)) == label
    n = len(labels)
    return {"hellaswag/acc": acc / n, "hellaswag/acc_norm": norm / n, "hellaswag/examples": n}


@torch.no_grad()
def evaluate(model, tok, examples: list[dict], autocast=None, batch_examples: int = 8) -> dict:
    """HellaSwag acc and acc_norm of a model over examples (see load_examples)."""
    was_training = model.training
    model.eval()
    scores = []
    bs = model.cfg.block_size
    for i in range(0, len(examples), batch_examples):
        chunk = examples[i : i + batch_examples]
        rows = [r for ex in chunk for r in example_rows(tok, ex, bs)]
        flat = score_rows(model, rows, autocast)
        k = 0
        for ex in chunk:
            scores.append(flat[k : k + len(ex["endings"])])
            k += len(ex["endings"])
    model.train(was_training)
    return accuracy(scores, [ex["label"] for ex in examples])
