"""Tokenize a data.source once into shards under <data_root>/datasets/, and reuse them after.

    slm prepare --config configs/tiny.yaml          # also run by training when shards are missing
    slm prepare --config configs/gpt_124m.yaml --data.source fineweb-edu-10b --workers 8

The folder name holds a key over everything that changes the tokens (the source's fingerprint,
the tokenizer, the split), so a changed source or tokenizer gets a fresh build and an unchanged
one is never redone. A folder is complete once its manifest.json exists (written last).

Preparation has three steps, which Modal spreads over many CPU containers:
  plan(cfg, root)               resolve the source, train and save the tokenizer, cut the work into
                                independent parts (JSON-able dicts); [] when already prepared
  prepare_part(cfg, root, part) tokenize one part into its own shards (idempotent, resumable)
  finalize(cfg, root, results)  write the manifest that ties the parts' shards together
`prepare()` runs all three here, tokenizing with data.num_workers processes (0 = one per core).

Within a part, documents stream in a fixed order (long ones in pieces, cut where the tokens do not
change), go to train or validation (by a hash of each document, or, for sources of fewer than 20
documents, each document's tail), are tokenized by worker processes (a bounded queue; results in
order), each followed by the end-of-text token, and fill fixed-size shards. After each complete
shard, the part's progress file records where the next shard starts (item and token offset), so an
interrupted preparation resumes after its last complete shard and writes the same bytes. Memory
stays bounded whatever the corpus size: nothing holds more than a few batches of text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.data import sources
from src.data import tokenizer as toklib
from src.data.shards import ShardWriter, open_shard, read_header
from src.data.workers import Progress, tokenized, workers
from src.errors import SLMError
from src.paths import write_json

FORMAT = 2
MIN_DOCS_FOR_SPLIT = 20  # fewer documents than this: split each document's tail instead
PIECE_CHARS = 1 << 18  # longer documents are tokenized in pieces of at most this many characters
BATCH_CHARS = 1 << 19  # characters per task sent to a tokenizer process
PART_BYTES = 1 << 28  # text files are grouped into parts of about this size
MAX_PARTS = 64  # a Parquet/JSON-lines group is split into at most this many parts
SPLITS = ("train", "val")


@dataclass
class Dataset:
    dir: Path
    tokenizer: toklib.Tokenizer
    manifest: dict
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    masks: dict | None = None  # chat data: {"train": [...], "val": [...]} loss-mask shards


def _as_val(fn, *args):
    """fn(data.val_source, ...), its errors naming data.val_source (sources says data.source)."""
    try:
        return fn(*args)
    except SLMError as e:
        raise SLMError(str(e).replace("data.source", "data.val_source", 1)) from None


def dataset_key(data_cfg) -> dict:
    d = data_cfg
    key = {
        "format": FORMAT,
        "source": d.source,
        "source_fp": sources.fingerprint(d.source),
        "val_source": d.val_source,
        "val_fp": _as_val(sources.fingerprint, d.val_source) if d.val_source else None,
        "val_fraction": d.val_fraction,
        "tokenizer": d.tokenizer,
        "text_field": d.text_field,
        "split": d.split,
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def num_workers(data_cfg, log=None) -> int:
    """data.num_workers (0: one per core), never more processes than cores."""
    cores = _cores()
    if data_cfg.num_workers and data_cfg.num_workers > cores and log:
        log(f"note: data.num_workers {data_cfg.num_workers} is more than this machine's {cores} "
            f"cores; using {cores}")
    return min(data_cfg.num_workers or cores, cores)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- documents -> items


def _cut(buf: str) -> int:
    """Where to end a piece so that its tokens equal the whole text's: before a space that starts
    a word, or after a newline between two non-space characters (GPT-2-style pre-tokenization
    never joins across either); failing both, at a newline or a fixed length."""
    lo, hi = PIECE_CHARS // 2, PIECE_CHARS
    i = buf.rfind(" ", lo, hi)
    while i >= lo:
        if not buf[i + 1].isspace():
            return i
        i = buf.rfind(" ", lo, i)
    i = buf.rfind("\n", lo, hi)
    while i >= lo:
        if not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        i = buf.rfind("\n", lo, i)
    i = buf.rfind("\n", lo, hi)
    return i + 1 if i >= 0 else hi


def _pieces(chunks) -> Iterator[str]:
    """Re-cut a stream of text into pieces of at most PIECE_CHARS (always at least one piece)."""
    buf = ""
    for c in chunks:
        buf += c
        while len(buf) > PIECE_CHARS:
            k = _cut(buf)
            yield buf[:k]
            buf = buf[k:]
    yield buf


def _span(doc, start: int, end: int | None):
    """The text of doc[start:end] as a stream of chunks (doc: str or sources.TextFile)."""
    if isinstance(doc, str):
        yield doc[start:end]
        return
    pos = 0
    for c in doc.chunks():
        a, b = max(start - pos, 0), len(c) if end is None else min(end - pos, len(c))
        if a < b:
            yield c[a:b]
        pos += len(c)
        if end is not None and pos >= end:
            return


def _tail_cut(doc, val_fraction: float) -> int:
    """Where a document's validation tail starts: the last line start before 1 - val_fraction."""
    if isinstance(doc, str):
        cut = int(len(doc) * (1 - val_fraction))
        nl = doc.rfind("\n", 0, cut)
    else:  # a text file, maybe larger than memory: two streaming passes
        cut = int(sum(len(c) for c in doc.chunks()) * (1 - val_fraction))
        nl, pos = -1, 0
        for c in doc.chunks():
            if pos >= cut:
                break
            j = c.rfind("\n", 0, cut - pos)
            nl = pos + j if j >= 0 else nl
            pos += len(c)
    return nl + 1 if nl > cut // 2 else cut


