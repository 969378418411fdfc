"""Where metrics go: metrics.jsonl (always, the local source of truth), the console, and W&B.

Each sink takes the same calls; a sink that fails is reported once and switched off, so a
monitoring problem never stops training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class JsonlSink:
    """One JSON object per line in <run>/metrics.jsonl; rows past a resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if row.get("step", 0) <= resume_step:
                    keep.append(line)
            tmp = path.with_name(path.name + ".tmp")  # a kill here must not lose the history
            tmp.write_text("".join(x + "\n" for x in keep))
            tmp.replace(path)
        elif path.exists():
            path.unlink()
        self.f = open(path, "a", buffering=1)

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.f.close()


class Console:
    """A progress line per log interval: step, loss, tokens/s, MFU, ETA."""

    def __init__(self, max_steps: int, out=sys.stdout):
        self.max_steps, self.out = max_steps, out

    def log(self, row: dict) -> None:
        if "train/loss" in row:
            eta = row.get("eta_seconds")
            parts = [
                f"step {row['step']:>6}/{self.max_steps}",
                f"loss {row['train/loss']:.4f}",
                f"lr {row['lr']:.2e}",
                f"{row['tokens_per_sec']:,.0f} tok/s",
            ]
            if row.get("mfu") is not None:
                parts.append(f"MFU {100 * row['mfu']:.1f}%")
            if eta is not None:
                parts.append(f"ETA {_fmt_secs(eta)}")
            if row.get("cost_usd") is not None:
                parts.append(f"${row['cost_usd']:.2f}")
            print(" | ".join(parts), file=self.out, flush=True)
        if "val/loss" in row:
            print(
                f"step {row['step']:>6} | val loss {row['val/loss']:.4f} | "
                f"val bpb {row['val/bpb']:.4f}",
                file=self.out,
                flush=True,
            )
        for s in row.get("samples", []):
            print(f"--- sample (step {row['step']}) ---\n{s['prompt']}{s['text']}\n---", file=self.out)

    def close(self) -> None:
        pass


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    """Fans rows out to sinks; a sink that raises gets a warning and is dropped."""

    def __init__(self, sinks: list, log=print):
        self.sinks, self._log = list(sinks), log
        self.start = time.time()

    def log(self, row: dict) -> None:
        for s in list(self.sinks):
            try:
                s.log(row)
            except Exception as e:  # a monitoring failure must never stop training
                self._drop(s, e)

    def call(self, method: str, *args) -> None:
        for s in list(self.sinks):
            fn = getattr(s, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as e:
                self._drop(s, e)

    def _drop(self, sink, e: Exception) -> None:
        self._log(f"warning: {type(sink).__name__} failed ({type(e).__name__}: {e}); "
                  "training continues, metrics.jsonl is still written")
        self.sinks.remove(sink)

    def close(self) -> None:
        self.call("close")
