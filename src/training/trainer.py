"""The training loop: `train(cfg, data_root=...)`, the one function every launcher calls.

    python train_local.py --config configs/tiny.yaml --no-wandb      # local
    torchrun --standalone --nproc_per_node=2 train_local.py ...      # several processes
    modal run modal_app.py --config configs/gpt_124m.yaml            # on Modal's GPUs

Layout under data_root (the same locally and on the Modal volume):
    datasets/<source>-<tokenizer>-<key>/   token shards, tokenizer.json, manifest.json
    checkpoints/<name>/                    step_N.pt, final.pt, metrics.jsonl, config.yaml
    models/<name>_final.pt                 the trained weights, config and tokenizer

Resume is automatic: a re-run continues from the newest complete checkpoint of the run, exactly
(weights, optimizer, schedule, data position, RNG, elapsed time, W&B run id).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from src.data.loader import BatchLoader, val_batches
from src.data.prepare import prepare
from src.errors import SLMError
from src.model.gpt import GPT
from src import checkpoint as ckpt
from src.training import distributed as dist
from src.training.config import Config
from src.hardware import peak_flops, resolve_device
from src.training.metrics import Console, JsonlSink, Metrics, peak_rss_gb
from src.training.optim import build_optimizer, lr_factor, set_lr

CKPT_FORMAT = 1
MAX_SKIPS_IN_A_ROW = 10  # skip_nonfinite: this many skipped updates in a row stop the run
# Model keys that must match to continue from a checkpoint.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos_emb", "norm",
              "qk_norm", "mlp", "mlp_ratio", "tie_embeddings", "bias", "pad_vocab_multiple")


class Interrupted(SLMError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. `signum` says which."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


@dataclass
class Result:
    run_dir: Path
    final_checkpoint: Path
    model_path: Path
    step: int
    tokens: int
    val_loss: float | None
    val_bpb: float | None


def run_dir_for(cfg: Config, data_root) -> Path:
    return Path(data_root) / "checkpoints" / cfg.name


class _Signals:
    """First SIGTERM/SIGINT: finish the step, checkpoint, stop. A second SIGINT: stop now."""

    def __init__(self):
        self.got: int | None = None
        self.old = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.got is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.got = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class RunLock:
    """One process trains a run folder at a time (flock: released even on SIGKILL)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks: go on unlocked
                return
            self.f.seek(0)
            who = self.f.read().strip() or "another process"
            self.f.close()
            raise SLMError(
                f"run '{run_dir.name}' is already being trained ({who}) in {run_dir}; wait for it, "
                "stop it, or give this run another name (--name NAME)"
            ) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self.f.flush()

    def release(self):
        with contextlib.suppress(OSError):
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def _check_compatible(cfg: Config, state: dict, tok_id: str, path: Path) -> None:
    old = state.get("config", {}).get("model", {})
    new = cfg.model.model_dump()
    diff = [f"model.{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in SHAPE_KEYS
            if k in old and old.get(k) != new.get(k)]
    if diff:
        raise SLMError(
            f"checkpoint {path} is from a different model shape ({'; '.join(diff)}); use the "
            "config it was trained with, or start over with --resume never"
        )
    if state.get("tokenizer_id") not in (None, tok_id):
        raise SLMError(
            f"checkpoint {path} was trained with another tokenizer than this config's data "
            "(data.source/data.tokenizer/data.vocab_size differ); use the same data config, or "
            "--resume never"
        )


def _rng_state(device: torch.device) -> dict:
    s = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def _autocast(device: torch.device, dtype_name: str):
    """(autocast context factory, GradScaler or None) for this device and training.dtype."""
    if device.type == "cuda":
        if dtype_name == "auto":
            dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if dtype_name == "float32":
            return contextlib.nullcontext, None
        dt = getattr(torch, dtype_name)
        scaler = torch.amp.GradScaler("cuda") if dt == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dt)), scaler
    if dtype_name in ("bfloat16", "float16") and device.type in ("cpu", "mps"):
        dt = getattr(torch, dtype_name)
        return (lambda: torch.autocast(device.type, dtype=dt)), None
    return contextlib.nullcontext, None


def _bf16_params(device: torch.device, dtype_name: str) -> torch.dtype | None:
    """FSDP's compute dtype for parameters: bf16 where training autocasts to bf16, else fp32."""
    if dtype_name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return torch.bfloat16 if dtype_name == "bfloat16" else None


