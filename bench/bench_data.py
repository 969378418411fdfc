"""Data pipeline speed: preparation MB/s and tokens/s with 1 and with all workers, its peak memory,
and the loader's batches/s and tokens/s.

    python bench/bench_data.py                                    # the embedded corpus (~12 MB)
    python bench/bench_data.py --source tinyshakespeare.txt --repeat 20 --workers 1,2
    python bench/bench_data.py --repeat 10 --tokenizer char     # 10x the corpus: flat memory

The tokenizer is trained once (not timed); each preparation then runs as `slm prepare` in its own
process. Throughput is the text (UTF-8 MB) and tokens over the tokenizing time the manifest
records; the worker counts alternate for --rounds rounds and the best run of each is shown, since
other jobs on a shared machine make single runs noisy. Memory is measured in one more run per
worker count, sampling the process and its workers (PSS, so pages the workers share with their
parent are counted once): sampling costs CPU, so the timed runs are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import header  # noqa: E402

from src.data import sources  # noqa: E402
from src.data.loader import BatchLoader  # noqa: E402
from src.data.prepare import dataset_dir, load_dataset, plan  # noqa: E402
from src.training.config import load_config  # noqa: E402

TINY_TRAIN_TOKENS_S = 10_000  # the tiny config trains at roughly 4-10k tokens/s on a laptop CPU


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def _memory(pid: int) -> tuple[int, int]:
    """(PSS of pid and its descendants, largest single RSS), in bytes."""
    kids, todo, pss, rss = _children(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = max(rss, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return pss, rss


def _own_cpu(pid: int) -> float | None:
    """CPU seconds the process itself (not its workers) has used so far."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _corpus(source: str, repeat: int, tmp: Path) -> str:
    """The source itself, or a folder holding `repeat` copies of its documents."""
    if repeat == 1:
        return source
    d = tmp / "corpus"
    d.mkdir()
    for k in range(repeat):
        for i, text in enumerate(sources.iter_documents(source)):
            (d / f"{k:03d}_{i:05d}.txt").write_text(text, encoding="utf-8")
    return str(d)