def part_items(part: dict, data_cfg) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends_document) for every piece of a part, in a fixed order."""
    mode, p, frac = part["mode"], part["index"], data_cfg.val_fraction
    for j, doc in enumerate(sources.iter_docs(part["unit"], data_cfg.text_field)):
        if mode == "tail":
            cut = _tail_cut(doc, frac)
            spans = [("train", 0, cut), ("val", cut, None)]
        else:
            spans = [(mode, 0, None)]
        for split, a, b in spans:
            pieces = _pieces(_span(doc, a, b))
            piece = next(pieces)
            if split == "hash":  # parts start at different phases of the 1-in-N pattern
                offset = p * 7919 % max(1, math.ceil(1 / frac))
                split = "val" if sources.is_val_document(j, frac, offset) else "train"
            for nxt in pieces:
                yield split, piece, False
                piece = nxt
            yield split, piece, True


# ----------------------------------------------------------------------------- tokenizer


def _sample(texts, max_chars: int):
    n = 0
    for text in texts:
        yield text
        n += len(text)
        if n >= max_chars:
            return


def build_tokenizer(data_cfg, parts: list[dict]) -> toklib.Tokenizer:
    """The tokenizer data.tokenizer names; bpe is trained on a bounded sample of the train text."""
    kind = data_cfg.tokenizer
    if kind == "bytes":
        return toklib.ByteTokenizer()
    if kind == "gpt2":
        return toklib.GPT2Tokenizer()

    def texts(splits):
        return (t for p in parts for s, t, _ in part_items(p, data_cfg) if s in splits)

    if kind == "char":
        return toklib.CharTokenizer.train(texts({"train", "val"}))
    sample = _sample(texts({"train"}), data_cfg.tokenizer_sample_bytes)
    return toklib.BPETokenizer.train(sample, data_cfg.vocab_size)


# ----------------------------------------------------------------------------- plan


def _units(groups: list[dict], text_field: str) -> list[dict]:
    units = []
    for g in groups:
        if g["kind"] != "text":
            units += sources.row_units(g, text_field, MAX_PARTS)
            continue
        files, size = [], 0
        for f in g["files"]:
            files.append(f)
            size += os.path.getsize(f)
            if size >= PART_BYTES:
                units.append({"kind": "text", "files": files})
                files, size = [], 0
        if files:
            units.append({"kind": "text", "files": files})
    return units


def _size(unit: dict) -> int | None:
    """Bytes of text in a unit when known (uncompressed local text files), for the progress bar."""
    if unit["kind"] != "text" or any(f.endswith(sources.COMPRESSION) for f in unit["files"]):
        return None
    return sum(os.path.getsize(f) for f in unit["files"])


def make_parts(d, data_root: str | Path, log=print) -> tuple[list[dict], dict, dict | None]:
    """(parts, source info, val_source info): the units of work and how each splits train/val."""
    groups, info = sources.resolve(d.source, data_root, d.split, log)
    vinfo = None
    if d.val_source:
        vgroups, vinfo = _as_val(sources.resolve, d.val_source, data_root, _val_split(d), log)
        parts = [{"unit": u, "mode": "train"} for u in _units(groups, d.text_field)]
        parts += [{"unit": u, "mode": "val"} for u in _units(vgroups, d.text_field)]
    else:
        need = max(MIN_DOCS_FOR_SPLIT, math.ceil(1 / d.val_fraction))  # >= 1 validation doc
        few = sources.count_documents(groups, d.text_field, need)
        mode = "tail" if few < need else "hash"
        parts = [{"unit": u, "mode": mode} for u in _units(groups, d.text_field)]
    for i, p in enumerate(parts):
        p["index"], p["bytes"] = i, _size(p["unit"])
    return parts, info, vinfo


def split_documents(d, data_root: str | Path, split: str | None) -> Iterator[str]:
    """The documents of one split ('train', 'val'; None for both) exactly as preparation splits
    them, without writing anything (for evaluating on any data.source)."""
    parts, _, _ = make_parts(d, data_root, log=lambda *a: None)
    for part in parts:
        doc = []
        for which, text, ends in part_items(part, d):
            if split is None or which == split:
                doc.append(text)
            if ends and doc:
                yield "".join(doc)
                doc = []


def plan(cfg, data_root: str | Path, log=print) -> list[dict]:
    """Resolve the source, save the tokenizer, and return the independent parts to tokenize.

    Returns [] when the dataset is already prepared. The plan is saved (plan.json), so a resumed
    or fanned-out preparation works on the same parts and tokenizer."""
    d = cfg.data
    out = dataset_dir(d, data_root)
    if (out / "manifest.json").is_file():
        return []
    if (out / "plan.json").is_file():
        return _read_json(out / "plan.json")["parts"]
    t0 = time.time()
    log(f"preparing {d.source} -> {out}")
    parts, info, vinfo = make_parts(d, data_root, log)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    if toklib.saved(tok_path):  # an earlier plan stopped after saving it: keep the very same one
        tok = toklib.load(tok_path)
    else:
        t1 = time.time()
        tok = build_tokenizer(d, parts)
        tok.save(tok_path)
        log(f"tokenizer: {tok.kind}, vocab {tok.vocab_size:,} ({time.time() - t1:.1f} s)")
    write_json(out / "plan.json", {"parts": parts, "source": info, "val_source": vinfo,
                                    "tokenizer": tok.id, "seconds": round(time.time() - t0, 2)})
    return parts


def _val_split(d) -> str:
    """The split read from a hub val_source: its validation split when data.split is train."""
    spec = sources.expand(d.val_source)
    if not sources.is_hub(spec) or d.split != "train":
        return d.split
    return "validation"


# ----------------------------------------------------------------------------- one part


def _zero() -> dict:
    """A split's counts; audited/fallback: texts encoded with both tokenizer engines / of those,
    texts where the engines differed and `tokenizers`' tokens were kept."""
    return {"documents": 0, "chars": 0, "bytes": 0, "tokens": 0, "audited": 0, "fallback": 0}


