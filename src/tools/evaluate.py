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

import math

from src import hardware as hw
from src import paths, validate
from src.checkpoint import load_model
from src.errors import SLMError
from src.eval import hellaswag as hs
from src.eval.lm import evaluate, run_val_tokens, source_tokens, token_windows
from src.training.config import DataConfig, apply_overrides, config_from_dict


def evaluate_checkpoint(checkpoint, data_root=None, split: str = "val",
                        eval_tokens: int | None = None, batch_size: int | None = None,
                        seq_len: int | None = None, loss: bool = True,
                        hellaswag: bool | None = None, hellaswag_file=None,
                        hellaswag_limit: int | None = None, device: str = "auto",
                        data_overrides=()) -> dict:
    """`slm eval`: loss/perplexity/bits per byte on held-out text, and HellaSwag.

    hellaswag: True downloads the file if needed, None runs it only when a copy is at hand,
    False skips it. data_overrides: ['data.source=notes/', ...] for the text to score.
    """
    bad = [o.split("=")[0] for o in data_overrides if not o.startswith("data.")]
    if bad:
        raise SLMError(f"slm eval takes only --data.KEY overrides, not {', '.join(bad)}")
    model, tok, raw = load_model(checkpoint, device)
    cfg = config_from_dict(raw)
    autocast = hw.autocast(next(model.parameters()).device,
                           hw.amp_dtype(next(model.parameters()).device))
    res: dict = {"checkpoint": str(checkpoint), "params": model.num_params()}
    if loss:
        res |= _loss_part(model, tok, cfg, paths.data_root(data_root), split, eval_tokens,
                          batch_size, seq_len, autocast, data_overrides)
    if hellaswag is not False:
        path = hs.locate(hellaswag_file, download=bool(hellaswag))
        if path is not None:
            res |= hs.evaluate(model, tok, hs.load_examples(path, hellaswag_limit), autocast)
        else:
            res["hellaswag"] = "skipped: no local copy (--hellaswag downloads it once)"
    return res


def _loss_part(model, tok, cfg, root, split, eval_tokens, batch_size, seq_len, autocast,
               overrides) -> dict:
    raw = apply_overrides({"data": cfg.data.model_dump()}, list(overrides))["data"]
    try:
        data_cfg = DataConfig.model_validate(raw)
    except Exception as e:
        raise SLMError(f"data overrides: {e}") from None
    seq_len = validate.number("--seq-len", seq_len or min(cfg.seq_len, cfg.model.block_size),
                              1, cfg.model.block_size)
    want = cfg.training.eval_tokens if eval_tokens is None else eval_tokens
    want = None if want == 0 else max(want, seq_len)
    tokens = run_val_tokens(data_cfg, tok, root, want) if split == "val" else None
    where = "the run's validation shards"
    if tokens is None:
        tokens = source_tokens(data_cfg, tok, split, want, root)
        where = f"{split} split of {data_cfg.source}"
    batches = token_windows(tokens, seq_len, batch_size or cfg.training.batch_size)
    return {"data": where, **evaluate(model, batches, tok.token_bytes(), autocast)}


def format_results(res: dict) -> str:
    lines = [f"checkpoint  {res['checkpoint']} ({res['params'] / 1e6:.2f}M params)"]
    if "val/loss" in res:
        lines += [f"data        {res['data']}: {res['val/tokens']:,} tokens",
                  f"loss        {res['val/loss']:.4f} nats/token",
                  f"perplexity  {res['val/ppl']:.2f}",
                  f"bits/byte   {res['val/bpb']:.4f}"]
    if "hellaswag/acc" in res:
        n = res["hellaswag/examples"]
        se = math.sqrt(res["hellaswag/acc_norm"] * (1 - res["hellaswag/acc_norm"]) / n)
        lines.append(f"hellaswag   acc_norm {res['hellaswag/acc_norm']:.4f} (+/- {se:.4f}), "
                     f"acc {res['hellaswag/acc']:.4f} on {n:,} examples (chance 0.25)")
    elif "hellaswag" in res:
        lines.append(f"hellaswag   {res['hellaswag']}")
    return "\n".join(lines)
