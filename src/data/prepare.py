"""Tokenize a data.source once into shards under <data_root>/datasets/, and reuse them after.

    slm prepare --config configs/tiny.yaml          # also run by training when shards are missing

The folder name holds a key over everything that changes the tokens (the source's fingerprint,
the tokenizer, the split), so a changed source or tokenizer gets a fresh build and an unchanged
one is never redone. A folder is complete once its manifest.json exists (written last).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from src.data import sources
from src.data import tokenizer as toklib
from src.data.shards import open_shard, write_shard
from src.errors import SLMError

FORMAT = 1
MIN_DOCS_FOR_SPLIT = 20  # fewer documents than this: split each document's tail instead


@dataclass
class Dataset:
    dir: Path
    tokenizer: toklib.Tokenizer
    manifest: dict
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)


def dataset_key(data_cfg) -> dict:
    d = data_cfg
    key = {
        "format": FORMAT,
        "source": d.source,
        "source_fp": sources.fingerprint(d.source),
        "val_source": d.val_source,
        "val_fp": sources.fingerprint(d.val_source) if d.val_source else None,
        "val_fraction": d.val_fraction,
        "tokenizer": d.tokenizer,
        "text_field": d.text_field,
        "shard_tokens": d.shard_tokens,
    }
    if d.tokenizer == "bpe":
        key |= {"vocab_size": d.vocab_size, "sample_bytes": d.tokenizer_sample_bytes}
    return key


def dataset_dir(data_cfg, data_root: str | Path) -> Path:
    key = dataset_key(data_cfg)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data_cfg.source.rstrip("/")).name)[:40] or "data"
    tok = data_cfg.tokenizer + (str(data_cfg.vocab_size) if data_cfg.tokenizer == "bpe" else "")
    return Path(data_root) / "datasets" / f"{slug}-{tok}-{h}"


def _split_docs(data_cfg):
    """(train_docs, val_docs) as lazy iterables, by the rules in the module docstring."""
    d = data_cfg
    if d.val_source:
        return (lambda: sources.iter_documents(d.source, d.text_field)), (
            lambda: sources.iter_documents(d.val_source, d.text_field)
        )
    need = max(MIN_DOCS_FOR_SPLIT, math.ceil(2 / d.val_fraction))  # >= 2 validation documents
    n_docs = sum(1 for _ in islice(sources.iter_documents(d.source, d.text_field), need))
    if n_docs < need:  # few documents: hold out each one's tail

        def tail(keep_val: bool):
            for text in sources.iter_documents(d.source, d.text_field):
                cut = int(len(text) * (1 - d.val_fraction))
                nl = text.rfind("\n", 0, cut)
                cut = nl + 1 if nl > cut // 2 else cut
                yield text[cut:] if keep_val else text[:cut]

        return (lambda: tail(False)), (lambda: tail(True))

    def pick(val: bool):
        for i, text in enumerate(sources.iter_documents(d.source, d.text_field)):
            if sources.is_val_document(i, d.val_fraction) == val:
                yield text

    return (lambda: pick(False)), (lambda: pick(True))


def _sample(docs, max_bytes: int):
    n = 0
    for text in docs:
        yield text
        n += len(text)
        if n >= max_bytes:
            return


def build_tokenizer(data_cfg, train_docs, val_docs) -> toklib.Tokenizer:
    kind = data_cfg.tokenizer
    if kind == "bytes":
        return toklib.ByteTokenizer()
    if kind == "gpt2":
        return toklib.GPT2Tokenizer()
    if kind == "char":
        return toklib.CharTokenizer.train(
            t for docs in (train_docs(), val_docs()) for t in docs
        )
    return toklib.BPETokenizer.train(
        _sample(train_docs(), data_cfg.tokenizer_sample_bytes), data_cfg.vocab_size
    )


def _encode_split(tok, docs, split: str, out: Path, shard_tokens: int, log) -> tuple[list, dict]:
    shards, buf, n_buf = [], [], 0
    stats = {"documents": 0, "chars": 0, "tokens": 0}

    def flush():
        nonlocal buf, n_buf
        arr = np.concatenate(buf).astype(tok.dtype) if buf else np.zeros(0, dtype=tok.dtype)
        while len(arr) >= shard_tokens or (len(arr) and flush.final):
            part, arr = arr[:shard_tokens], arr[shard_tokens:]
            path = out / f"{split}_{len(shards):06d}.bin"
            write_shard(path, part, tok.id)
            shards.append({"file": path.name, "split": split, "tokens": int(len(part))})
            log(f"  wrote {path.name}: {len(part):,} tokens")
        buf, n_buf = ([arr] if len(arr) else []), len(arr)

    flush.final = False
    it = iter(docs)
    while batch := list(islice(it, 256)):
        for ids in tok.encode_batch(batch):
            ids.append(tok.eot_id)
            buf.append(np.asarray(ids, dtype=np.int64))
            n_buf += len(ids)
            stats["tokens"] += len(ids)
        stats["documents"] += len(batch)
        stats["chars"] += sum(len(t) for t in batch)
        if n_buf >= shard_tokens:
            flush()
    flush.final = True
    flush()
    return shards, stats


def prepare(cfg, data_root: str | Path, log=print) -> Dataset:
    """Return the dataset for cfg.data, tokenizing it first if no complete build exists."""
    out = dataset_dir(cfg.data, data_root)
    if (out / "manifest.json").is_file():
        return load_dataset(out)
    t0 = time.time()
    log(f"preparing {cfg.data.source} -> {out}")
    train_docs, val_docs = _split_docs(cfg.data)
    tok = build_tokenizer(cfg.data, train_docs, val_docs)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(tmp / "tokenizer.json")
    train, st = _encode_split(tok, train_docs(), "train", tmp, cfg.data.shard_tokens, log)
    val, sv = _encode_split(tok, val_docs(), "val", tmp, cfg.data.shard_tokens, log)
    if st["chars"] == 0:  # (empty documents still count an end-of-text token)
        raise SLMError(f"data.source {cfg.data.source}: no text found (the files are empty); "
                       "point data.source at files that hold text")
    if sv["tokens"] < 2:
        raise SLMError(
            f"data: the validation split of {cfg.data.val_source or cfg.data.source} is empty; "
            "set data.val_source or raise data.val_fraction"
        )
    manifest = {
        "format": FORMAT,
        "key": dataset_key(cfg.data),
        "tokenizer": {"kind": tok.kind, "id": tok.id, "vocab_size": tok.vocab_size},
        "dtype": np.dtype(tok.dtype).name,
        "shards": train + val,
        "train": st,
        "val": sv,
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(
        f"prepared {st['documents']:,} train / {sv['documents']:,} val documents: "
        f"{st['tokens']:,} / {sv['tokens']:,} tokens ({tok.kind}, vocab {tok.vocab_size}) "
        f"in {manifest['seconds']:.1f} s"
    )
    return load_dataset(out)


def load_dataset(out: Path) -> Dataset:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise SLMError(f"{out}/manifest.json is unreadable ({e}); delete {out} to rebuild") from None
    try:
        tok = toklib.load(out / "tokenizer.json")
    except SLMError as e:
        raise SLMError(f"{e}; delete {out} to rebuild it") from None
    ds = Dataset(out, tok, manifest)
    for s in manifest["shards"]:
        p = out / s["file"]
        open_shard(p, tok.id)  # checks header, size and tokenizer now, not mid-run
        (ds.train if s["split"] == "train" else ds.val).append(p)
    return ds