class _SplitWriter:
    """Fills one split's fixed-size shards for one part, remembering where each shard ends."""

    def __init__(self, out: Path, part: int, split: str, tok, shard_tokens: int, resume=None):
        self.out, self.split, self.prefix = out, split, f"{split}_{part:04d}"
        self.tok, self.size = tok, shard_tokens
        self.resume = resume or {"shards": [], "next_item": 0, "skip": 0, "stats": _zero()}
        self.shards = list(self.resume["shards"])
        self.stats = _zero() | self.resume["stats"]  # (progress files of older slm lack keys)
        self.next_item, self.skip = self.resume["next_item"], self.resume["skip"]
        self.w: ShardWriter | None = None
        self.changed = False

    def add(self, idx: int, toks: np.ndarray, nchars: int, nbytes: int, ends: bool,
            audit: int = 0) -> None:
        before = dict(self.stats)
        s = self.stats
        s["documents"] += int(ends)
        s["chars"] += nchars
        s["bytes"] += nbytes
        s["tokens"] += len(toks)
        s["audited"] += int(audit > 0)
        s["fallback"] += int(audit == 2)
        off = self.skip if idx == self.next_item else 0  # a resumed item: its head is in a shard
        self.skip = 0
        while off < len(toks):
            if self.w is None:
                name = f"{self.prefix}_{len(self.shards):05d}.bin"
                self.w = ShardWriter(self.out / name, self.tok.dtype, self.tok.id)
            take = min(self.size - self.w.n, len(toks) - off)
            self.w.write(toks[off : off + take])
            off += take
            if self.w.n == self.size:
                self._close()
                done = off == len(toks)
                self.resume = {"shards": list(self.shards), "next_item": idx + 1 if done else idx,
                               "skip": 0 if done else off, "stats": dict(s if done else before)}
                self.changed = True

    def _close(self) -> None:
        n = self.w.close()
        self.shards.append({"file": self.w.path.name, "split": self.split, "tokens": n})
        self.w = None

    def finish(self) -> None:
        if self.w is not None:
            self._close()

    def abort(self) -> None:
        if self.w is not None:
            self.w.abort()
            self.w = None


