"""Tokenizing in worker processes: a bounded, ordered pipeline, and the progress display.

Each worker process holds one tokenizer, running single-threaded (so N workers use N cores); the
parent streams batches of texts to them with at most 2N batches in flight and takes the results
back in order. Workers die with their parent, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np

from src.data import tokenizer as toklib


def encode(tok, texts: list[str], ends: list[bool]):
    """Token ids of each text (+ end-of-text where a document ends), flat; lengths; UTF-8 bytes;
    and per text 0/1/2: not audited / audited, engines agree / audited, they differ (see
    tokenizer.Tokenizer.encode_audited)."""
    nbytes = np.empty(len(texts), np.int64)
    for k, t in enumerate(texts):
        try:
            nbytes[k] = len(t.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates (e.g. from JSON): replace them
            texts[k] = toklib.clean(t)
            nbytes[k] = len(texts[k].encode("utf-8"))
    ids, audit = tok.encode_audited(texts)
    lens = np.fromiter((len(x) + e for x, e in zip(ids, ends, strict=True)), np.int64, len(ids))
    flat = np.empty(int(lens.sum()), tok.dtype)
    at = 0
    for x, e in zip(ids, ends):
        flat[at : at + len(x)] = x  # lists or arrays (ids < vocab_size: the cast is exact)
        at += len(x)
        if e:
            flat[at] = tok.eot_id
            at += 1
    return flat, lens, nbytes, audit


_WORKER_TOK = None


def _worker_init(record: dict) -> None:
    global _WORKER_TOK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (forked)
    if sys.platform.startswith("linux"):  # die with the parent, even when it is SIGKILLed
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    _WORKER_TOK = toklib.from_dict(record)


def _worker_encode(texts, ends):
    return encode(_WORKER_TOK, texts, ends)


@contextmanager
def _one_thread():
    """Tokenizer libraries on one thread: each preparation process is one worker."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextmanager
def workers(tok, n: int):
    """n tokenizer processes (None for n <= 1: tokenize in this process)."""
    with _one_thread():
        if n <= 1:
            yield None
            return
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                   initargs=(tok.to_dict(),))
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def tokenized(batches, tok, pool, n: int):
    """(meta, (tokens, lengths, bytes, audit)) per batch, in order; at most 2n batches in flight."""
    if pool is None:
        for meta, texts in batches:
            yield meta, encode(tok, texts, [m[3] for m in meta])
        return
    pending: deque = deque()
    for meta, texts in batches:
        pending.append((meta, pool.submit(_worker_encode, texts, [m[3] for m in meta])))
        if len(pending) >= 2 * n:
            m, fut = pending.popleft()
            yield m, fut.result()
    while pending:
        m, fut = pending.popleft()
        yield m, fut.result()


class Progress:
    """A tqdm bar (documents, tokens, MB/s) on a terminal; a log line every 30 s elsewhere."""

    def __init__(self, enabled: bool | None, total: int | None, log):
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                            dynamic_ncols=True, smoothing=0.05)
        self.log, self.t0 = log, time.time()
        self.last, self.docs, self.tokens, self.bytes = self.t0, 0, 0, 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens", refresh=False)
            self.bar.update(nbytes)
        elif time.time() - self.last >= 30:
            self.last = time.time()
            self.log(f"  {self.summary()}")

    def summary(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        return (f"{self.docs:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB "
                f"at {self.bytes / 1e6 / dt:.2f} MB/s, {self.tokens / dt:,.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
