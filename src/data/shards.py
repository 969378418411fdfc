"""Token shard files: a 256-byte header, then the tokens (uint16 or uint32, little-endian).

Header: magic b"SLMTOKS1", format version (u32), bytes per token (u32), token count (u64),
tokenizer id (32 ASCII bytes), zero padding. Readers check every field and the file size, so a
truncated, foreign or mismatched shard is refused with a message naming the file.

Shards are written by `ShardWriter`, which streams tokens to `<name>.tmp` (memory stays bounded
however large the shard) and renames the file into place only once it is complete and synced.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from src.errors import SLMError

MAGIC = b"SLMTOKS1"
VERSION = 1
HEADER_BYTES = 256
_FMT = "<8sIIQ32s"


def _header(itemsize: int, n: int, tokenizer_id: str) -> bytes:
    head = struct.pack(_FMT, MAGIC, VERSION, itemsize, n, tokenizer_id.encode())
    return head.ljust(HEADER_BYTES, b"\0")


class ShardWriter:
    """Append tokens to a shard; `close()` writes the header and renames it into place."""

    def __init__(self, path: str | Path, dtype, tokenizer_id: str):
        self.path, self.tid = Path(path), tokenizer_id
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(_header(self.dtype.itemsize, 0, tokenizer_id))
        self.n = 0

    def write(self, tokens: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.n += len(tokens)

    def close(self) -> int:
        """Finish the shard (header, fsync, atomic rename); returns its token count."""
        self.f.seek(0)
        self.f.write(_header(self.dtype.itemsize, self.n, self.tid))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.n

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray, tokenizer_id: str) -> None:
    """Write a whole shard atomically: a crash never leaves a half shard under the final name."""
    w = ShardWriter(path, np.asarray(tokens).dtype, tokenizer_id)
    w.write(tokens)
    w.close()


def read_header(path: str | Path) -> dict:
    path = Path(path)
    fix = f"delete {path.parent} and run `slm prepare` again to rebuild it"
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise SLMError(f"shard {path}: cannot be read ({e.strerror}); {fix}") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise SLMError(f"shard {path}: not an slm token shard (bad header); {fix}")
    _, version, itemsize, n, tok = struct.unpack_from(_FMT, raw)
    if version != VERSION or itemsize not in (2, 4):
        raise SLMError(f"shard {path}: unsupported format v{version}/{itemsize}-byte; {fix}")
    if size != HEADER_BYTES + n * itemsize:
        raise SLMError(
            f"shard {path}: truncated or damaged ({size} bytes, header promises "
            f"{HEADER_BYTES + n * itemsize}); {fix}"
        )
    return {"n_tokens": n, "itemsize": itemsize, "tokenizer_id": tok.decode().rstrip("\0")}


def open_shard(path: str | Path, tokenizer_id: str | None = None) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header (and tokenizer, if given)."""
    h = read_header(path)
    if tokenizer_id is not None and h["tokenizer_id"] != tokenizer_id:
        raise SLMError(
            f"shard {path}: written by another tokenizer ({h['tokenizer_id'][:12]}, expected "
            f"{tokenizer_id[:12]}); delete {Path(path).parent} and prepare the data again"
        )
    dtype = np.dtype("<u2") if h["itemsize"] == 2 else np.dtype("<u4")
    if h["n_tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(h["n_tokens"],))
