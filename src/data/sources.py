"""Where text comes from: `iter_documents(source)` yields documents (str) from any data.source.

Sources:
  python-stdlib        the running interpreter's standard-library sources (no download)
  path/to/file.txt     one document per file; folders are read recursively (.txt, .md, .py, .jsonl)
  path/to/file.jsonl   one document per line, from the `text_field` of each JSON object
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from src.errors import SLMError

EMBEDDED = "python-stdlib"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def stdlib_files() -> list[Path]:
    """The standard library's .py sources, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise SLMError(f"no Python sources found under {root}: use a local data.source instead")
    return files


def local_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        ok = TEXT_SUFFIXES | JSONL_SUFFIXES
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ok)
        if not files:
            raise SLMError(f"data.source {source}: the folder has no {', '.join(sorted(ok))} files")
        return files
    raise SLMError(
        f"data.source {source}: no such file or folder; give a path to text/.jsonl files "
        f"or '{EMBEDDED}' for the embedded corpus"
    )


def _files(source: str) -> list[Path]:
    return stdlib_files() if source == EMBEDDED else local_files(source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SLMError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it with "
            f"`iconv -f latin1 -t utf-8` or remove it from data.source"
        ) from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SLMError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise SLMError(
                    f"{path}:{n}: no '{text_field}' field (has: {keys}); set data.text_field"
                )
            yield str(row[text_field])


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of a source, in a fixed order."""
    for path in _files(source):
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(path, text_field)
        else:
            yield _read_text(path)


def fingerprint(source: str) -> str:
    """Changes whenever the source's content may have changed (paths, sizes, mtimes)."""
    h = hashlib.sha256(source.encode())
    if source == EMBEDDED:
        h.update(sysconfig.get_python_version().encode())
    for p in _files(source):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic train/val split: every (1/val_fraction)-th document, spread evenly."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)
