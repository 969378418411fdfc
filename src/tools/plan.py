"""`slm plan`: from a budget to a config: the model, its tokens, batch, learning rate and cadence.

    slm plan --budget 20 --gpu H100 -o configs/plan.yaml     dollars on Modal
    slm plan --hours 2 --gpu H100:8                          hours of training on Modal
    slm plan --flops 1e19 --gpu A100-80GB                    a compute budget
    slm plan --device cpu --minutes 5 -o configs/plan.yaml   this machine (times a few steps first)

The rules, and where they come from (docs/plan.md):
  size      Chinchilla (Hoffmann et al., 2022): about TOKENS_PER_PARAM tokens per parameter at the
            compute-optimal point, with FLOPs per token = 6N + the attention term (the model's own
            flops_per_token, as `slm cost` counts them).
  shape     one depth dial: width = depth x clamp(8 x depth, 32, 64), heads of 64 (32 below 256
            wide); 12 layers give GPT-2 small's 768.
  speed     a GPU's table peak x MFU: measured (--metrics, --mfu) or ASSUMED_MFU, labelled
            assumed; on this machine, a few timed steps of each size.
  batch/lr  GPT-3's table (Brown et al., 2020, table 2.1) interpolated by width; the learning
            rate scales as 1/width below its smallest row; the batch is capped so a run takes at
            least MIN_STEPS optimizer steps.
  cadence   a checkpoint about every CHECKPOINT_MINUTES of wall time, an evaluation five times as
            often; a Modal timeout and retries that carry the run past the 24-hour limit.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from src.errors import SLMError
from src.hardware import gpu_spec
from src.model.gpt import GPT, GPTConfig
from src.tools.cost import ASSUMED_MFU, cost_per_hour, estimate, gpu_count
from src.training.config import Config, config_from_dict
from src.training.memory import MEMORY_SHARE, device_memory_gb, memory_estimate_gb

TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio (GPU plans)
CPU_TOKENS_PER_PARAM = 5.0  # minutes on a CPU: the best of a 3-minute ladder here (docs/plan.md)
SMALLER_SHARE = 0.5  # the smaller option: at most half the compute-optimal parameters
MIN_SHARE = 0.05  # the largest option still sees this share of the rule's tokens per parameter
MIN_STEPS = 500  # the batch is capped so that a run takes at least this many optimizer steps
MIN_PLAN_STEPS = 50  # a budget that buys fewer steps than this is too small for any model
CHECKPOINT_MINUTES = 25.0
EVALS_PER_CHECKPOINT = 5
MAX_DEPTH = 64
MIN_GPU_SECONDS = 60  # less GPU time than this is not a training run (start-up takes longer)
MODAL_LIMIT_S = 86400  # Modal's longest timeout per attempt
PREEMPTION_RETRIES = 3  # retries on top of the attempts the 24-hour limit needs
CPU_PROBE_SECONDS = 1.0  # timed seconds per size on this machine
BYTES_PER_TOKEN = 4.0  # English text with GPT-2's tokenizer; smaller vocabularies make more
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_BASE = {"cpu": CONFIGS / "tiny.yaml", "gpu": CONFIGS / "gpt_124m.yaml"}

# GPT-3's table 2.1: width, batch in tokens, learning rate (the 13B row's 5140 is the paper's
# typo for 5120).
GPT3 = ((768, 0.5e6, 6.0e-4), (1024, 0.5e6, 3.0e-4), (1536, 0.5e6, 2.5e-4),
        (2048, 1.0e6, 2.0e-4), (2560, 1.0e6, 1.6e-4), (4096, 2.0e6, 1.2e-4),
        (5120, 2.0e6, 1.0e-4), (12288, 3.2e6, 0.6e-4))
GPT3_WARMUP_TOKENS = 375e6


# ----------------------------------------------------------------------------- rules


def shape(depth: int) -> dict:
    """The model shape at this depth: width = depth x clamp(8 x depth, 32, 64), rounded to 32
    (64 from 256 wide), heads of 64 channels (32 below 256 wide)."""
    width = depth * min(64, max(32, 8 * depth))
    q = 64 if width >= 256 else 32
    width = max(q, int(width / q + 0.5) * q)
    return {"n_layer": depth, "n_embd": width, "n_head": width // q}


def _interp(width: int, col: int) -> float:
    """GPT-3's column `col` at this width, log-log interpolated; clamped beyond the ends."""
    xs = [math.log(r[0]) for r in GPT3]
    ys = [math.log(r[col]) for r in GPT3]
    x = math.log(width)
    if x <= xs[0]:
        return math.exp(ys[0])
    if x >= xs[-1]:
        return math.exp(ys[-1])
    i = next(i for i in range(1, len(xs)) if x <= xs[i])
    f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return math.exp(ys[i - 1] + f * (ys[i] - ys[i - 1]))


