"""`slm eval CHECKPOINT`: validation loss, perplexity, bits per byte, and HellaSwag.

    slm eval data/models/tiny_final.pt                          # the run's validation split
    slm eval final.pt --data.source notes/ --split all           # any text, all of it
    slm eval final.pt --hellaswag --hellaswag-limit 1000         # + HellaSwag (downloaded once)
    slm eval final.pt --hellaswag-file hellaswag_val.jsonl       # + HellaSwag from a local copy

The text is the run's validation shards under --data-root when they are there, else the
validation split of data.source (the checkpoint's, or --data.source / any --data.KEY), encoded
with the checkpoint's tokenizer. HellaSwag runs when asked for, or when a copy is already cached.
"""

from __future__ import annotations

import argparse
import json
import math

from src.errors import SLMError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="validation loss, perplexity, bits per byte and HellaSwag of a checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a step_N.pt, final.pt, models/<name>_final.pt or .safetensors export")
    p.add_argument("--data-root", default=None, help="where datasets/ lives (default ./data)")
    p.add_argument("--split", default="val", choices=["val", "all"],
                   help="evaluate the validation split (default) or every document of the source")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="tokens to score (default: the run's training.eval_tokens; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    p.add_argument("--no-loss", action="store_true", help="skip the loss / bits-per-byte part")
    hs = p.add_mutually_exclusive_group()
    hs.add_argument("--hellaswag", action="store_true",
                    help="run HellaSwag, downloading the validation file once if needed")
    hs.add_argument("--no-hellaswag", action="store_true", help="skip HellaSwag even if cached")
    p.add_argument("--hellaswag-file", default=None, help="a local hellaswag_val.jsonl")
    p.add_argument("--hellaswag-limit", type=int, default=None,
                   help="score only the first N examples (the full set is 10,042)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(fn=cmd_eval)


def _autocast(dev):
    import torch

    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


def cmd_eval(args, extra) -> int:
    from src.cli import data_root, split_overrides
    from src.training.config import DataConfig, apply_overrides

    overrides = split_overrides(extra)
    bad = [o.split("=")[0] for o in overrides if not o.startswith("data.")]
    if bad:
        raise SLMError(f"slm eval takes only --data.KEY overrides, not {', '.join(bad)}")
    from src.tools.sample import load_model

    model, tok, cfg = load_model(args.checkpoint, args.device)
    dev = next(model.parameters()).device
    autocast = _autocast(dev)
    res: dict = {"checkpoint": str(args.checkpoint), "params": model.num_params()}

    if not args.no_loss:
        raw = apply_overrides({"data": cfg.data.model_dump()}, overrides)["data"]
        try:
            data_cfg = DataConfig.model_validate(raw)
        except Exception as e:
            raise SLMError(f"data overrides: {e}") from None
        from src.eval.lm import lm_metrics, run_val_tokens, source_tokens

        seq_len = min(args.seq_len or cfg.seq_len, cfg.model.block_size)
        want = cfg.training.eval_tokens if args.eval_tokens is None else args.eval_tokens
        want = None if want == 0 else max(want, seq_len)
        tokens = None
        if args.split == "val":
            tokens = run_val_tokens(data_cfg, tok, data_root(args), want)
            where = "the run's validation shards"
        if tokens is None:
            tokens = source_tokens(data_cfg, tok, args.split, want, data_root(args))
            where = f"{args.split} split of {data_cfg.source}"
        m = lm_metrics(model, tokens, tok.token_bytes(), seq_len,
                       args.batch_size or cfg.training.batch_size, autocast)
        res |= {"data": where, **m}

    from src.eval import hellaswag as hs

    if not args.no_hellaswag:
        path = hs.locate(args.hellaswag_file, download=args.hellaswag)
        if path is not None:
            examples = hs.load_examples(path, args.hellaswag_limit)
            res |= hs.evaluate(model, tok, examples, autocast)
        else:
            res["hellaswag"] = "skipped: no local copy (--hellaswag downloads it once)"

    if args.json:
        print(json.dumps(res))
        return 0
    print(f"checkpoint  {res['checkpoint']} ({res['params'] / 1e6:.2f}M params)")
    if "val/loss" in res:
        print(f"data        {res['data']}: {res['val/tokens']:,} tokens")
        print(f"loss        {res['val/loss']:.4f} nats/token")
        print(f"perplexity  {res['val/ppl']:.2f}")
        print(f"bits/byte   {res['val/bpb']:.4f}")
    if "hellaswag/acc" in res:
        n = res["hellaswag/examples"]
        se = math.sqrt(res["hellaswag/acc_norm"] * (1 - res["hellaswag/acc_norm"]) / n)
        print(f"hellaswag   acc_norm {res['hellaswag/acc_norm']:.4f} (+/- {se:.4f}), "
              f"acc {res['hellaswag/acc']:.4f} on {n:,} examples (chance 0.25)")
    elif "hellaswag" in res:
        print(f"hellaswag   {res['hellaswag']}")
    return 0