def _resume_state(out: Path, i: int, tok, log) -> dict:
    """The part's saved progress if its shards are intact; stray files of the part removed."""
    path, state = out / f"part_{i:04d}.progress.json", {}
    if path.is_file():
        try:
            state = _read_json(path)
        except ValueError:
            state = {}
        if state.get("tokenizer") != tok.id:
            state = {}
        for sh in (sh for s in SPLITS for sh in state.get(s, {}).get("shards", [])):
            try:
                h = read_header(out / sh["file"])
                ok = h["n_tokens"] == sh["tokens"] and h["tokenizer_id"] == tok.id
            except SLMError:
                ok = False
            if not ok:
                log(f"part {i}: {sh['file']} is damaged; tokenizing this part again")
                state = {}
                break
    keep = {sh["file"] for s in SPLITS for sh in state.get(s, {}).get("shards", [])}
    for s in SPLITS:
        for f in out.glob(f"{s}_{i:04d}_*"):
            if f.name not in keep:
                f.unlink()
    return state


def _batches(items, writers) -> Iterator[tuple[list, list]]:
    """Consecutive items still to tokenize, grouped into tasks of about BATCH_CHARS."""
    meta, texts, n = [], [], 0
    for idx, (split, text, ends) in enumerate(items):
        if idx < writers[split].next_item:  # in a shard written before an interruption
            continue
        meta.append((idx, split, len(text), ends))
        texts.append(text)
        n += len(text)
        if n >= BATCH_CHARS or len(meta) >= 8192:
            yield meta, texts
            meta, texts, n = [], [], 0
    if meta:
        yield meta, texts


