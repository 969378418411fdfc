"""Where metrics go: metrics.jsonl (always, the local source of truth), the console, and W&B.

Every sink takes the same calls: log(row) and close(), and optionally on_checkpoint(path, step),
on_final(final_ckpt, model_path, last_val) and on_interrupt(signum, step). A sink that raises is
reported once and switched off, so a monitoring problem never stops training.

A row is a flat dict with `step` and any of: tokens, time, train/loss (the mean over the log
interval), lr, grad_norm, tokens_per_sec and mfu (training steps only), eval_seconds and
checkpoint_seconds (time spent on them since the previous training row), eta_seconds, progress,
memory/*, cost_usd (training rows); val/loss, val/ppl, val/bpb and samples [{prompt, text}]
(evaluation rows).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl, in order (lines cut short by a kill are skipped)."""
    return parse_metrics(Path(path).read_text(encoding="utf-8"))


def parse_metrics(text: str) -> list[dict]:
    """Rows of a metrics.jsonl's text (wherever it was read from: a folder, a Modal volume)."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


class JsonlSink:
    """One JSON object per line in <run>/metrics.jsonl; rows past a resumed step are dropped."""

    name = "metrics.jsonl"

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [json.dumps(r) for r in read_metrics(path) if r["step"] <= resume_step]
            tmp = path.with_name(path.name + ".tmp")  # a kill here must not lose the history
            tmp.write_text("".join(x + "\n" for x in keep))
            tmp.replace(path)
        elif path.exists():
            path.unlink()
        self.f = open(path, "a", buffering=1)

    def on_config(self, values: dict, step: int) -> None:
        """A fact about the run learnt while training (e.g. compiled: false), as its own row."""
        self.log({"step": step, **values})

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        self.f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.f.close()


class Console:
    """Progress: a bar (tqdm) on a terminal, one plain line per log interval otherwise.

    Both show progress in the unit of the budget that ends the run first (steps, tokens, training
    time or cost), loss, tokens/s, MFU (where the GPU's peak is known), ETA and cost; plain lines
    keep logs that are not terminals (Modal's, files, CI) readable. `through(log)` makes other
    messages print above the bar instead of onto it.
    """

    name = "console"

    def __init__(self, max_steps: int, out=None, bar: bool | None = None,
                 max_tokens: int | None = None, max_seconds: float | None = None,
                 max_cost: float | None = None):
        self.limits = {"step": max_steps, "tokens": max_tokens, "time": max_seconds,
                       "cost_usd": max_cost}
        self.max_steps = max_steps
        self.out = out or sys.stdout
        self.use_bar = _isatty(self.out) if bar is None else bar
        self.bar = None

    def log(self, row: dict) -> None:
        if "train/loss" in row:
            if self.use_bar:
                self._update_bar(row)
            else:
                self._write(" | ".join(self._parts(row, plain=True)))
        if "val/loss" in row:
            bpb = row.get("val/bpb")
            self._write(f"step {row['step']:>6} | val loss {row['val/loss']:.4f}"
                        + (f" | val bpb {bpb:.4f}" if bpb is not None else ""))
        for s in row.get("samples") or []:
            self._write(f"--- sample (step {row['step']}) ---\n{s['prompt']}{s['text']}\n---")

    def through(self, log):
        """`log`, printing above the bar (never glued onto it) while the bar is shown."""
        def say(*args, **kwargs):
            if self.bar is None:
                return log(*args, **kwargs)
            self.bar.clear()
            try:
                return log(*args, **kwargs)
            finally:
                self.bar.refresh()
        return say

    def unit(self, row: dict) -> str:
        """The budget that ends the run first, judged on this row: step, tokens, time or cost."""
        shares = {k: row[k] / lim for k, lim in self.limits.items()
                  if lim and row.get(k) is not None}
        return max(shares, key=shares.get) if shares else "step"

    def _parts(self, row: dict, plain: bool) -> list[str]:
        unit = self.unit(row)
        lim = self.limits[unit]
        width = 6 if plain else 0
        if unit == "step":
            parts = [f"step {row['step']:>{width}}/{lim}"]
        else:
            done = {"tokens": lambda v: f"{_fmt_count(v)}/{_fmt_count(lim)} tokens",
                    "time": lambda v: f"{_fmt_secs(v)}/{_fmt_secs(lim)}",
                    "cost_usd": lambda v: f"${v:.2f}/${lim:.2f}"}[unit](row[unit])
            parts = [f"step {row['step']:>{width}}", done]
        parts.append(f"loss {row['train/loss']:.4f}")
        if plain and row.get("lr") is not None:
            parts.append(f"lr {row['lr']:.2e}")
        if row.get("tokens_per_sec") is not None:
            parts.append(f"{_fmt_rate(row['tokens_per_sec'])} tok/s")
        if row.get("mfu") is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("eta_seconds") is not None:
            parts.append(f"ETA {_fmt_secs(row['eta_seconds'])}")
        if row.get("cost_usd") is not None and unit != "cost_usd":
            parts.append(f"${row['cost_usd']:.2f}")
        return parts

    def _update_bar(self, row: dict) -> None:
        from tqdm import tqdm

        p = row.get("progress")
        n = min(1000, int(1000 * (p if p is not None else row["step"] / self.max_steps)))
        text = " | ".join(self._parts(row, plain=False))
        if self.bar is None:
            # A terminal that reports no size (0 x 0) would hide the bar: assume 100 x 24.
            size = shutil.get_terminal_size((100, 24))
            self.bar = tqdm(total=1000, initial=n, desc=text, file=self.out, ncols=size.columns,
                            nrows=size.lines, leave=True,
                            bar_format="{percentage:3.0f}%|{bar:20}| {desc}")
        else:
            self.bar.n = n
            self.bar.set_description_str(text, refresh=True)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:,.0f}"


def _fmt_count(x: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def peak_rss_gb() -> float:
    """This process's peak resident memory (the CPU counterpart of CUDA's peak allocation)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class Metrics:
    """Fans rows out to sinks; a sink that raises gets a warning and is switched off."""

    def __init__(self, sinks: list, log=print):
        self.sinks, self._log = [s for s in sinks if s is not None], log
        self.start = time.time()

    def log(self, row: dict) -> None:
        self.call("log", row)

    def call(self, method: str, *args) -> None:
        for s in list(self.sinks):
            fn = getattr(s, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as e:  # a monitoring failure must never stop training
                self._drop(s, method, e)

    def _drop(self, sink, method: str, e: Exception) -> None:
        name = getattr(sink, "name", type(sink).__name__)
        still = [getattr(s, "name", type(s).__name__) for s in self.sinks if s is not sink]
        self._log(f"warning: {name} failed in {method} ({type(e).__name__}: {e}); it is switched "
                  f"off and training continues (still written: {', '.join(still) or 'nothing'})")
        self.sinks.remove(sink)
        if method != "close":
            try:  # let it flush what it has (a W&B run gets finished)
                sink.close()
            except Exception:
                pass

    def close(self) -> None:
        self.call("close")
        self.sinks = []