def learning_rate(width: int) -> float:
    """AdamW's peak lr for this width: GPT-3's table, and 6e-4 x 768/width below 768 wide."""
    if width < GPT3[0][0]:
        return min(1e-2, GPT3[0][2] * GPT3[0][0] / width)
    return _interp(width, 2)


def batch_tokens(width: int, tokens: float) -> float:
    """Tokens per optimizer step: GPT-3's for the width, but at most tokens / MIN_STEPS."""
    return min(_interp(width, 1), tokens / MIN_STEPS)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


# ----------------------------------------------------------------------------- the options


@dataclass
class Option:
    label: str
    cfg: Config
    params: int
    tokens: int
    seconds: float  # expected wall time of training (with evaluations)
    cost_usd: float | None  # None on this machine
    memory_gb: float
    memory_of_gb: float
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass
class Target:
    """Where the plan runs and what it may spend."""
    gpu: str | None  # None: this machine's CPU
    seconds: float | None  # training wall time (dollar, hour and minute budgets)
    flops: float | None  # a compute budget
    mfu: float
    mfu_source: str
    budget_usd: float | None = None
    what: str = ""
    tokens_per_param: float = TOKENS_PER_PARAM


def _model(cfg: Config) -> GPT:
    """The model of cfg on the meta device (no memory), built once per shape."""
    return _meta_model(cfg.model.model_dump_json())


@functools.lru_cache(maxsize=512)
def _meta_model(model_json: str) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig.model_validate_json(model_json))


def _with(cfg: Config, **sections) -> Config:
    raw = cfg.to_dict()
    for sec, upd in sections.items():
        raw[sec] = {**raw[sec], **upd}
    return config_from_dict(raw)


def _sized(base: Config, depth: int) -> Config:
    return _with(base, model={**shape(depth), "vocab_size": base.model_vocab})


def _gpus(target: Target) -> int:
    return gpu_count(target.gpu)[1] if target.gpu else 1


def _fits(cfg: Config, target: Target, have_gb: float) -> tuple[bool, float]:
    need = memory_estimate_gb(_model(cfg), cfg, _gpus(target))["total_gb"]
    return need <= have_gb * MEMORY_SHARE, need