def _run_part(cfg, out: Path, part: dict, tok, pool, n: int, bar: Progress, log) -> dict:
    i = part["index"]
    result_path = out / f"part_{i:04d}.json"
    if result_path.is_file():
        return _read_json(result_path)
    t0 = time.time()
    state = _resume_state(out, i, tok, log)
    writers = {s: _SplitWriter(out, i, s, tok, cfg.data.shard_tokens, state.get(s))
               for s in SPLITS}
    done = sum(len(w.shards) for w in writers.values())
    if done:
        log(f"part {i}: resuming after its {done} complete shard(s)")
    progress_path = out / f"part_{i:04d}.progress.json"
    try:
        batches = _batches(part_items(part, cfg.data), writers)
        for meta, (flat, lens, nbytes, audit) in tokenized(batches, tok, pool, n):
            ends = np.cumsum(lens)
            for k, (idx, split, nchars, end_doc) in enumerate(meta):
                toks = flat[ends[k] - lens[k] : ends[k]]
                writers[split].add(idx, toks, nchars, int(nbytes[k]), end_doc, int(audit[k]))
            if any(w.changed for w in writers.values()):
                state = {"tokenizer": tok.id} | {s: w.resume for s, w in writers.items()}
                write_json(progress_path, state)
                for w in writers.values():
                    w.changed = False
            bar.update(int(nbytes.sum()), sum(m[3] for m in meta), int(lens.sum()))
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    result = {"index": i, "shards": writers["train"].shards + writers["val"].shards,
              "train": writers["train"].stats, "val": writers["val"].stats,
              "seconds": round(time.time() - t0, 2)}
    write_json(result_path, result)
    progress_path.unlink(missing_ok=True)
    return result


def _tokenizer_for(out: Path) -> toklib.Tokenizer:
    if not toklib.saved(out / "tokenizer.json"):
        raise SLMError(f"{out}: no tokenizer.json yet; run plan() (or `slm prepare`) first")
    return toklib.load(out / "tokenizer.json")


def prepare_part(cfg, data_root: str | Path, part: dict, log=print, progress=None) -> dict:
    """Tokenize one part of plan()'s into its own shards; returns its result (idempotent)."""
    out = dataset_dir(cfg.data, data_root)
    tok = _tokenizer_for(out)
    n = num_workers(cfg.data)
    bar = Progress(progress, part.get("bytes"), log)
    try:
        with workers(tok, n) as pool:
            res = _run_part(cfg, out, part, tok, pool, n, bar, log)
    finally:
        bar.close()
    log(f"part {part['index']}: {bar.summary()}")
    return res


# ----------------------------------------------------------------------------- finalize