def _copy_plan(cfg_path, overrides, base: Path, root: Path) -> Path:
    """A fresh data root holding the planned dataset's plan and tokenizer (not its shards)."""
    cfg = load_config(cfg_path, overrides)
    src, dst = dataset_dir(cfg.data, base), dataset_dir(cfg.data, root)
    shutil.rmtree(root, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in ("plan.json", "tokenizer.json", "tokenizer_slm.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    return dst


def bench_prepare(cfg_path, overrides, base: Path, root: Path, workers: int,
                  memory: bool = False) -> dict:
    """Run `slm prepare` on a copy of the planned dataset and time it; with memory, also sample
    the memory of it and its workers (which costs CPU: not for the timed runs)."""
    dst = _copy_plan(cfg_path, overrides, base, root)
    cmd = [sys.executable, "-m", "src", "prepare", "--config", str(cfg_path), "--data-root",
           str(root), "--workers", str(workers), "--no-progress"]
    cmd += [f"--{o}" for o in overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak_pss = peak_rss = main_cpu = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # usage: with the reaped workers
        if pid:
            break
        main_cpu = _own_cpu(proc.pid) or main_cpu  # one small /proc read
        if memory:
            pss, rss = _memory(proc.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.05)
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"prepare failed:\n{out}")
    m = json.loads((dst / "manifest.json").read_text())
    secs = m["seconds"]["tokenize"]
    nbytes = m["train"]["bytes"] + m["val"]["bytes"]
    tokens = m["train"]["tokens"] + m["val"]["tokens"]
    checked = {k: m["train"].get(k, 0) + m["val"].get(k, 0) for k in ("audited", "fallback")}
    return {"workers": workers, "seconds": secs, "wall": time.time() - t0,
            "mb_s": nbytes / 1e6 / secs, "tok_s": tokens / secs, "pss": peak_pss,
            "rss": peak_rss, "bytes": nbytes, "tokens": tokens, "dir": dst,
            "cpu": usage.ru_utime + usage.ru_stime, "main_cpu": main_cpu,
            "vocab": m["tokenizer"]["vocab_size"],
            "engine": m["tokenizer"].get("engine", "?"), **checked}


def bench_loader(ds_dir: Path, seq_len: int, batch_size: int, seconds: float = 3.0) -> dict:
    ds = load_dataset(ds_dir)
    loader = BatchLoader(ds.train, ds.tokenizer.id, seq_len, batch_size, seed=1337)
    loader.next_batch()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loader.next_batch()
        n += 1
    dt = time.perf_counter() - t0
    return {"batches_s": n / dt, "tok_s": n * batch_size * seq_len / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--source", default=sources.EMBEDDED, help="data.source to tokenize")
    ap.add_argument("--repeat", type=int, default=1, help="copies of the source's documents")
    ap.add_argument("--workers", default=None, help="worker counts, e.g. 1,2 (default: 1,all)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--tokenizer", default=None, help="data.tokenizer (default: the config's)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate the worker counts this many times; the best run of each counts "
                         "(other jobs on the machine make single runs noisy)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, cores})

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        source = _corpus(args.source, args.repeat, tmp)
        overrides = [f"data.source={source}", f"data.shard_tokens={args.shard_tokens}"]
        overrides += [f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []
        cfg = load_config(args.config, overrides)
        t0 = time.time()
        plan(cfg, tmp / "base", log=lambda *a: None)  # resolve + train the tokenizer, once
        t_plan = time.time() - t0
        load0 = os.getloadavg()[0]
        best: dict[int, dict] = {}
        for _ in range(args.rounds):
            for n in counts:
                r = bench_prepare(args.config, overrides, tmp / "base", tmp / f"w{n}", n)
                if n not in best or r["seconds"] < best[n]["seconds"]:
                    best[n] = r
        load1 = os.getloadavg()[0]
        for n in counts:  # memory: one sampled run each
            r = bench_prepare(args.config, overrides, tmp / "base", tmp / f"m{n}", n, memory=True)
            best[n]["pss"], best[n]["rss"] = r["pss"], r["rss"]
        rows = [best[n] for n in counts]
        loader = bench_loader(rows[-1]["dir"], cfg.seq_len, cfg.training.batch_size)

    first = rows[0]
    print(header())
    print(f"corpus: {args.source} x{args.repeat}: {first['bytes'] / 1e6:.1f} MB of text, "
          f"{first['tokens']:,} tokens ({cfg.data.tokenizer}, vocab {first['vocab']:,}, encoded "
          f"with {first['engine']}); tokenizer trained in {t_plan:.1f} s (not timed below)")
    if first["audited"]:
        print(f"checked against `tokenizers`: {first['audited']:,} texts, "
              f"{first['fallback']:,} differed (tokenizers' ids kept for those)")
    print(f"load average {load0:.1f} before / {load1:.1f} after the timed runs ({cores} cores)")
    print(f"{'workers':>7} {'tokenize s':>10} {'wall s':>7} {'CPU s':>6} {'main':>5} {'MB/s':>6} "
          f"{'MB/s/worker':>11} {'tokens/s':>10} {'speed-up':>8} {'peak PSS':>9} {'max RSS':>8}")
    for r in rows:
        print(f"{r['workers']:>7} {r['seconds']:>10.2f} {r['wall']:>7.1f} {r['cpu']:>6.1f} "
              f"{r['main_cpu']:>5.1f} {r['mb_s']:>6.2f} {r['mb_s'] / r['workers']:>11.2f} "
              f"{r['tok_s']:>10,.0f} {r['mb_s'] / first['mb_s']:>7.2f}x "
              f"{r['pss'] / 2**20:>6,.0f} MB {r['rss'] / 2**20:>5,.0f} MB")
    print(f"(best of {args.rounds} alternating runs each; memory from one more run each, sampled "
          "every 50 ms; wall and CPU s include starting Python and loading the shards; main: CPU "
          "s of the parent process alone, the serial share of the work)")
    ratio = loader["tok_s"] / TINY_TRAIN_TOKENS_S
    print(f"loader (batch {cfg.training.batch_size} x seq {cfg.seq_len}): "
          f"{loader['batches_s']:,.0f} batches/s, {loader['tok_s']:,.0f} tokens/s "
          f"= {ratio:,.0f}x the tiny config's ~{TINY_TRAIN_TOKENS_S:,} training tokens/s")


if __name__ == "__main__":
    main()
