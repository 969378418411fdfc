"""A stand-in for modal.Dict (no Modal servers here): the same method signatures, kept in a JSON
file guarded by flock, so several real processes share it as containers share a modal.Dict."""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

_MISSING = object()


class FileDict:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _open(self):
        with open(self.path.with_suffix(".lock"), "a+") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            before = dict(data)
            yield data
            if data != before:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(self.path)

    def put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        with self._open() as d:
            if skip_if_exists and key in d:
                return False
            d[key] = value
            return True

    def get(self, key, default=None):
        with self._open() as d:
            return d.get(key, default)

    def contains(self, key) -> bool:
        with self._open() as d:
            return key in d

    def pop(self, key, default=_MISSING):
        with self._open() as d:
            if key in d:
                return d.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def __getitem__(self, key):
        with self._open() as d:
            return d[key]

    def __setitem__(self, key, value) -> None:
        self.put(key, value)

    def __delitem__(self, key) -> None:
        self.pop(key)
