"""Time to loss on this machine: validation bits per byte a config reaches in 30, 60 and 100 s.

    python bench/bench_time_to_loss.py --text path/to/tinyshakespeare.txt [--budgets 30,60,100]
    python bench/bench_time_to_loss.py --text python-stdlib --budgets 100

The text is split 90/10 into train and validation (python-stdlib uses its own split). Each budget
is a complete run (`training.max_seconds` makes the schedule end exactly at the budget), timed as
the whole command: start-up, data preparation, training and the final evaluation.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, train: str, val: str | None, budget: float, extra: list[str], tmp: Path):
    root = tmp / f"root-{budget}"
    cmd = [sys.executable, "train_local.py", "--config", config, "--no-wandb", "--device", "cpu",
           "--samples", "0", "--data-root", str(root), "--data.source", train,
           "--training.max_seconds", str(budget), *extra]
    if val:
        cmd += ["--data.val_source", val]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        sys.exit(f"run failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(x) for f in glob.glob(f"{root}/checkpoints/*/metrics.jsonl")
            for x in open(f)]
    val_rows = [x for x in rows if "val/bpb" in x]
    tps = [x["tokens_per_sec"] for x in rows if "tokens_per_sec" in x]
    return {"budget": budget, "wall": wall, "bpb": val_rows[-1]["val/bpb"],
            "steps": val_rows[-1]["step"], "tokens": val_rows[-1]["tokens"],
            "tok_s": sum(tps[1:]) / max(len(tps) - 1, 1), "cmd": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True, help="a text file, or python-stdlib")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--budgets", default="30,60,100")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.text == "python-stdlib":
            train, val = "python-stdlib", None
        else:
            text = Path(args.text).read_text(encoding="utf-8")
            cut = int(len(text) * 0.9)
            (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
            (tmp / "val.txt").write_text(text[cut:], encoding="utf-8")
            train, val = str(tmp / "train.txt"), str(tmp / "val.txt")
        results = [run(args.config, train, val, float(b), extra, tmp)
                   for b in args.budgets.split(",")]
    print(f"\n{args.config} on {Path(args.text).name}, CPU ({__import__('os').cpu_count()} cores)")
    print("| budget (s) | whole command (s) | val bits/byte | steps | tokens | train tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['budget']:.0f} | {r['wall']:.1f} | {r['bpb']:.3f} | {r['steps']} | "
              f"{r['tokens']:,} | {r['tok_s']:,.0f} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