def _batch(cfg: Config, target: Target, tokens: float, have_gb: float) -> Config | None:
    """cfg with the planned batch: GPT-3's for the width (capped for short runs), split into
    micro-batches that fit the memory; FSDP when replicas do not fit; None if nothing fits."""
    n, T = _gpus(target), cfg.seq_len
    seqs = _pow2_floor(batch_tokens(cfg.model.n_embd, tokens) / T)
    per_gpu = max(1, seqs // n)
    divisors = [d for d in range(per_gpu, 0, -1) if per_gpu % d == 0]
    for parallel in (("ddp", "fsdp") if n > 1 else ("ddp",)):
        for micro in divisors:
            c = _with(cfg, training={"batch_size": micro,
                                     "gradient_accumulation_steps": per_gpu // micro,
                                     "batch_tokens": None, "parallelism": parallel})
            if _fits(c, target, have_gb)[0]:
                return c
    return None


def _cadence(per_step: float, steps: int) -> dict:
    """Checkpoints about every CHECKPOINT_MINUTES, evaluations five times as often, a metric
    line about every 10 s, at `per_step` seconds per optimizer step."""
    ck = max(1, min(steps, round(CHECKPOINT_MINUTES * 60 / per_step)))
    ev = max(1, min(steps, ck // EVALS_PER_CHECKPOINT or 1))
    log = max(1, min(ev, round(10 / per_step)))  # a metric line about every 10 s
    return {"checkpoint_every": ck, "eval_every": ev, "log_every": log}


def _modal(hours: float, gpu: str, budget_usd: float | None) -> tuple[dict, int]:
    """(modal section, attempts): a timeout with room for the run (20% and half an hour more,
    whole hours, at most Modal's 24 h), retries for the attempts the 24-hour limit needs plus
    PREEMPTION_RETRIES; max_cost_usd stops a dollar budget at its figure."""
    need_s = hours * 3600 * 1.2 + 1800
    timeout = int(min(MODAL_LIMIT_S, math.ceil(need_s / 3600) * 3600))
    attempts = math.ceil(hours * 3600 / timeout)
    out = {"gpu": gpu, "timeout": timeout, "retries": min(10, attempts - 1 + PREEMPTION_RETRIES),
           "nodes": 1, "cpu": None, "memory": None,
           "max_cost_usd": None if budget_usd is None else round(budget_usd, 2)}
    return out, attempts


def _solve_steps(cfg: Config, target: Target) -> tuple[Config, object]:
    """The largest max_steps whose estimate (with evaluations) stays within the budget."""

    def est(steps: int):  # without max_seconds, which would cap the hours it estimates
        c = _with(cfg, training={"max_steps": steps, "max_seconds": None})
        return c, estimate(c, target.gpu, target.mfu, target.mfu_source)

    def within(e) -> bool:
        if target.flops is not None:
            return e.flops <= target.flops
        return e.hours * 3600 <= target.seconds

    lo, hi = 1, 2
    while within(est(hi)[1]):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(est(mid)[1]) else (lo, mid)
    c, e = est(lo)
    if cfg.training.max_seconds:
        c = _with(c, training={"max_seconds": cfg.training.max_seconds})
    return c, e


# ----------------------------------------------------------------------------- speed


def gpu_tokens_per_s(cfg: Config, target: Target) -> float:
    kind, n = gpu_count(target.gpu)
    return gpu_spec(kind).tflops * 1e12 * target.mfu * n / _model(cfg).flops_per_token(cfg.seq_len)


def cpu_tokens_per_s(cfg: Config, seconds: float = CPU_PROBE_SECONDS) -> float:
    """Training tokens per second of cfg on this machine: a warm-up step, then steps of the
    config's micro-batch (random tokens) for about `seconds`, at the median step's speed."""
    from src.training.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.training, "cpu")
    B, T, V = cfg.training.batch_size, cfg.seq_len, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T + 1))

    def step():
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times, t0 = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return B * T / statistics.median(times)  # the median step: robust to a busy moment


# ----------------------------------------------------------------------------- planning


def _tokens_for(cfg: Config, target: Target, tps: float) -> float:
    if target.flops is not None:
        return target.flops / _model(cfg).flops_per_token(cfg.seq_len)
    return target.seconds * tps


def _ladder(base: Config, target: Target, have_gb: float, log) -> list[tuple]:
    """(depth, cfg with batch, params, tokens, tokens/s, memory GB) for each size that fits,
    smallest first, until the budget trains a size on too few tokens (MIN_SHARE of the rule's)."""
    rows = []
    cpu_probe = _with(base, training={"batch_size": 16, "gradient_accumulation_steps": 1})
    for depth in range(1 if target.gpu is None else 2, MAX_DEPTH + 1):
        sized = _sized(base if target.gpu else cpu_probe, depth)
        params = _model(sized).num_params()
        if target.gpu:
            tps = gpu_tokens_per_s(sized, target)
        else:
            tps = cpu_tokens_per_s(sized)
            log(f"  timed {depth} layers x {sized.model.n_embd}: {tps:,.0f} tokens/s")
        tokens = _tokens_for(sized, target, tps)
        if tokens < MIN_SHARE * target.tokens_per_param * params:
            break
        cfg = _batch(sized, target, tokens, have_gb)
        if cfg is None:
            break
        mem = _fits(cfg, target, have_gb)[1]
        rows.append((depth, cfg, params, tokens, tps, mem))
    return rows


