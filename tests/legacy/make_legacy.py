"""Write the legacy fixture: tiny runs made by the code of a given commit, to prove that later
code still loads and resumes them exactly.

    git stash; python tests/legacy/make_legacy.py; git stash pop     # (run on the old commit)

It trains two tiny runs (AdamW with GPT-2's architecture, and Muon with RoPE/RMSNorm/QK-norm/
SwiGLU) for 6 steps at a fixed absolute path (/tmp/slm-legacy-fixture, since a local source's
dataset key includes its path), keeps each run's step_3.pt and the dataset folder, and stores the
uninterrupted run's final weights as models/<name>_final.pt. tests/test_legacy.py resumes
step_3.pt with today's code and compares the result with those weights, bit for bit.
"""

import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path("/tmp/slm-legacy-fixture")
OUT = Path(__file__).resolve().parent / "v1"
MTIME = 1_700_000_000  # the corpus' mtime is part of the dataset key: the test sets it back

COMMON = """
data:
  source: /tmp/slm-legacy-fixture/corpus.txt
  tokenizer: bpe
  vocab_size: 300
  val_fraction: 0.1
training:
  batch_size: 4
  max_steps: 6
  warmup_steps: 2
  eval_every: 100
  eval_tokens: 512
  checkpoint_every: 3
  keep_last: 3
  num_samples: 0
  log_every: 1
  compile: false
wandb:
  mode: disabled
"""
RUNS = {
    "legacy_adamw": "model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32}\n",
    "legacy_muon": ("model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, pos_emb: rope, "
                    "norm: rmsnorm, qk_norm: true, mlp: swiglu, bias: false}\n"),
}


def corpus() -> str:
    rng = random.Random(0)
    words = ["the", "model", "reads", "a", "token", "and", "writes", "def", "class", "return",
             "import", "loss", "falls", "slowly", "(", ")", ":", "=", "+", "\n", "    "]
    return "".join(" ".join(rng.choice(words) for _ in range(60)) + ".\n\n" for _ in range(300))


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    src = ROOT / "corpus.txt"
    src.write_text(corpus())
    import os

    os.utime(src, (MTIME, MTIME))
    for name, model in RUNS.items():
        cfg = ROOT / f"{name}.yaml"
        training = COMMON if name == "legacy_adamw" else COMMON.replace(
            "training:\n", "training:\n  optimizer: muon\n  learning_rate: 3.0e-3\n")
        cfg.write_text(f"name: {name}\n{model}{training}")
        subprocess.run([sys.executable, "train_local.py", "--config", str(cfg), "--data-root",
                        str(ROOT), "--no-wandb", "--device", "cpu"], check=True)
        run = ROOT / "checkpoints" / name
        (run / "final.pt").unlink()
        for p in run.glob(".lock"):
            p.unlink()
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.copytree(ROOT, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
