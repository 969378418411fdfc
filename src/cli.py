"""The `slm` command: every subcommand's arguments, and nothing else.

    slm train --config configs/tiny.yaml --no-wandb --training.learning_rate 3e-3
    slm prepare --config configs/tiny.yaml
    slm sample data/models/tiny_final.pt --prompt "def " --max-new-tokens 200
    slm eval | export | plot | cost | plan ...  (slm COMMAND --help for each)

Every command that reads a config takes dotted overrides for any key (`--section.key value`),
`--data-root DIR` (default ./data; /data on Modal) and prints errors as one `error:` line.
The work is done by plain functions in src/tools/ and src/training/; this module only parses.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from src import paths
from src.errors import Interrupted, SLMError, record_error
from src.validate import arg, field_arg

DEFAULT_CONFIG = "configs/tiny.yaml"
DEVICES = ["auto", "cpu", "cuda", "mps"]


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


def load_cfg(args, extra: list[str]):
    from src.training.config import load_config

    overrides = split_overrides(extra)
    if args.name == "":
        raise SLMError("--name '': give a run name (letters, digits, '.', '_', '-'), or leave "
                       "--name out to use the config's")
    if args.name is not None:
        overrides.append(f"name={args.name}")
    return load_config(args.config, overrides)


def _no_extra(command: str, extra: list[str]) -> None:
    if extra:
        raise SLMError(f"unknown option(s) for {command}: {' '.join(extra)}")


# ----------------------------------------------------------------------------- commands


def cmd_train(args, extra) -> int:
    cfg = load_cfg(args, extra)
    if args.dry_run:
        from src.tools.dryrun import describe

        print(describe(cfg, args.device, args.data_root))
        return 0
    if args.smoke:
        from src.tools.smoke import run_smoke

        use = not args.no_wandb and cfg.wandb.mode != "disabled"
        dev = "cpu" if args.device == "auto" else args.device
        return run_smoke(cfg, paths.data_root(args.data_root), dev, use)
    if not args.no_wandb and cfg.wandb.mode != "disabled":
        from src.training.wandb_sink import check_online_ready

        check_online_ready(cfg)
    from src.hardware import resolve_device
    from src.training.trainer import train

    if os.environ.get("WORLD_SIZE", "1") == "1":
        resolve_device(args.device)  # a clear error before any data work
    res = train(cfg, data_root=paths.data_root(args.data_root), device=args.device,
                resume=args.resume, use_wandb=not args.no_wandb,
                check_memory=not args.ignore_memory)
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
    root, tok = paths.data_root(args.data_root), None
    if cfg.data.format == "chat" and cfg.model.init_from:  # the fine-tuned model's tokenizer
        from src.training.init_from import source_tokenizer

        tok = source_tokenizer(cfg.model.init_from, root)
    ds = prepare(cfg, root, progress=args.progress, tokenizer=tok)
    m = ds.manifest
    print(f"{ds.dir}: {m['train']['tokens']:,} train + {m['val']['tokens']:,} val tokens, "
          f"{len(ds.train)} + {len(ds.val)} shards, {m['tokenizer']['kind']} vocab "
          f"{m['tokenizer']['vocab_size']}")
    return 0


def cmd_sample(args, extra) -> int:
    _no_extra("sample", extra)
    from src.tools.sample import print_samples

    print_samples(args.checkpoint, prompt=args.prompt or [""], n=args.num_samples,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
                  stop=args.stop, batch_size=args.batch_size, stop_at_eot=not args.ignore_eot)
    return 0


def cmd_chat(args, extra) -> int:
    _no_extra("chat", extra)
    from src.tools.chat import run

    return run(args.checkpoint, device=args.device, system=args.system,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               max_new_tokens=args.max_new_tokens, seed=args.seed)


def cmd_eval(args, extra) -> int:
    import json

    from src.tools.evaluate import evaluate_checkpoint, format_results

    hellaswag = True if args.hellaswag else False if args.no_hellaswag else None
    res = evaluate_checkpoint(
        args.checkpoint, args.data_root, args.split, args.eval_tokens, args.batch_size,
        args.seq_len, loss=not args.no_loss, hellaswag=hellaswag,
        hellaswag_file=args.hellaswag_file, hellaswag_limit=args.hellaswag_limit,
        device=args.device, data_overrides=split_overrides(extra))
    print(json.dumps(res) if args.json else format_results(res))
    return 0


def cmd_export(args, extra) -> int:
    _no_extra("export", extra)
    from src.tools.export import export

    print(export(args.checkpoint, args.out, args.to, args.dtype, force=args.force))
    return 0


def cmd_serve(args, extra) -> int:
    _no_extra("serve", extra)
    from src.tools.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
          insecure=args.insecure, device=args.device, max_batch=args.max_batch,
          max_tokens=args.max_tokens)
    return 0


def cmd_plot(args, extra) -> int:
    _no_extra("plot", extra)
    from src.tools.plot import plot

    out = plot(args.runs, args.output, x=args.x, smooth=args.smooth, title=args.title,
               data_root=args.data_root, logy=args.logy, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_status(args, extra) -> int:
    from pathlib import Path

    from src.tools.status import LocalTree, status, sweep_status, volume_tree

    if extra:
        raise SLMError(f"slm status takes a run name, --sweep, --modal and --data-root, not "
                       f"{' '.join(extra)}")
    if args.modal and args.data_root:
        raise SLMError("--modal reads the volume slm-data; --data-root is for this machine")
    if args.sweep is not None and args.run:
        raise SLMError("give a run name or --sweep NAME, not both")
    root = Path(args.data_root or os.environ.get("SLM_DATA_ROOT") or paths.DEFAULT_DATA_ROOT)
    tree = volume_tree() if args.modal else LocalTree(root)
    print(sweep_status(tree, args.sweep) if args.sweep is not None
          else status(tree.root, args.run, tree))
    return 0


def cmd_cost(args, extra) -> int:
    from src.tools.cost import estimate_text, measured_mfu

    if args.gpu:
        extra = [*extra, "--modal.gpu", args.gpu]
    cfg = load_cfg(args, extra)
    mfu, source = args.mfu, "given" if args.mfu else None
    if args.metrics:
        mfu, source = measured_mfu(args.metrics), f"measured in {args.metrics}"
    print(f"{cfg.name}: {args.config}")
    print(estimate_text(cfg, mfu=mfu, mfu_source=source, root=getattr(args, "data_root", None)))
    return 0


def cmd_plan(args, extra) -> int:
    from src.tools.cost import measured_mfu
    from src.tools.plan import DEFAULT_BASE, data_note, describe, plan, target_for, write
    from src.training.config import load_config

    if args.device and args.gpu:
        raise SLMError("--device cpu plans for this machine, --gpu for Modal: give one")
    if args.mfu and args.metrics:
        raise SLMError("--mfu and --metrics both set the MFU: give one")
    config = args.config or DEFAULT_BASE["cpu" if args.device else "gpu"]
    base = load_config(config, split_overrides(extra))
    gpu = None if args.device else args.gpu or base.modal.gpu
    mfu, source = args.mfu, None
    if args.metrics:
        mfu, source = measured_mfu(args.metrics), f"measured in {args.metrics}"
    target = target_for({"budget": args.budget, "hours": args.hours, "minutes": args.minutes,
                         "flops": args.flops}, gpu, mfu, source, args.tokens_per_param)
    options = plan(target, base, log=lambda m: print(m, file=sys.stderr))
    if args.pick > len(options):
        raise SLMError(f"--pick {args.pick}: this plan has {len(options)} option(s)")
    chosen = options[args.pick - 1]
    print(describe(options, target, args.pick - 1))
    print(data_note(chosen.cfg, chosen.tokens, paths.data_root(args.data_root)
                    if args.data_root else paths.DEFAULT_DATA_ROOT))
    if args.output:
        out = write(chosen, args.output, args.force)
        run = ("python train_local.py --config " + str(out) if not gpu else
               f"modal run modal_app.py --config {out}")
        print(f"wrote {out} (option {args.pick}); train it with: {run}")
    return 0


# ----------------------------------------------------------------------------- parsers


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--data-root", default=None,
                   help="where datasets/, checkpoints/ and models/ live (default ./data)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")


def _cfg_arg(key: str):
    """type= for a flag that sets what config key `section.name` sets: the config's own range."""
    from src.training.config import Config

    section, name = key.split(".")
    return field_arg(Config.model_fields[section].annotation, name)