def _choose(rows: list[tuple], ratio: float) -> list[tuple[str, tuple]]:
    """The compute-optimal size, a smaller one trained longer, and the largest that fits."""
    best = min(rows, key=lambda r: abs(math.log(r[3] / r[2] / ratio)))
    out = [("compute-optimal", best)]
    smaller = [r for r in rows if r[2] <= best[2] * SMALLER_SHARE]
    if smaller:
        out.append(("smaller, trained longer", smaller[-1]))
    if rows[-1] is not best:
        out.append(("largest that fits", rows[-1]))
    return out


def _option(label: str, row: tuple, target: Target, base_name: str) -> Option:
    depth, cfg, params, tokens, tps, mem = row
    batch = cfg.tokens_per_step(_gpus(target))
    steps = max(1, int(tokens // batch))
    m = cfg.model
    warm = max(10, round(min(GPT3_WARMUP_TOKENS, 0.02 * tokens) / batch))
    train = {"learning_rate": float(f"{learning_rate(m.n_embd):.3g}"), "warmup_steps": warm,
             "max_tokens": None, "max_steps": steps}
    if target.gpu is None and target.seconds is not None:
        # this machine: the wall clock is the budget (the schedule ends on time), steps a ceiling
        train.update(max_seconds=round(target.seconds, 1), max_steps=steps * 2)
    train.update(_cadence(batch / tps, steps))  # before the steps are solved: evals cost too
    cfg = _with(cfg, training=train)
    notes = []
    if target.gpu:
        if target.seconds is not None:
            cfg = _with(cfg, training={"max_seconds": round(target.seconds, 1)})
        cfg, e = _solve_steps(cfg, target)
        seconds, usd, tokens = e.hours * 3600, e.cost_usd, e.tokens
        modal, attempts = _modal(e.hours, target.gpu, target.budget_usd)
        cfg = _with(cfg, modal=modal)
        if attempts > 1:
            notes.append(f"runs as {attempts} attempts of Modal's 24-hour limit, each continuing "
                         "from the last checkpoint" + ("" if attempts <= modal["retries"] + 1 else
                                                       "; re-run the command when it stops"))
    else:
        seconds, usd = target.seconds or tokens / tps, None
    seconds = float(seconds)
    kind = gpu_count(target.gpu)[0] if target.gpu else None
    have = gpu_spec(kind).memory_gb if kind else device_memory_gb("cpu") or 0.0
    if cfg.training.parallelism == "fsdp":
        notes.append("weights sharded with FSDP (replicas do not fit)")
    return Option(label, cfg.model_copy(update={"name": base_name}), params, int(tokens),
                  seconds, usd, mem, have, tps, notes)


def plan(target: Target, base: Config, log=print) -> list[Option]:
    """2-4 options for the budget, the compute-optimal one first."""
    if target.gpu:
        kind, _ = gpu_count(target.gpu)
        have = gpu_spec(kind).memory_gb
    else:
        have = device_memory_gb("cpu") or 8.0
        log(f"timing a few steps of each size on this machine ({CPU_PROBE_SECONDS:g} s each):")
    # one container of the planned GPUs, reserving the GPU table's CPU and memory
    base = _with(base, modal={"nodes": 1, "cpu": None, "memory": None})
    rows = _ladder(base, target, have, log)
    if not rows:
        raise SLMError(f"{target.what} is too small for any model: the smallest "
                       f"({shape(1 if target.gpu is None else 2)['n_layer']} layer(s)) would see "
                       f"fewer tokens than it has parameters; raise the budget")
    options = [_option(label, row, target, base.name)
               for label, row in _choose(rows, target.tokens_per_param)]
    best = options[0]
    if target.gpu and (best.cfg.training.max_steps < MIN_PLAN_STEPS
                       or best.seconds < MIN_GPU_SECONDS):
        raise SLMError(f"{target.what} is too small for any model: it buys "
                       f"{best.cfg.training.max_steps} optimizer steps in {best.seconds:.0f} s of "
                       f"{target.gpu}; a plan needs at least {MIN_PLAN_STEPS} steps and "
                       f"{MIN_GPU_SECONDS} s")
    if best.tokens_per_param > 2 * target.tokens_per_param and rows[-1][0] == MAX_DEPTH:
        best.label = "largest on the ladder"
        best.notes.append(f"the compute-optimal size is beyond slm's largest shape ({MAX_DEPTH} "
                          f"layers x {shape(MAX_DEPTH)['n_embd']}): this budget is better spent "
                          "on several runs, or a model family built for that scale")
    return options


# ----------------------------------------------------------------------------- the data


def data_note(cfg: Config, tokens: int, data_root: str | Path = "data") -> str:
    """How the planned tokens compare with the dataset: epochs, from the prepared manifest, the
    preset's known size, or the local files' bytes."""
    import json

    from src.data import sources
    from src.data.prepare import dataset_dir

    d = cfg.data
    manifest = dataset_dir(d, data_root) / "manifest.json"
    have, how = None, ""
    if manifest.is_file():
        try:
            have = int(json.loads(manifest.read_text())["train"]["tokens"])
            how = f"prepared: {manifest}"
        except (OSError, ValueError, KeyError, TypeError):
            have = None
    preset = sources.PRESETS.get(d.source)
    if have is None and preset is not None and getattr(preset, "gpt2_tokens", None):
        have = preset.gpt2_tokens
        how = f"{d.source}: about {have / 1e9:.1f}B GPT-2 tokens" + (
            "" if d.tokenizer == "gpt2" else "; a smaller vocabulary makes more")
    if have is None and preset is None and not sources.is_url(d.source) \
            and not sources.is_hub(d.source):
        try:
            files = sources.stdlib_files() if d.source == sources.EMBEDDED else \
                sources.local_files(d.source)
            nbytes = sum(p.stat().st_size for p in files)
        except (SLMError, OSError):
            nbytes = 0
        if nbytes:
            have = int(nbytes / BYTES_PER_TOKEN)
            how = (f"not prepared yet; estimated from {nbytes / 1e6:,.0f} MB at ~{BYTES_PER_TOKEN:g} "
                   "bytes/token (`slm prepare` gives the count)")
    if have is None:
        return (f"data: the size of {d.source} is not known until it is prepared "
                "(`slm prepare --config ...` reports its tokens)")
    epochs = tokens / max(1, have)
    if epochs <= 1:
        return f"data: {have:,} tokens ({how}); the plan reads {epochs:.0%} of them once"
    return (f"WARNING data: {d.source} has about {have:,} tokens ({how}) but the plan needs "
            f"{tokens:,}: {epochs:.1f} epochs, so the model sees text repeated; point data.source "
            "at more text or pick a smaller option")


# ----------------------------------------------------------------------------- output


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _num(x: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3g}{unit}"
    return f"{x:.3g}"


def table(options: list[Option], target: Target) -> str:
    head = ["", "params", "shape (L x C, heads)", "tokens", "tok/param", "batch tok", "lr",
            "warmup", "time", "cost", "memory"]
    rows = []
    for i, o in enumerate(options, 1):
        m, t = o.cfg.model, o.cfg.training
        n = _gpus(target)
        cost = "$0 (this machine)" if o.cost_usd is None else f"${o.cost_usd:,.2f}"
        rows.append([f"{i}. {o.label}", _num(o.params), f"{m.n_layer} x {m.n_embd}, {m.n_head}",
                     _num(o.tokens), f"{o.tokens_per_param:.0f}",
                     _num(o.cfg.tokens_per_step(n)), f"{t.learning_rate:.2g}",
                     str(t.warmup_steps), _dur(o.seconds), cost,
                     f"{o.memory_gb:.1f} of {o.memory_of_gb:.0f} GB"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, rows)])


def describe(options: list[Option], target: Target, chosen: int) -> str:
    o = options[chosen]
    t, m = o.cfg.training, o.cfg.modal
    where = target.gpu or "this machine's CPU"
    speed = (f"{target.mfu:.0%} MFU ({target.mfu_source}) of the GPU table's peak"
             if target.gpu else "timed on this machine")
    lines = [
        f"plan for {target.what} on {where} (speed: {speed}; sized at "
        f"{target.tokens_per_param:g} tokens/parameter; docs/plan.md):",
        table(options, target),
        "",
        f"option {chosen + 1} ({o.label}): {t.max_steps:,} steps of "
        f"{o.cfg.tokens_per_step(_gpus(target)):,} tokens (micro-batch {t.batch_size} x "
        f"{o.cfg.seq_len}, {t.gradient_accumulation_steps} accumulation step(s)), "
        f"~{o.tokens_per_s:,.0f} tokens/s",
        f"  checkpoint every {t.checkpoint_every:,} steps (~{CHECKPOINT_MINUTES:g} min), evaluate "
        f"every {t.eval_every:,}",
    ]
    if target.gpu:
        lines.append(f"  Modal: timeout {m.timeout // 3600} h per attempt, {m.retries} retries"
                     + (f", stops at max_cost_usd ${m.max_cost_usd:,.2f}" if m.max_cost_usd
                        else ""))
        if target.mfu_source != "assumed":
            lines.append(f"  `slm cost` prices it the same with --mfu {target.mfu:.3g}")
    elif target.seconds is not None:
        lines.append(f"  ends after {_dur(target.seconds)} of training (training.max_seconds)")
    lines += [f"  {n}" for n in o.notes]
    return "\n".join(lines)


def write(option: Option, path: str | Path, force: bool = False) -> Path:
    """Write the option as a config file that load_config accepts (refused if it exists)."""
    from src.training.config import load_config
    from src.validate import new_file

    p = new_file(path, "-o", force)
    raw = option.cfg.to_dict()
    raw.pop("name", None)  # the file's stem names the run
    header = (f"# written by `slm plan`: {option.label}, {_num(option.params)} parameters, "
              f"{_num(option.tokens)} tokens ({option.tokens_per_param:.0f} per parameter)\n")
    p.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    load_config(p)
    return p


def target_for(args_budget: dict, gpu: str | None, mfu: float | None, mfu_source: str | None,
               tokens_per_param: float | None = None) -> Target:
    """The Target of `slm plan`'s budget flags: exactly one of usd, hours, minutes, flops."""
    given = {k: v for k, v in args_budget.items() if v is not None}
    if len(given) != 1:
        raise SLMError("give one budget: --budget DOLLARS, --hours H, --minutes M or --flops F "
                       f"(got {', '.join('--' + k for k in given) or 'none'})")
    (kind, value), = given.items()
    if gpu is None and kind == "budget":
        raise SLMError("--budget is dollars on Modal: give --gpu (e.g. --gpu H100), or plan for "
                       "this machine with --device cpu --minutes M")
    words = {"budget": f"${value:,.2f}", "hours": f"{value:g} h", "minutes": f"{value:g} min",
             "flops": f"{value:.3g} FLOPs"}
    seconds = {"hours": value * 3600, "minutes": value * 60}.get(kind)
    if kind == "budget":
        seconds = value / cost_per_hour(gpu) * 3600
    t = Target(gpu=gpu, seconds=seconds, flops=value if kind == "flops" else None,
               mfu=mfu or ASSUMED_MFU, mfu_source=mfu_source or ("given" if mfu else "assumed"),
               budget_usd=value if kind == "budget" else None, what=words[kind],
               tokens_per_param=tokens_per_param or (TOKENS_PER_PARAM if gpu else
                                                     CPU_TOKENS_PER_PARAM))
    if gpu and seconds is not None and seconds < MIN_GPU_SECONDS:
        raise SLMError(f"{t.what} is too small for any model: it buys {seconds:.0f} s of {gpu}; "
                       f"a plan needs at least {MIN_GPU_SECONDS} s of training")
    return t
