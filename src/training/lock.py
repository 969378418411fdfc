"""One process trains a run folder at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from src.errors import SLMError


class RunLock:
    """flock on <run>/.lock: released by the kernel even on SIGKILL (one machine only)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks: go on unlocked
                return
            self.f.seek(0)
            who = self.f.read().strip() or "another process"
            self.f.close()
            run_dir = path.parent
            raise SLMError(
                f"run '{run_dir.name}' is already being trained ({who}) in {run_dir}; wait for it, "
                "stop it, or give this run another name (--name NAME)"
            ) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self.f.flush()

    def release(self):
        with contextlib.suppress(OSError):
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
