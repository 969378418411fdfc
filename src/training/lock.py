"""One process trains a run folder at a time: flock on one machine, a leased key across machines."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
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


LEASE_S = 600.0  # a holder that stops renewing loses the lock after this long (clock skew margin)


class LeaseLock:
    """A lock across machines that share a key-value store with an atomic put-if-absent.

    The store is a `modal.Dict` on Modal (flock does not work across containers: their volume has
    no distributed locks), or anything with its methods: `put(key, value, *, skip_if_exists)`
    (True iff it created the key), `get`, `contains`, `__setitem__`. Each taking of the lock
    creates the key `<key>/<generation>` with put-if-absent, so of two takers only one wins; the
    holder renews its lease in a background thread and a holder that dies loses the lock when the
    lease expires. The same `owner` (a retried attempt of the same Modal call) takes it over
    at once.
    """

    def __init__(self, store, key: str, what: str, owner: str | None = None,
                 lease_s: float = LEASE_S, log=print, clock=time.time):
        self.store, self.key, self.what, self.lease_s, self.log, self.clock = (
            store, key, what, lease_s, log, clock)
        self.owner = owner or uuid.uuid4().hex
        self.who = f"pid {os.getpid()} on {os.uname().nodename}"
        self.gen: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _k(self, gen: int) -> str:
        return f"{self.key}/{gen}"

    def _value(self, expires: float) -> dict:
        return {"owner": self.owner, "who": self.who, "expires": expires}

    def _head(self) -> int:
        """The newest generation (-1: never taken): the hint, then probing past it."""
        gen = self.store.get(f"{self.key}/head", -1)
        while self.store.contains(self._k(gen + 1)):
            gen += 1
        return gen

    def holder(self) -> dict | None:
        """The current holder's record, or None when the lock is free."""
        gen = self._head()
        cur = self.store.get(self._k(gen)) if gen >= 0 else None
        if cur and cur["expires"] > self.clock() and cur["owner"] != self.owner:
            return cur
        return None

    def try_acquire(self) -> dict | None:
        """Take the lock: None on success, else the holder's record."""
        gen = self._head()
        cur = self.store.get(self._k(gen)) if gen >= 0 else None
        if cur and cur["expires"] > self.clock() and cur["owner"] != self.owner:
            return cur
        if not self.store.put(self._k(gen + 1), self._value(self.clock() + self.lease_s),
                              skip_if_exists=True):
            return self.store.get(self._k(gen + 1)) or {"who": "another container"}
        self.gen = gen + 1
        self.store[f"{self.key}/head"] = self.gen
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return None

    def acquire(self, wait_s: float = 0.0, poll_s: float = 10.0) -> LeaseLock:
        """Take the lock, waiting up to `wait_s` for it; SLMError naming the holder otherwise."""
        deadline = time.monotonic() + wait_s
        while (held := self.try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise self._refusal(held)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        return self

    def check_free(self) -> None:
        """SLMError when another owner holds the lock (a taker that must not take it itself:
        the other containers of a multi-node run, whose rank 0 holds it for all of them)."""
        if (held := self.holder()) is not None:
            raise self._refusal(held)

    def _refusal(self, held: dict) -> SLMError:
        left = max(0.0, held.get("expires", 0) - self.clock())
        return SLMError(
            f"{self.what} is in use by another container ({held.get('who', '?')}; its lease "
            f"runs {left:.0f} s more unless renewed); wait for it, stop it, or give this run "
            "another name (--name NAME)")

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) when another taker has it now."""
        if self.gen is None or self.lost:
            return False
        if self.store.contains(self._k(self.gen + 1)):
            self.lost = True
            self.log(f"warning: {self.what}: the lock was taken over by another container")
            return False
        self.store[self._k(self.gen)] = self._value(self.clock() + self.lease_s)
        return True

    def _heartbeat(self):
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a store hiccup: try again next beat, the lease has slack
                self.log(f"warning: {self.what}: lock renewal failed ({e})")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.gen is not None and not self.lost:
            with contextlib.suppress(Exception):
                if not self.store.contains(self._k(self.gen + 1)):
                    self.store[self._k(self.gen)] = self._value(0.0)
        self.gen = None

    def __enter__(self) -> LeaseLock:
        return self.acquire() if self.gen is None else self

    def __exit__(self, *exc) -> None:
        self.release()
