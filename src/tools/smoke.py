"""`--smoke`: rehearse a config's real code path in minutes, then forecast its GPU run.

    python train_local.py --config configs/gpt_1b.yaml --smoke --no-wandb --device cpu
    slm train --config configs/gpt_350m.yaml --smoke

A rehearsal, never a training run: the same trainer (config validation, data preparation and
tokenizer, the model at its configured width, forward/backward/optimizer with gradient
accumulation, checkpoint save, eval and a sample) for 3 optimizer steps, then a second launch
resumes from the step-2 checkpoint and must reproduce step 3's loss exactly. What had to be
reduced to fit a CPU (depth, batch, sequence, data) is printed. It ends with a forecast for the
configured GPU (memory per GPU, tokens/s, hours, dollars) from src/tools/cost.py; every figure
that is assumed rather than measured says so. The run is named <name>-smoke and replaced each
time.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.errors import SLMError
from src.hardware import GPUS, gpu_spec
from src.model.gpt import GPT
from src.paths import RunLayout
from src.training.config import FIXED_VOCAB, Config, config_from_dict
from src.training.memory import MEMORY_SHARE, memory_estimate_gb
from src.training.metrics import peak_rss_gb, read_metrics

SMOKE_PARAMS = 100_000_000  # most parameters rehearsed: ~16 B each (weights, grads, AdamW)
SMOKE_SEQ = 32  # tokens per text sequence in the rehearsal (block_size, and so the shape, stay)
SMOKE_BATCH = 1  # sequences per micro-step
SMOKE_STEPS = 3  # optimizer steps; a checkpoint at step 2 is resumed to redo step 3
SAMPLE_BYTES = 600_000  # text of the embedded corpus the rehearsal prepares


@dataclass
class Rehearsal:
    cfg: Config  # the reduced config that ran
    notes: list[str] = field(default_factory=list)  # what was reduced or stood in, and why
    seconds: float = 0.0
    peak_rss_gb: float = 0.0
    checkpoint_gb: float = 0.0
    checkpoint_seconds: float | None = None
    loss: float | None = None
    resumed_loss: float | None = None
    peak_gpu_gb: float | None = None  # on a GPU: its peak allocated memory
    mfu: float | None = None  # on a GPU with a known peak: measured at the last step


# ----------------------------------------------------------------------------- the plan


def _sample_corpus(data_root: Path, chat: bool = False) -> Path:
    """A fixed sample of the embedded corpus (the standard library's sources) as .txt files, or,
    for a chat config, of the embedded chat set as one .jsonl file."""
    import json

    from src.data.chatset import stdlib_chats
    from src.data.sources import stdlib_files

    out = data_root / ("smoke-chats" if chat else "smoke-corpus")
    if out.is_dir() and any(out.iterdir()):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if chat:
        texts = (json.dumps({"messages": m}) + "\n" for m, _ in stdlib_chats())
    else:
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files())
    total, lines = 0, []
    for i, text in enumerate(texts):
        if chat:
            lines.append(text)
        else:
            (tmp / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        total += len(text)
        if total >= SAMPLE_BYTES:
            break
    if chat:
        (tmp / "chats.jsonl").write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)
    return out


def _source_note(source: str, chat: bool = False) -> str:
    """Whether data.source can be read from here (network sources: a 5 s probe)."""
    from src.data import sources as S

    sample = "the embedded chat set" if chat else "the embedded corpus"
    if source == S.EMBEDDED:
        return f"data.source {source}: embedded, no network needed; the rehearsal prepares a " \
               f"{SAMPLE_BYTES / 1e6:.1f} MB sample of {sample}"
    spec = S.expand(source)
    try:
        if S.is_hub(spec):
            S.require_hub(f"data.source {source}")
        elif S.is_url(spec):
            S.require_network(spec, f"data.source {source}")
        else:
            S.local_files(spec)
    except SLMError as e:
        return f"notice: {str(e).split('. ')[0]}; {sample} stands in for it"
    return f"data.source {source}: reachable; the rehearsal still trains on a sample of " \
           f"{sample} (reading the real source takes longer than a smoke run)"


def _tokenizer_plan(d: dict, notes: list[str]) -> None:
    """gpt2 needs tiktoken's files: offline, a byte tokenizer stands in at GPT-2's vocab size."""
    if d["data"]["tokenizer"] != "gpt2":
        return
    from src.data.tokenizer import GPT2Tokenizer

    try:
        GPT2Tokenizer()
    except SLMError as e:
        d["data"]["tokenizer"] = "bytes"
        d["model"]["vocab_size"] = d["model"].get("vocab_size") or FIXED_VOCAB["gpt2"]
        notes.append(f"notice: {str(e).split(': ')[0]}; a byte tokenizer stands in, with the "
                     f"model's vocabulary kept at {d['model']['vocab_size']} (the same shape)")


def _depth(cfg: Config) -> tuple[int, int, int]:
    """(layers that fit SMOKE_PARAMS, parameters of the full model, parameters per layer)."""
    m, vocab = cfg.model, cfg.model_vocab
    with torch.device("meta"):
        full = GPT(m.model_copy(update={"vocab_size": vocab})).num_params()
        one = GPT(m.model_copy(update={"vocab_size": vocab, "n_layer": 1})).num_params()
    per_layer = (full - one) // max(m.n_layer - 1, 1) if m.n_layer > 1 else one
    fixed = one - per_layer
    fit = max(1, min(m.n_layer, (SMOKE_PARAMS - fixed) // max(per_layer, 1)))
    return int(fit), int(full), int(per_layer)


def plan(cfg: Config, data_root: Path, full: bool = False) -> tuple[Config, list[str]]:
    """The reduced config a rehearsal runs, and a line for each reduction or stand-in.
    full (on a GPU): the configured depth, batch and sequence; only steps and data shrink."""
    d = cfg.to_dict()
    notes = [_source_note(cfg.data.source, cfg.data.format == "chat")]
    d["data"].update(source=str(_sample_corpus(data_root, cfg.data.format == "chat")),
                     val_source=None)
    if cfg.model.init_from:  # the source fixes the shape: keep only the keys the config sets
        d["model"] = cfg.model.model_dump(mode="json", include=cfg.model.model_fields_set)
        notes.append(f"model.init_from {cfg.model.init_from}: the model keeps the shape it loads "
                     "(no layers are left out)")
    _tokenizer_plan(d, notes)
    layers, n_full, _ = _depth(cfg)
    m, t = d["model"], d["training"]
    if layers < cfg.model.n_layer and not full and not cfg.model.init_from:
        notes.append(f"reduced: depth {cfg.model.n_layer} -> {layers} layers (width "
                     f"{cfg.model.n_embd}, heads and vocabulary as configured); the full "
                     f"{n_full / 1e6:.0f}M-parameter model needs ~{n_full * 16 / 2**30:.0f} GB for "
                     "fp32 weights, gradients and AdamW on a CPU")
        m["n_layer"] = layers
    accum = 2 if cfg.grad_accum() > 1 else 1
    # chat data keeps its sequence: a conversation cut to SMOKE_SEQ tokens has no answer left
    seq = cfg.seq_len if full or cfg.data.format == "chat" else min(cfg.seq_len, SMOKE_SEQ)
    batch = cfg.training.batch_size if full else min(cfg.training.batch_size, SMOKE_BATCH)
    notes.append(f"reduced: batch {cfg.training.batch_size} x {cfg.seq_len} x "
                 f"{cfg.grad_accum()} accum -> {batch} x {seq} x {accum}; {SMOKE_STEPS} steps, "
                 "eval on a few batches, one short sample")
    t.update(batch_size=batch, gradient_accumulation_steps=accum,
             batch_tokens=None, seq_len=seq, max_steps=SMOKE_STEPS, max_tokens=None,
             max_seconds=None,  # warmup as configured: the real run's first steps
             eval_every=SMOKE_STEPS, eval_tokens=2 * batch * seq, log_every=1,
             checkpoint_every=2, keep_last=2, num_samples=min(cfg.training.num_samples, 1),
             sample_tokens=16, hellaswag_every=None)
    d["modal"]["max_cost_usd"] = None
    d["name"] = f"{cfg.name}-smoke"
    return config_from_dict(d), notes


# ----------------------------------------------------------------------------- the run


def _step_row(layout: RunLayout, step: int) -> dict:
    rows = [r for r in read_metrics(layout.metrics) if r.get("step") == step and "train/loss" in r]
    return rows[-1] if rows else {}


def rehearse(cfg: Config, data_root: str | Path, device: str = "cpu", use_wandb: bool = False,
             log=print) -> Rehearsal:
    """Run the reduced config for SMOKE_STEPS steps, then resume its step-2 checkpoint and check
    that step 3 comes out the same. Raises SLMError when it does not."""
    from src.training.init_from import with_source_shape
    from src.training.trainer import train

    data_root = Path(data_root)
    with_source_shape(cfg, data_root, strict=True)  # model.init_from: refused before any work
    scfg, notes = plan(cfg, data_root, full=str(device).startswith("cuda"))
    for n in notes:
        log(n)
    layout = RunLayout(data_root, scfg.name)
    shutil.rmtree(layout.run_dir, ignore_errors=True)  # the rehearsal's own run, never a real one
    r = Rehearsal(scfg, notes)
    t0 = time.time()
    ran = scfg.model_copy(deep=True)
    train(ran, data_root, device, "never", use_wandb, log=log)
    r.cfg = ran  # with model.init_from: the shape it loaded, for the summary and the forecast
    row3 = _step_row(layout, SMOKE_STEPS)
    r.loss = row3.get("train/loss")
    r.checkpoint_seconds = row3.get("checkpoint_seconds")  # the step-2 save (logged at step 3)
    step2 = layout.step(2)
    r.checkpoint_gb = step2.stat().st_size / 1e9 if step2.is_file() else 0.0
    log(f"smoke: resuming from {step2} to check that step {SMOKE_STEPS} comes out the same")
    train(scfg.model_copy(deep=True), data_root, device, str(step2), use_wandb, log=log)
    r.resumed_loss = _step_row(layout, SMOKE_STEPS).get("train/loss")
    r.seconds = time.time() - t0
    r.peak_rss_gb = peak_rss_gb()
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        r.peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30
        r.mfu = row3.get("mfu")
    if r.loss is None or r.resumed_loss != r.loss:
        raise SLMError(f"--smoke: resuming from {step2} did not reproduce step {SMOKE_STEPS}'s "
                       f"loss ({r.resumed_loss} after resume, {r.loss} before): exact resume is "
                       "broken for this config; please report it")
    return r


# ----------------------------------------------------------------------------- the forecast


def _full_model(cfg: Config) -> GPT:
    with torch.device("meta"):
        return GPT(cfg.model.model_copy(update={"vocab_size": cfg.model_vocab}))


def _memory_advice(cfg: Config, need: float, have: float) -> str:
    if need <= have * MEMORY_SHARE:
        return f"fits ({need / have:.0%} of {have:.0f} GB)"
    bigger = [g.name for g in GPUS.values() if g.memory_gb * MEMORY_SHARE >= need]
    t = cfg.training
    return (f"does NOT fit in {have:.0f} GB: lower training.batch_size (raise "
            f"gradient_accumulation_steps to keep the batch; now {t.batch_size}), set "
            "model.grad_checkpoint: true, use training.parallelism: fsdp over several GPUs, or "
            f"a GPU with more memory ({', '.join(bigger) or 'none in the table'})")


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def forecast_text(cfg: Config, mfu: float | None = None, mfu_source: str | None = None) -> str:
    """Memory per GPU, tokens/s, hours and dollars of the full config on its configured GPU."""
    from src.tools.cost import estimate, gpu_count

    kind, n = gpu_count(cfg.modal.gpu, cfg.modal.nodes)
    spec = gpu_spec(kind)
    e = estimate(cfg, mfu=mfu, mfu_source=mfu_source)
    mem = memory_estimate_gb(_full_model(cfg), cfg, world=n)
    tps = spec.tflops * 1e12 * e.mfu * n / e.flops_per_token
    capped = bool(cfg.training.max_seconds) and e.hours * 3600 >= cfg.training.max_seconds - 1
    mfu_word = "assumed" if e.mfu_source == "assumed" else e.mfu_source
    return "\n".join([
        f"forecast for the real run on {cfg.modal.gpu} (estimates, not measurements):",
        f"  memory per GPU:  ~{mem['total_gb']:.1f} GB = {mem['params_optimizer_gb']:.1f} GB fp32 "
        f"weights+grads+AdamW + {mem['activations_gb']:.1f} GB activations at batch "
        f"{cfg.training.batch_size} x {cfg.seq_len} (formula; assumed 34 B/token/layer/width): "
        + _memory_advice(cfg, mem["total_gb"], spec.memory_gb),
        f"  tokens/s:        ~{tps:,.0f} = {spec.tflops:.0f} TFLOP/s peak x {e.mfu:.0%} MFU "
        f"({mfu_word}) x {n} GPU(s) / {e.flops_per_token:.2e} FLOPs per token",
        f"  time:            ~{_duration(e.hours)} for {e.tokens:,} tokens"
        + (" (training.max_seconds caps it)" if capped else ""),
        f"  cost:            ~${e.cost_usd:,.2f} at ${e.price_per_gpu_hour:.2f}/GPU-hour (list price "
        "in the GPU table, assumed current), plus container start-up and data preparation",
    ])


def report_text(r: Rehearsal, device: str) -> str:
    ck = (f"{r.checkpoint_gb:.2f} GB written in {r.checkpoint_seconds:.1f} s"
          if r.checkpoint_seconds is not None else f"{r.checkpoint_gb:.2f} GB")
    return "\n".join([
        f"smoke rehearsal passed on {device} in {r.seconds:.0f} s: {SMOKE_STEPS} steps of "
        f"{r.cfg.model.n_layer} layers x {r.cfg.model.n_embd} wide, checkpoint {ck}, exact "
        f"resume (step {SMOKE_STEPS} loss {r.loss:.6f} both times), peak memory "
        f"{r.peak_rss_gb:.1f} GB (this process)",
    ])


def run_smoke(cfg: Config, data_root: str | Path, device: str = "cpu", use_wandb: bool = False,
              log=print) -> int:
    """`--smoke`: the rehearsal, its report and the forecast of the full config."""
    r = rehearse(cfg, data_root, device, use_wandb, log)
    log(report_text(r, device))
    if r.peak_gpu_gb is not None:
        log(f"measured on {device}: peak GPU memory {r.peak_gpu_gb:.1f} GB at the configured "
            f"batch" + (f", MFU {r.mfu:.0%} at step {SMOKE_STEPS}" if r.mfu else ""))
    if cfg.model.init_from:  # the shape the source gave (never reduced) is the real run's
        cfg = cfg.model_copy(update={"model": r.cfg.model})
    log(forecast_text(cfg, r.mfu, "measured in this smoke run, before warm-up ends: low")
        if r.mfu else forecast_text(cfg))
    return 0