def finalize(cfg, data_root: str | Path, results: list[dict], log=print) -> Dataset:
    """Write the manifest over all parts' shards (results: prepare_part's, in any order)."""
    d = cfg.data
    out = dataset_dir(d, data_root)
    if (out / "manifest.json").is_file():
        return load_dataset(out)
    if not (out / "plan.json").is_file():
        raise SLMError(f"{out}: no plan.json; run plan() (or `slm prepare`) first")
    p = _read_json(out / "plan.json")
    got = {r["index"]: r for r in results}
    for part in p["parts"]:
        path = out / f"part_{part['index']:04d}.json"
        if part["index"] not in got:
            if not path.is_file():
                raise SLMError(
                    f"{out}: part {part['index']} is not tokenized yet; run prepare_part for it "
                    "(or `slm prepare`, which finishes whatever is missing)"
                )
            got[part["index"]] = _read_json(path)
    ordered = [got[part["index"]] for part in p["parts"]]
    shards = {s: [sh for r in ordered for sh in r["shards"] if sh["split"] == s] for s in SPLITS}
    stats = {s: {k: sum(r[s].get(k, 0) for r in ordered) for k in _zero()} for s in SPLITS}
    if stats["train"]["chars"] == 0:  # (empty documents still count an end-of-text token)
        raise SLMError(f"data.source {d.source}: no text found (the files are empty); "
                       "point data.source at files that hold text")
    if stats["val"]["tokens"] < 2 and d.val_source:
        raise SLMError(f"data.val_source {d.val_source}: no text found; point it at files that "
                       "hold text, or remove it to split data.source instead")
    if stats["val"]["tokens"] < 2:
        raise SLMError(
            f"data: the validation split of {d.source} is empty; "
            "set data.val_source or raise data.val_fraction"
        )
    tok = _tokenizer_for(out)
    manifest = {
        "format": FORMAT,
        "key": dataset_key(d),
        "source": p["source"],
        "val_source": p["val_source"],
        "tokenizer": {"kind": tok.kind, "id": tok.id, "vocab_size": tok.vocab_size,
                      "file": "tokenizer.json", "record": toklib.meta_path("tokenizer.json").name,
                      "engine": tok.engine},
        "dtype": np.dtype(tok.dtype).name,
        "shard_tokens": d.shard_tokens,
        "parts": len(ordered),
        "shards": shards["train"] + shards["val"],
        "train": stats["train"],
        "val": stats["val"],
        "seconds": {"plan": p["seconds"], "tokenize": round(sum(r["seconds"] for r in ordered), 2)},
    }
    write_json(out / "manifest.json", manifest)
    st, sv = stats["train"], stats["val"]
    log(
        f"prepared {st['documents']:,} train / {sv['documents']:,} val documents: "
        f"{st['tokens']:,} / {sv['tokens']:,} tokens in {len(shards['train'])} + "
        f"{len(shards['val'])} shards ({tok.kind}, vocab {tok.vocab_size:,}, {manifest['dtype']})"
    )
    audited, fallback = st["audited"] + sv["audited"], st["fallback"] + sv["fallback"]
    if audited:
        log(f"tokenized with {tok.engine}; {audited:,} texts checked against `tokenizers`: "
            f"{fallback:,} differed (tokenizers' tokens kept for those)")
    return load_dataset(out)


def prepare(cfg, data_root: str | Path, log=print, progress: bool | None = None,
            tokenizer=None) -> Dataset:
    """Return the dataset for cfg.data, tokenizing it first (or finishing it) if needed.

    progress: a tqdm bar (None: when stderr is a terminal). tokenizer: data.format chat only,
    the tokenizer of the model being fine-tuned (else one is built for the chat set)."""
    if cfg.data.format == "chat":
        from src.data.chat import prepare_chat, source_tokenizer

        return Dataset(**prepare_chat(cfg, data_root, tokenizer or source_tokenizer(cfg), log))
    out = dataset_dir(cfg.data, data_root)
    if (out / "manifest.json").is_file():
        return load_dataset(out)
    with _building(out):  # another `slm prepare` of the same data: wait for it, then reuse
        if (out / "manifest.json").is_file():
            log(f"{out}: prepared meanwhile by another process; reusing it")
            return load_dataset(out)
        return _prepare_locked(cfg, data_root, out, log, progress)


@contextlib.contextmanager
def _building(out: Path):
    """An exclusive lock on <dataset>.lock (beside the folder) while one process builds it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no coordination
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_locked(cfg, data_root, out: Path, log, progress) -> Dataset:
    parts = plan(cfg, data_root, log)
    tok = _tokenizer_for(out)
    n = num_workers(cfg.data, log)
    sizes = [p.get("bytes") for p in parts]
    log(f"tokenizing {len(parts)} part(s) with {n} process(es)")
    bar = Progress(progress, None if None in sizes else sum(sizes), log)
    try:
        with workers(tok, n) as pool:
            results = [_run_part(cfg, out, p, tok, pool, n, bar, log) for p in parts]
    finally:
        bar.close()
    log(f"tokenized {bar.summary()}")
    return finalize(cfg, data_root, results, log)


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
