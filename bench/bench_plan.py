"""`slm plan` against the hand-tuned config: the bits per byte each reaches in the same minutes.

    python bench/bench_plan.py                 # 3 minutes each, embedded corpus
    python bench/bench_plan.py --minutes 5

Writes `slm plan --device cpu --minutes M` (which times a few steps of each size here first),
trains its config and configs/tiny.yaml for the same training budget on the embedded corpus, one
after the other, and prints the validation bits per byte of both (the final evaluation's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header  # noqa: E402


def train(config: Path | str, minutes: float, root: Path, name: str) -> dict:
    cmd = [sys.executable, "train_local.py", "--config", str(config), "--no-wandb", "--device",
           "cpu", "--data-root", str(root), "--name", name,
           "--training.max_seconds", str(minutes * 60)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"training {config} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(x) for x in (root / "checkpoints" / name / "metrics.jsonl").open()]
    last = [x for x in rows if "val/bpb" in x][-1]
    return {"bpb": last["val/bpb"], "step": last["step"], "tokens": last["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    args = ap.parse_args()
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        plan_file = tmp / "plan.yaml"
        r = subprocess.run([sys.executable, "-m", "src", "plan", "--device", "cpu", "--minutes",
                            str(args.minutes), "-o", str(plan_file)], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"slm plan failed:\n{r.stderr[-2000:]}")
        print(r.stdout.split("\n\n")[0])
        res = {"slm plan": train(plan_file, args.minutes, tmp, "plan"),
               "configs/tiny.yaml": train("configs/tiny.yaml", args.minutes, tmp, "tiny")}
    print(f"\n{args.minutes:g} min of training each, embedded corpus:")
    print(f"{'config':<20} {'val bits/byte':>13} {'steps':>7} {'tokens':>11}")
    for k, v in res.items():
        print(f"{k:<20} {v['bpb']:>13.4f} {v['step']:>7,} {v['tokens']:>11,}")
    ratio = res["slm plan"]["bpb"] / res["configs/tiny.yaml"]["bpb"]
    print(f"plan / tiny: {ratio:.3f} ({'better' if ratio < 1 else 'worse'} by "
          f"{abs(1 - ratio):.1%})")


if __name__ == "__main__":
    main()