def _sample_arg(name: str):
    from src.model.gpt import Sampling

    return field_arg(Sampling, name)


def _sampling_args(p, **defaults) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, ranged by `Sampling`."""
    from src.model.gpt import Sampling

    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        f = Sampling.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), type=_sample_arg(name),
                       default=defaults.get(name), help=f.description)


def _doc(module: str) -> str:
    import importlib

    return importlib.import_module(module).__doc__ or ""


TRAIN_EPILOG = """\
any config field can be set on the command line as --section.key value, e.g.
  --training.max_steps 2000 --training.learning_rate 3e-4 --model.n_layer 6
  --training.max_seconds null          (null turns a limit off)
  --wandb.mode offline                 (online | offline | disabled; $WANDB_MODE wins when set)
  --wandb.project NAME --wandb.tags "[a, b]"
every field, with its default: docs/configuration.md
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes automatically)",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(p)
    p.add_argument("--no-wandb", action="store_true",
                   help="do not log to Weights & Biases (same as --wandb.mode disabled)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (default: cuda, then mps, then cpu) or a device")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint of this run), never (start over; the old run is "
                        "moved aside), or a checkpoint path")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, size, FLOPs and memory estimate, then exit")
    p.add_argument("--smoke", action="store_true",
                   help="rehearse this config's code path in minutes (a few steps, checkpoint, "
                        "exact resume), then forecast the GPU run's memory, time and cost")
    p.add_argument("--ignore-memory", action="store_true",
                   help="train even when the memory estimate exceeds the device's memory")
    p.add_argument("--samples", type=_cfg_arg("training.num_samples"), default=0,
                   help="extra samples printed at the end (the run already ends with "
                        "training.num_samples of them)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("prepare", help="tokenize a config's data into shards")
    _config_args(p)
    p.add_argument("--workers", type=_cfg_arg("data.num_workers"), default=None,
                   help="tokenizer processes (default data.num_workers; 0 = one per core)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when the output is a terminal)")
    p.set_defaults(fn=cmd_prepare)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append",
                   help="text to continue (repeat for several prompts; default: empty)")
    _sampling_args(p, max_new_tokens=200, temperature=0.8, top_k=200)
    p.add_argument("--num-samples", type=_sample_arg("samples"), default=1,
                   help="samples per prompt")
    p.add_argument("--batch-size", type=_sample_arg("batch_size"), default=8,
                   help="samples generated together")
    p.add_argument("--stop", action="append", help="end a sample before this string (repeatable)")
    p.add_argument("--ignore-eot", action="store_true",
                   help="keep generating past the end-of-text token")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda, then mps, then cpu (as train)")
    p.set_defaults(fn=cmd_sample)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a chat fine-tuned model in the terminal",
                       description=_doc("src.tools.chat"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a models/<name>_final.pt, step_N.pt or .safetensors export")
    p.add_argument("--system", default=None, help="system message opening the conversation")
    _sampling_args(p, max_new_tokens=256, temperature=0.7, top_k=50)
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda, then mps, then cpu (as train)")
    p.set_defaults(fn=cmd_chat)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="validation loss, perplexity, bits per byte and HellaSwag of a checkpoint",
        description=_doc("src.tools.evaluate"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a step_N.pt, final.pt, models/<name>_final.pt or .safetensors export")
    p.add_argument("--data-root", default=None, help="where datasets/ lives (default ./data)")
    p.add_argument("--split", default="val", choices=["val", "all"],
                   help="evaluate the validation split (default) or every document of the source")
    p.add_argument("--eval-tokens", type=arg(int, 0), default=None,
                   help="tokens to score (default: the run's training.eval_tokens; 0 = all)")
    p.add_argument("--batch-size", type=_cfg_arg("training.batch_size"), default=None,
                   help="windows per forward pass")
    p.add_argument("--seq-len", type=_cfg_arg("training.seq_len"), default=None,
                   help="window length (default: the run's)")
    p.add_argument("--no-loss", action="store_true", help="skip the loss / bits-per-byte part")
    hs = p.add_mutually_exclusive_group()
    hs.add_argument("--hellaswag", action="store_true",
                    help="run HellaSwag, downloading the validation file once if needed")
    hs.add_argument("--no-hellaswag", action="store_true", help="skip HellaSwag even if cached")
    p.add_argument("--hellaswag-file", default=None, help="a local hellaswag_val.jsonl")
    p.add_argument("--hellaswag-limit", type=_cfg_arg("training.hellaswag_examples"), default=None,
                   help="score only the first N examples (the full set is 10,042)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(fn=cmd_eval)


def _add_export(sub) -> None:
    from src.tools.export import DTYPES

    p = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face model folder, safetensors or GGUF",
        description=_doc("src.tools.export"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_N.pt, final.pt or models/<name>_final.pt")
    p.add_argument("out", help="OUT_DIR for --to hf; a .safetensors file for --to safetensors; "
                   "a .gguf file for --to gguf (llama.cpp, Ollama: see docs/gguf.md)")
    p.add_argument("--to", required=True, choices=["hf", "safetensors", "gguf"],
                   help="output format")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT (or write into a non-empty OUT_DIR)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weight precision of the export (default float32, as trained)")
    p.set_defaults(fn=cmd_export)


def _add_plot(sub) -> None:
    from src.tools.plot import X_AXES

    p = sub.add_parser(
        "plot", help="plot loss, learning rate and throughput of one or more runs to a PNG",
        description="Draw training/validation loss, bits per byte, the learning-rate schedule "
                    "and throughput from runs' metrics.jsonl; several runs share the axes.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder (data/checkpoints/<name>), its metrics.jsonl, or a run name")
    p.add_argument("-o", "--output", default=None,
                   help="image to write (.png, .svg, .pdf; default: <first run>/metrics.png)")
    p.add_argument("--x", default="tokens", choices=list(X_AXES),
                   help="x axis: tokens seen (default; lines up runs with different batch "
                        "sizes), optimizer step, or training time")
    p.add_argument("--smooth", type=arg(float, 0, 1, hi_open=True), default=0.0,
                   help="centred smoothing of the training loss, 0 to 0.99, as strong as an EMA "
                        "of that factor but without its lag; the raw curve stays faint behind "
                        "(default 0)")
    p.add_argument("--logy", action="store_true",
                   help="logarithmic y axis for the loss and bits-per-byte panels")
    p.add_argument("--title", default=None, help="figure title (default: the run names)")
    p.add_argument("--data-root", default=None,
                   help="where run names are looked up (default ./data)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file")
    p.set_defaults(fn=cmd_plot)


def _add_cost(sub) -> None:
    from src.tools.cost import ASSUMED_MFU

    p = sub.add_parser("cost", help="estimate GPU-hours and dollars of a config on Modal")
    _config_args(p)
    p.add_argument("--gpu", default=None, help="GPU to price instead of modal.gpu, e.g. H100:8")
    p.add_argument("--mfu", type=arg(float, 0, 1, lo_open=True), default=None,
                   help=f"model FLOPs utilisation to assume (default {ASSUMED_MFU})")
    p.add_argument("--metrics", default=None,
                   help="a run's metrics.jsonl (or run folder): use the MFU it measured")
    p.set_defaults(fn=cmd_cost)


def _add_plan(sub) -> None:
    from src.tools.cost import ASSUMED_MFU

    p = sub.add_parser("plan", help="from a budget to a config: model size, tokens, batch, lr",
                       description=_doc("src.tools.plan"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b = p.add_argument_group("the budget (give one)")
    b.add_argument("--budget", type=_cfg_arg("modal.max_cost_usd"), default=None,
                   help="US dollars on Modal (GPU, CPU and memory, as `slm cost` counts them)")
    b.add_argument("--hours", type=arg(float, 0, lo_open=True), default=None,
                   help="hours of training")
    b.add_argument("--minutes", type=arg(float, 0, lo_open=True), default=None,
                   help="minutes of training")
    b.add_argument("--flops", type=arg(float, 0, lo_open=True), default=None,
                   help="training FLOPs, e.g. 1e19")
    p.add_argument("--gpu", default=None,
                   help="Modal GPU, e.g. H100 or H100:8 (default: the base config's modal.gpu)")
    p.add_argument("--device", choices=["cpu"], default=None,
                   help="plan for this machine's CPU instead (times a few steps first)")
    p.add_argument("--config", default=None,
                   help="base config: data, tokenizer, model options and optimizer to keep "
                        "(default configs/gpt_124m.yaml for a GPU, configs/tiny.yaml for --device "
                        "cpu)")
    p.add_argument("--mfu", type=arg(float, 0, 1, lo_open=True), default=None,
                   help=f"GPU utilisation to plan with (default {ASSUMED_MFU}, labelled assumed)")
    p.add_argument("--metrics", default=None,
                   help="a run's metrics.jsonl (or run folder): plan with the MFU it measured")
    p.add_argument("--tokens-per-param", type=arg(float, 0, lo_open=True), default=None,
                   help="size the compute-optimal option at this many training tokens per "
                        "parameter (default: 20 on a GPU, Chinchilla's; docs/plan.md on a CPU)")
    p.add_argument("--pick", type=arg(int, 1, 4), default=1,
                   help="which option -o writes (default 1, the compute-optimal one)")
    p.add_argument("-o", "--output", default=None, help="write the chosen option as a config")
    p.add_argument("--force", action="store_true", help="replace an existing -o file")
    p.add_argument("--data-root", default=None,
                   help="where prepared datasets are looked up (default ./data)")
    p.set_defaults(fn=cmd_plan)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="where a run stands: step, losses, checkpoints, state",
                       description=_doc("src.tools.status"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="a run name (default: list every run)")
    p.add_argument("--sweep", default=None, metavar="NAME",
                   help="a sweep's table (its W&B group name), built from its points' folders")
    p.add_argument("--modal", action="store_true",
                   help="read the Modal volume slm-data through Modal's API (needs `modal setup`)")
    p.add_argument("--data-root", default=None,
                   help="where checkpoints/ lives (default $SLM_DATA_ROOT, else ./data)")
    p.set_defaults(fn=cmd_status)


def _add_serve(sub) -> None:
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
    p.add_argument("--port", type=arg(int, 1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: the "
                        "SLM_API_KEY environment variable, which keeps the key out of ps)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--max-batch", type=_sample_arg("batch_size"), default=16,
                   help="sequences generated together at most (default 16)")
    p.add_argument("--max-tokens", type=_sample_arg("max_new_tokens"), default=None,
                   help="the largest max_tokens a request may ask for (default: the context)")
    p.set_defaults(fn=cmd_serve)


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one `error:` line (naming the command and `--help`)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="slm", description="Train your own small GPT.")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sample, _add_chat, _add_eval, _add_export, _add_plot, _add_cost,
                _add_plan, _add_status, _add_serve):
        add(sub)
    return ap


_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EIO}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    try:
        args, extra = ap.parse_known_args(argv)
    except SystemExit as e:  # --help (0) or a usage mistake (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.fn(args, extra) or 0
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except SLMError as e:
        record_error(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError: a retry repeats it
            raise
        msg = ("out of GPU memory: lower training.batch_size (and raise "
               "training.gradient_accumulation_steps), or pick a larger GPU")
        record_error(msg)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the program: a full disk, a read-only folder, ...
        if e.errno not in _ENV_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror}{where}; free disk space or fix the folder's permissions "
              "(or point --data-root elsewhere), then re-run: finished work is kept",
              file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())
