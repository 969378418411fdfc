"""The `slm` command: train, prepare, sample (and the commands later modules add).

    slm train --config configs/tiny.yaml --no-wandb --training.learning_rate 3e-3
    slm prepare --config configs/tiny.yaml
    slm sample data/models/tiny_final.pt --prompt "def " --max-new-tokens 200

Every command that reads a config takes dotted overrides for any key (`--section.key value`),
`--data-root DIR` (default ./data; /data on Modal) and prints errors without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from src.errors import SLMError

DEFAULT_CONFIG = "configs/tiny.yaml"


def split_overrides(extra: list[str]) -> list[str]:
    """['--training.lr', '3e-4', '--a.b=c'] -> ['training.lr=3e-4', 'a.b=c']."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or "." not in tok.split("=")[0]:
            raise SLMError(
                f"unknown option {tok!r}; config keys are overridden as --section.key value "
                "(e.g. --training.learning_rate 3e-4)"
            )
        key = tok[2:]
        if "=" in key:
            out.append(key)
        else:
            if i + 1 >= len(extra):
                raise SLMError(f"option {tok} needs a value")
            out.append(f"{key}={extra[i + 1]}")
            i += 1
        i += 1
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--data-root", default=None,
                   help="where datasets/, checkpoints/ and models/ live (default ./data)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")


def load_cfg(args, extra: list[str]):
    from src.training.config import load_config

    overrides = split_overrides(extra)
    if args.name:
        overrides.append(f"name={args.name}")
    return load_config(args.config, overrides)


def data_root(args) -> Path:
    return Path(args.data_root or os.environ.get("SLM_DATA_ROOT", "data"))


# ----------------------------------------------------------------------------- commands


def cmd_train(args, extra) -> int:
    cfg = load_cfg(args, extra)
    if args.dry_run:
        from src.tools.dryrun import describe

        print(describe(cfg, args.device))
        return 0
    if not args.no_wandb and cfg.wandb.mode != "disabled":
        from src.training.wandb_sink import check_online_ready

        check_online_ready(cfg)
    from src.hardware import resolve_device
    from src.training.trainer import train

    if os.environ.get("WORLD_SIZE", "1") == "1":
        resolve_device(args.device)  # a clear error before any data work
    res = train(cfg, data_root=data_root(args), device=args.device, resume=args.resume,
                use_wandb=not args.no_wandb)
    if args.samples and res.final_checkpoint and int(os.environ.get("RANK", "0")) == 0:
        from src.tools.sample import print_samples

        print_samples(res.final_checkpoint, prompt=cfg.training.sample_prompt, n=args.samples,
                      max_new_tokens=200)
    return 0


def cmd_prepare(args, extra) -> int:
    from src.data.prepare import prepare

    if args.workers is not None:
        extra = [*extra, f"--data.num_workers={args.workers}"]
    cfg = load_cfg(args, extra)
    ds = prepare(cfg, data_root(args), progress=args.progress)
    m = ds.manifest
    print(f"{ds.dir}: {m['train']['tokens']:,} train + {m['val']['tokens']:,} val tokens, "
          f"{len(ds.train)} + {len(ds.val)} shards, {m['tokenizer']['kind']} vocab "
          f"{m['tokenizer']['vocab_size']}")
    return 0


def cmd_sample(args, extra) -> int:
    if extra:
        raise SLMError(f"unknown option(s) for sample: {' '.join(extra)}")
    from src.tools.sample import print_samples

    print_samples(args.checkpoint, prompt=args.prompt or [""], n=args.num_samples,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
                  stop=args.stop, batch_size=args.batch_size, stop_at_eot=not args.ignore_eot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slm", description="Train your own small GPT.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumes automatically)")
    add_config_args(p)
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint of this run), never (start over; the old run is "
                        "moved aside), or a checkpoint path")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, size, FLOPs and memory estimate, then exit")
    p.add_argument("--samples", type=int, default=0,
                   help="extra samples printed at the end (the run already ends with "
                        "training.num_samples of them)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("prepare", help="tokenize a config's data into shards")
    add_config_args(p)
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default data.num_workers; 0 = one per core)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when the output is a terminal)")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append",
                   help="text to continue (repeat for several prompts; default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="samples generated together")
    p.add_argument("--seed", type=int, default=None, help="makes the samples repeatable")
    p.add_argument("--stop", action="append", help="end a sample before this string (repeatable)")
    p.add_argument("--ignore-eot", action="store_true",
                   help="keep generating past the end-of-text token")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(fn=cmd_sample)

    _add_serve(sub)
    for register in _plugins():
        register(sub)
    return ap


def _add_serve(sub) -> None:
    """`slm serve CHECKPOINT`: the OpenAI-compatible HTTP server and chat page (src/tools/serve.py)."""

    def cmd_serve(args, extra) -> int:
        if extra:
            raise SLMError(f"unknown option(s) for serve: {' '.join(extra)}")
        from src.tools.serve import serve

        serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
              insecure=args.insecure, device=args.device, max_batch=args.max_batch,
              max_tokens=args.max_tokens)
        return 0

    p = sub.add_parser(
        "serve", help="serve a model over OpenAI's HTTP API, with a chat page at /",
        description="Serve a model over OpenAI's API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, streamed or not) with a chat page at /. "
                    "See docs/serve.md.")
    p.add_argument("checkpoint", help="model file (models/<name>_final.pt), checkpoint or "
                                      ".safetensors export")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another "
                        "address needs an API key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: the "
                        "SLM_API_KEY environment variable, which keeps the key out of ps)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences generated together at most (default 16)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default: the context)")
    p.set_defaults(fn=cmd_serve)


def _plugins():
    """Commands defined next to their code (plot, cost, eval, export) register themselves."""
    import importlib

    out = []
    for mod in ("src.tools.plot", "src.tools.cost", "src.tools.evaluate", "src.tools.export"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        out.append(m.register)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    try:
        return args.fn(args, extra) or 0
    except SLMError as e:
        from src.training.trainer import Interrupted

        print(f"error: {e}" if not isinstance(e, Interrupted) else f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Interrupted) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine, not the program: a full disk, a read-only folder, ...
        if e.errno not in _ENV_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror}{where}; free disk space or fix the folder's permissions "
              "(or point --data-root elsewhere), then re-run: finished work is kept",
              file=sys.stderr)
        return 2


_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}


def entry() -> None:
    sys.exit(main())