def _check_global_batch(cfg: Config, state: dict, world: int, path: Path) -> None:
    """A resumed run keeps its global batch, whatever the number of processes."""
    old_world = int(state.get("world_size", 1))
    old = state.get("tokens_per_step")
    if old is None:
        from src.training.config import config_from_dict

        old = config_from_dict(state["config"]).tokens_per_step(old_world)
    new = cfg.tokens_per_step(world)
    if old == new:
        return
    t = cfg.training
    raise SLMError(
        f"checkpoint {path} was trained with {old:,} tokens per optimizer step ({old_world} "
        f"process(es)), but this launch gives {new:,} (batch_size {t.batch_size} x seq_len "
        f"{cfg.seq_len} x {cfg.grad_accum(world)} accumulation x {world} process(es)). Keep the "
        f"global batch: set training.batch_tokens: {old} (a multiple of batch_size x seq_len x "
        "processes), or adjust batch_size / gradient_accumulation_steps; or start over with "
        "--resume never"
    )


def _sync_step(loss_sum: torch.Tensor, got: int | None, elapsed: float, ctx) -> tuple:
    """One all-reduce per step: (global loss sum, signal any rank got, rank 0's elapsed time)."""
    v = torch.tensor([0.0, elapsed if ctx.master else 0.0, got == signal.SIGTERM,
                      got == signal.SIGINT], dtype=torch.float64, device=loss_sum.device)
    v[0] = loss_sum.double()
    dist.all_reduce_sum(v)
    _, el, term, intr = v.tolist()
    sig = signal.SIGTERM if term else signal.SIGINT if intr else None
    return v[0].to(loss_sum.dtype), sig, el


