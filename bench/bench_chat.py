"""Does chat fine-tuning help on questions it never saw answered? The loss on the held-out
assistant tokens of the embedded chat set (functions held out of training), base vs fine-tuned,
and one transcript of each for a held-out function.

    python train_local.py --config configs/tiny.yaml --no-wandb
    slm train --config configs/chat_tiny.yaml --no-wandb
    python bench/bench_chat.py --data-root data --base tiny --tuned chat_tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.checkpoint import load_model  # noqa: E402
from src.data.chat import prepare_chat  # noqa: E402
from src.data.chatset import stdlib_chats  # noqa: E402
from src.data.loader import val_batches  # noqa: E402
from src.eval.lm import evaluate  # noqa: E402
from src.tools.chat import Chat  # noqa: E402
from src.training.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--base", default="tiny", help="run name of the pretrained model")
    ap.add_argument("--tuned", default="chat_tiny", help="run name of the fine-tuned model")
    ap.add_argument("--config", default="configs/chat_tiny.yaml")
    args = ap.parse_args()
    cfg = load_config(args.config)
    models = Path(args.data_root) / "models"
    tuned, tok, _ = load_model(models / f"{args.tuned}_final.pt")
    base, _, _ = load_model(models / f"{args.base}_final.pt")
    ds = prepare_chat(cfg, args.data_root, tok, log=lambda *a: None)
    question = next(m for m, val in stdlib_chats() if val and m[0]["role"] == "user"
                    and m[0]["content"].startswith("What does"))
    for name, model in (("base", base), ("fine-tuned", tuned)):
        batches = val_batches(ds["val"], tok.id, cfg.seq_len, 16, 1 << 20, masks=ds["masks"]["val"])
        r = evaluate(model, batches, tok.token_bytes())
        print(f"{name:>10}: held-out assistant loss {r['val/loss']:.3f} over "
              f"{r['val/tokens']:,} tokens")
    for name, model in (("base", base), ("fine-tuned", tuned)):
        reply = Chat(model, tok, temperature=0, max_new_tokens=48).reply(question[0]["content"])
        print(f"\n[{name}] user: {question[0]['content']}\n[{name}] model: {reply}")
    print(f"[docstring] {question[1]['content']}")


if __name__ == "__main__":
    main()