@torch.no_grad()
def evaluate(model, ds, cfg: Config, device, autocast, token_bytes, rank=0, world=1,
             lockstep=False) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over fixed windows.

    lockstep (FSDP): every rank runs as many forwards as the busiest one, padding with
    forwards whose results are dropped, since each forward gathers weights from all ranks.
    """
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    ntok = torch.zeros((), dtype=torch.float64, device=device)
    tb = token_bytes.to(device)
    batches = val_batches(ds.val, ds.tokenizer.id, cfg.seq_len, cfg.training.batch_size,
                          cfg.training.eval_tokens, rank, world)
    pad = 0
    if lockstep:
        batches = list(batches)
        most = torch.tensor(len(batches), device=device)
        dist.all_reduce_max(most)
        pad = int(most) - len(batches)
    for _ in range(pad):
        with autocast():
            model(torch.zeros(1, cfg.seq_len, dtype=torch.long, device=device))
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits, _ = model(x)
        lp = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        )
        nats += lp.double().sum()
        ntok += y.numel()
        nbytes += tb[y].double().sum()
    if world > 1:
        for t in (nats, nbytes, ntok):
            dist.all_reduce_sum(t)
    model.train()
    loss = (nats / ntok).item()
    bpb = (nats / max(nbytes.item(), 1.0) / math.log(2)).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50)), "val/bpb": bpb}


@torch.no_grad()
def make_samples(model, tok, cfg: Config, device, step: int) -> list[dict]:
    t = cfg.training
    g = torch.Generator(device=device).manual_seed(t.seed + step)  # never the training RNG
    out = []
    prompt_ids = tok.encode(t.sample_prompt) if t.sample_prompt else []
    prompt_ids = [tok.eot_id] + prompt_ids  # start as if at a document boundary
    model.eval()
    for _ in range(t.num_samples):
        idx = torch.tensor([prompt_ids], device=device)
        new = [int(n) for n in model.generate(idx, t.sample_tokens, temperature=0.8, top_k=200,
                                              generator=g)]
        out.append({"prompt": t.sample_prompt, "text": tok.decode(new)})
    model.train()
    return out


def _nonfinite_error(step: int, run_dir: Path, at_or_before: bool = False) -> SLMError:
    when = f"at or before step {step}" if at_or_before else f"at step {step}"
    return SLMError(
        f"loss or gradients became NaN/Inf {when}; stopped without saving, so the last good "
        f"checkpoint in {run_dir} is kept. Lower training.learning_rate, check the data, or set "
        "training.skip_nonfinite: true to skip such steps"
    )


def train(
    cfg: Config,
    data_root: str | Path = "data",
    device: str = "auto",
    resume: str = "auto",
    use_wandb: bool = True,
    on_checkpoint=None,
    log=print,
    cost_per_hour: float | None = None,
) -> Result:
    """Train cfg to its budget; resume from the run's newest checkpoint unless told otherwise.

    resume: 'auto' (newest checkpoint of this run, if any), 'never' (move the old run aside and
    start over) or a checkpoint path. on_checkpoint(path) is called after each save (Modal
    commits its volume there). Raises Interrupted after saving on SIGTERM/SIGINT.
    cost_per_hour: USD per hour of the machines (default $SLM_COST_PER_HOUR; Modal passes the GPU
    price x GPUs): logs cost_usd, and modal.max_cost_usd then ends the run like a finished one.
    """
    try:
        return _launch(cfg, data_root, device, resume, use_wandb, on_checkpoint, log, cost_per_hour)
    except Interrupted:
        raise
    except Exception as e:  # under torchrun: name this rank's error in torchrun's summary
        err = dist.record_failure(e)
        if err is e:
            raise
        raise err from None


def _launch(cfg, data_root, device, resume, use_wandb, on_checkpoint, log, cost_per_hour) -> Result:
    t = cfg.training
    dist.check_launch(cfg, dist.world_size(), device)
    ctx = dist.setup(device, t.parallelism)
    world, master = ctx.world_size, ctx.master
    dev = ctx.device if ctx.device is not None else resolve_device(device)
    say = log if master else (lambda *a, **k: None)
    if t.threads and dev.type == "cpu":
        torch.set_num_threads(t.threads)

    run_dir = run_dir_for(cfg, data_root)
    lock = None
    try:
        state, state_path = None, None
        if master:
            lock = RunLock(run_dir)
            if resume == "never":
                moved = ckpt.move_aside(run_dir)  # only while we hold the run's lock
                if moved:
                    lock, old = RunLock(run_dir), lock
                    old.release()
                    say(f"--resume never: moved the old run to {moved}")
            for p in ckpt.remove_partial(run_dir) + ckpt.remove_partial(
                Path(data_root) / "models", f"{cfg.name}_final.pt"
            ):
                say(f"removed {p}, left by a save that was cut short")
            if resume not in ("auto", "never"):
                state_path = Path(resume)
                state = ckpt.check_resumable(ckpt.load(state_path), state_path)
            elif resume == "auto":
                found = ckpt.find_resumable(run_dir, say)
                if found:
                    state_path, state = found
        dist.barrier(long=True)
        if world > 1:  # every rank loads what rank 0 chose
            state_path = dist.broadcast_object(str(state_path) if state_path else None)
            if state_path and not master:  # mapped: ranks on one machine share the pages
                state_path = Path(state_path)
                state = ckpt.load(state_path, mmap=True)
        return _train(cfg, data_root, dev, ctx, state, state_path, run_dir, use_wandb,
                      on_checkpoint, say, cost_per_hour)
    finally:
        if lock:
            lock.release()
        dist.teardown()


def _train(cfg, data_root, dev, ctx, state, state_path, run_dir, use_wandb, on_checkpoint, say,
           cost_per_hour=None):
    t = cfg.training
    if cost_per_hour is None and os.environ.get("SLM_COST_PER_HOUR"):
        cost_per_hour = float(os.environ["SLM_COST_PER_HOUR"])
    budget = cfg.modal.max_cost_usd if cost_per_hour else None
    rank, world, master = ctx.rank, ctx.world_size, ctx.rank == 0

    # --- data (rank 0 tokenizes; the others wait and then read the same shards)
    if master:
        ds = prepare(cfg, data_root, log=say)
    dist.barrier(long=True)
    if not master:
        ds = prepare(cfg, data_root, log=lambda *a: None)
    tok = ds.tokenizer
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise SLMError(
            f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} tokens; remove model.vocab_size or raise it"
        )
    init_sd = None
    if cfg.model.init_from:  # fine-tuning: the source sets the shape (also when resuming)
        from src.model.hf import resolve_init

        init_sd = resolve_init(cfg, tok, load_weights=state is None, log=say)
    if state is not None:
        _check_compatible(cfg, state, tok.id, state_path)
        _check_global_batch(cfg, state, world, state_path)

    # --- model, optimizer, data position (the weights are loaded before FSDP shards them,
    # and the optimizer is built on the sharded parameters)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(dev)
    if init_sd is not None:
        model.load_state_dict(init_sd)
    accum = dist.plan(cfg, world)
    if state is not None:
        ckpt.load_weights(model, state["model_state_dict"], state_path)
    autocast, scaler = _autocast(dev, t.dtype)
    if ctx.sharded and scaler is not None:
        raise SLMError("training.parallelism fsdp with float16 (this GPU has no bfloat16): FSDP's "
                       "shards cannot use the fp16 gradient scaler; use parallelism: ddp")
    if world == 1 and t.parallelism == "fsdp":
        say("note: training.parallelism fsdp with one process: nothing to shard, training as "
            "a single process (launch with torchrun --nproc_per_node=N to shard)")
    wrapped = dist.wrap_model(model, ctx, _bf16_params(dev, t.dtype))
    hellaswag = None
    if t.hellaswag_every and master:
        if ctx.sharded:
            say("note: training.hellaswag_every is skipped under FSDP (run `slm eval` instead)")
        else:
            from src.eval import hellaswag as hs

            hs_rows = hs.load_examples(hs.locate(t.hellaswag_file), t.hellaswag_examples)
            hellaswag = lambda: hs.evaluate(model, tok, hs_rows, autocast)  # noqa: E731
    optimizer = build_optimizer(model, t, dev.type)
    loader = BatchLoader(ds.train, tok.id, cfg.seq_len, t.batch_size, t.seed, rank, world)
    step, tokens, elapsed_before, wandb_id, best_val = 0, 0, 0.0, None, None
    skipped = in_a_row = 0  # updates skipped for non-finite loss/gradients
    if state is not None:
        if ctx.sharded:
            dist.load_optimizer_state(model, optimizer, state["optimizer_state_dict"], ctx)
        else:
            ckpt.load_weights(optimizer, state["optimizer_state_dict"], state_path)
        loader.load_state_dict(state["loader"])
        step, tokens = int(state["step"]), int(state["tokens"])
        elapsed_before = float(state.get("elapsed", 0.0))
        wandb_id, best_val = state.get("wandb_run_id"), state.get("best_val_loss")
        skipped = int(state.get("skipped_nonfinite", 0))
        _set_rng_state(state["rng"], dev)
        if state.get("world_size", world) != world and master:
            say(f"note: checkpoint written with {state['world_size']} ranks, resuming with {world}")
        say(f"resumed from {state_path} at step {step} ({tokens:,} tokens)")
    if scaler is not None and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    train_model = wrapped
    if t.compile and dev.type == "cuda":
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # fall back to eager on compile failure
        train_model = torch.compile(train_model)

    flops_tok = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(dev)
    tokens_per_step = cfg.tokens_per_step(world)
    token_bytes = torch.from_numpy(tok.token_bytes())
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tok.save(run_dir / "tokenizer.json")
        say(
            f"model {model.num_params() / 1e6:.2f}M params | {tokens_per_step:,} tokens/step "
            f"({t.batch_size} x {cfg.seq_len} x {accum} accum x {world} ranks) | device {dev}"
        )
    sinks = []
    if master:
        sinks = [JsonlSink(run_dir / "metrics.jsonl", step if state is not None else None),
                 Console(t.max_steps)]
        if use_wandb:
            from src.training.wandb_sink import open_wandb

            extra = {"params": model.num_params(), "tokens_per_step": tokens_per_step,
                     "grad_accum": accum, "world_size": world, "device": str(dev)}
            wb = open_wandb(cfg, run_dir, wandb_id, state is not None, extra, log=say)
            if wb is not None:
                sinks.append(wb)
                wandb_id = wb.run_id
    metrics = Metrics(sinks, log=say)

    def progress(step_, tokens_, elapsed_):
        p = step_ / t.max_steps
        if t.max_tokens:
            p = max(p, tokens_ / t.max_tokens)
        if t.max_seconds:
            p = max(p, elapsed_ / t.max_seconds)
        return p

    def save_state(path: Path, elapsed_: float, final=False) -> dict | None:
        """Write a checkpoint (every rank calls: FSDP gathers the full state to rank 0)."""
        st = {
            "format": CKPT_FORMAT,
            "model_state_dict": dist.model_state(model, ctx),
            "optimizer_state_dict": dist.optimizer_state(model, optimizer, ctx),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "tokens": tokens,
            "elapsed": elapsed_,
            "loader": loader.state_dict(),
            "rng": _rng_state(dev),
            "config": cfg.to_dict(),
            "tokenizer": tok.to_dict(),
            "tokenizer_id": tok.id,
            "wandb_run_id": wandb_id,
            "best_val_loss": best_val,
            "skipped_nonfinite": skipped,
            "world_size": world,
            "parallelism": t.parallelism,
            "tokens_per_step": tokens_per_step,
            "final": final,
        }
        if not master:
            return None
        ckpt.save(st, path)
        if not final:
            ckpt.prune(run_dir, t.keep_last)
        if on_checkpoint:
            on_checkpoint(path)
        return st

    start = time.time()  # the budget counts training time (data preparation excluded)
    elapsed = lambda: elapsed_before + (time.time() - start)  # noqa: E731
    # Decisions that depend on time (lr, stopping, cost) use rank 0's clock, so all ranks agree.
    synced = [dist.broadcast_object(elapsed())]
    clock = elapsed if world == 1 else (lambda: synced[0])
    cost = lambda: cost_per_hour * clock() / 3600 if cost_per_hour else None  # noqa: E731
    over_budget = lambda: bool(budget) and cost() >= budget  # noqa: E731
    stopped = False
    last_val = {}
    p_start = progress(step, tokens, clock())
    if state is not None and (p_start >= 1.0 or over_budget()):
        if p_start >= 1.0:
            say(f"run '{cfg.name}' is already complete at step {step} ({state_path}); "
                "--resume never starts it over")
        else:
            say(f"run '{cfg.name}' stopped at its budget modal.max_cost_usd ${budget:.2f} (step "
                f"{step}); raise modal.max_cost_usd to continue it")
        metrics.close()
        model_path = Path(data_root) / "models" / f"{cfg.name}_final.pt"
        if master and not model_path.is_file():  # stopped between final.pt and the model file
            ckpt.save({"format": CKPT_FORMAT, "model_state_dict": state["model_state_dict"],
                       "config": cfg.to_dict(), "tokenizer": tok.to_dict(), "tokenizer_id": tok.id,
                       "step": step, "tokens": tokens, "val_loss": None, "val_bpb": None},
                      model_path)
            if on_checkpoint:
                on_checkpoint(model_path)
            say(f"wrote the missing model file {model_path}")
        return Result(run_dir, state_path, model_path, step, tokens, None, None)
    win_tokens, win_start = 0, time.time()
    bad_seen = torch.zeros((), dtype=torch.bool, device=dev) if dev.type == "cuda" else None
    model.train()
    with _Signals() as sig:
        while progress(step, tokens, clock()) < 1.0 and not stopped:
            factor = lr_factor(t, step, progress(step, tokens, clock()))
            set_lr(optimizer, factor)
            loss_sum = torch.zeros((), device=dev)
            for micro in range(accum):
                x, y = loader.next_batch(dev)
                dist.grad_sync(wrapped, micro == accum - 1)  # reduce on the last micro-step only
                with autocast():
                    _, loss = train_model(x, y)
                    loss = loss / accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            gnorm = dist.clip_grad_norm(model, t.grad_clip, ctx)
            if world > 1:  # global loss sum, rank 0's clock, and a signal seen by any rank
                loss_sum, stop_sig, synced[0] = _sync_step(loss_sum, sig.got, elapsed(), ctx)
            finite = torch.isfinite(loss_sum)
            if scaler is None:  # with fp16, the grad scaler skips overflowing steps itself
                finite &= torch.isfinite(gnorm)
            skip = False
            if dev.type == "cuda" and not t.skip_nonfinite:
                bad_seen |= ~finite  # checked at log/eval/checkpoint steps: no per-step sync
            elif bool(finite):
                in_a_row = 0
            else:
                if not t.skip_nonfinite:
                    raise _nonfinite_error(step + 1, run_dir)
                skip, skipped, in_a_row = True, skipped + 1, in_a_row + 1
                if in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise SLMError(
                        f"loss or gradients were NaN/Inf {in_a_row} steps in a row (steps "
                        f"{step + 2 - in_a_row}-{step + 1}): training does not recover; the last "
                        f"checkpoints in {run_dir} are kept. Lower training.learning_rate or "
                        "check the data"
                    )
                say(f"warning: non-finite loss/gradients at step {step + 1}; update skipped "
                    f"({skipped} so far)")
                metrics.log({"step": step + 1, "skipped_nonfinite": skipped})
            if skip:  # the step still counts: signals, evaluation and checkpoints go on
                if scaler:
                    scaler.update()
            elif scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            win_tokens += tokens_per_step

            last = progress(step, tokens, clock()) >= 1.0
            boundary = last or step % t.log_every == 0 or step % t.eval_every == 0 or (
                step % t.checkpoint_every == 0) or sig.got is not None
            if bad_seen is not None and boundary and bool(bad_seen):
                raise _nonfinite_error(step, run_dir, at_or_before=True)
            if budget and not last and step % t.log_every == 0 and over_budget():
                say(f"budget reached: ${cost():.2f} of modal.max_cost_usd ${budget:.2f} at step "
                    f"{step}; stopping with a checkpoint")
                stopped = last = True
            if step % t.log_every == 0 or last or step == 1:
                now = time.time()
                tps = win_tokens / max(now - win_start, 1e-9)
                win_tokens, win_start = 0, now
                p = progress(step, tokens, elapsed())
                eta = (now - start) * (1 - p) / max(p - p_start, 1e-9)
                row = {
                    "step": step,
                    "tokens": tokens,
                    "time": round(elapsed(), 3),
                    "train/loss": loss_sum.item() / world,
                    "lr": t.learning_rate * factor,
                    "grad_norm": float(gnorm),
                    "tokens_per_sec": tps,
                    "flops_per_sec": tps * flops_tok,
                    "mfu": tps * flops_tok / peak if peak else None,
                    "eta_seconds": eta,
                    "progress": p,
                }
                if cost_per_hour:
                    row["cost_usd"] = cost()
                if dev.type == "cuda":
                    row["memory/peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                else:
                    row["memory/peak_rss_gb"] = peak_rss_gb()
                metrics.log(row)
            if step % t.eval_every == 0 or last:
                last_val = evaluate(model, ds, cfg, dev, autocast, token_bytes, rank, world,
                                    lockstep=ctx.sharded)
                if best_val is None or last_val["val/loss"] < best_val:
                    best_val = last_val["val/loss"]
                row = {"step": step, "tokens": tokens, **last_val}
                if t.num_samples and (master or ctx.sharded) and not last:  # FSDP: all ranks
                    row["samples"] = make_samples(model, tok, cfg, dev, step)
                metrics.log(row)
            if hellaswag and (step % t.hellaswag_every == 0 or last):
                row = {"step": step, "tokens": tokens, **hellaswag()}
                say(f"step {step:>6} | hellaswag acc_norm {row['hellaswag/acc_norm']:.4f}")
                metrics.log(row)
            if world == 1:
                stop_sig = sig.got
            if stop_sig is not None:
                name = signal.Signals(stop_sig).name
                path = run_dir / f"step_{step}.pt"
                save_state(path, elapsed())
                dist.barrier()
                metrics.call("on_interrupt", sig.got)
                metrics.close()
                raise Interrupted(f"{name}: saved {path} at step {step}; re-run to resume", stop_sig)
            if step % t.checkpoint_every == 0 and not last:
                save_state(run_dir / f"step_{step}.pt", elapsed())
                metrics.call("on_checkpoint", run_dir / f"step_{step}.pt", step)

    final = run_dir / "final.pt"
    final_state = save_state(final, elapsed(), final=True)
    samples = None
    if t.num_samples and (master or ctx.sharded):  # shown last, after the summary
        samples = make_samples(model, tok, cfg, dev, step)
    model_path = Path(data_root) / "models" / f"{cfg.name}_final.pt"
    if master:
        ckpt.save(
            {"format": CKPT_FORMAT, "model_state_dict": final_state["model_state_dict"],
             "config": cfg.to_dict(),
             "tokenizer": tok.to_dict(), "tokenizer_id": tok.id, "step": step, "tokens": tokens,
             "val_loss": last_val.get("val/loss"), "val_bpb": last_val.get("val/bpb")},
            model_path,
        )
        if on_checkpoint:
            on_checkpoint(model_path)
        metrics.call("on_final", final, model_path, last_val)
        say(f"done: step {step}, {tokens:,} tokens in {elapsed():.0f} s; "
            f"val loss {last_val.get('val/loss', float('nan')):.4f}, "
            f"val bpb {last_val.get('val/bpb', float('nan')):.4f}")
        say(f"checkpoint: {final}\nmodel:      {model_path}")
        if samples:
            metrics.log({"step": step, "tokens": tokens, "samples": samples})
    metrics.close()
    dist.barrier()
    return Result(run_dir, final, model_path, step, tokens, last_val.get("val/loss"),
                  last_val.get("val/bpb"))
