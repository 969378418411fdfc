"""The training loop: `train(cfg, data_root=...)`, the one function every launcher calls.

    python train_local.py --config configs/tiny.yaml --no-wandb      # local
    torchrun --standalone --nproc_per_node=2 train_local.py ...      # several processes
    modal run modal_app.py --config configs/gpt_124m.yaml            # on Modal's GPUs

The files it reads and writes under data_root are named by src/paths.py's RunLayout (the same
tree locally and on the Modal volume). Resume is automatic: a re-run continues from the newest
complete checkpoint of the run, exactly (weights, optimizer, schedule, data position, RNG,
elapsed time, W&B run id).

`train` reads as build -> loop -> finish; `Trainer.step` is one optimizer step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from src import checkpoint as ckpt
from src import hardware as hw
from src.data.loader import BatchLoader, val_batches
from src.data.prepare import prepare
from src.errors import Interrupted, SLMError
from src.eval.lm import evaluate
from src.model.gpt import GPT, SHAPE_KEYS, shape_of
from src.paths import RunLayout
from src.training import distributed as dist
from src.training import memory
from src.training.budget import Budget
from src.training.config import Config, config_from_dict
from src.training.init_from import with_source_shape
from src.training.lock import RunLock
from src.training.metrics import Console, JsonlSink, Metrics, peak_rss_gb
from src.training.optim import build_optimizer, lr_factor, set_lr
from src.training.state import TrainState, checkpoint_dict, rng_state, set_rng_state

COMPILE_DEVICES = ("cuda",)  # training.compile applies here (CPU/MPS stay eager: no gain)
MAX_SKIPS_IN_A_ROW = 10  # skip_nonfinite: this many skipped updates in a row stop the run

__all__ = ["Interrupted", "Result", "train"]


@dataclass
class Result:
    run_dir: Path
    final_checkpoint: Path
    model_path: Path
    step: int
    tokens: int
    val_loss: float | None
    val_bpb: float | None


def train(
    cfg: Config,
    data_root: str | Path = "data",
    device: str = "auto",
    resume: str = "auto",
    use_wandb: bool = True,
    on_checkpoint=None,
    log=print,
    cost_per_hour: float | None = None,
    check_memory: bool = True,
) -> Result:
    """Train cfg to its budget; resume from the run's newest checkpoint unless told otherwise.

    resume: 'auto' (newest checkpoint of this run, if any), 'never' (move the old run aside and
    start over) or a checkpoint path. on_checkpoint(path) is called after each save (Modal
    commits its volume there). Raises Interrupted after saving on SIGTERM/SIGINT.
    cost_per_hour: USD per hour of the machines (default $SLM_COST_PER_HOUR; Modal passes the GPU
    price x GPUs): logs cost_usd, and modal.max_cost_usd then ends the run like a finished one.
    check_memory: refuse a run whose memory estimate exceeds the device's, before any data or
    model work (False: `--ignore-memory`, try anyway).
    """
    try:
        return _launch(cfg, RunLayout(data_root, cfg.name), device, resume, use_wandb,
                       on_checkpoint, log, cost_per_hour, check_memory)
    except Interrupted:
        raise
    except Exception as e:  # under torchrun: name this rank's error in torchrun's summary
        err = dist.record_failure(e)
        if err is e:
            raise
        raise err from None


def _launch(cfg, layout, device, resume, use_wandb, on_checkpoint, log, cost_per_hour,
            check_memory=True) -> Result:
    dist.check_launch(cfg, dist.world_size(), device)
    ctx = dist.setup(device, cfg.training.parallelism)
    dev = ctx.device if ctx.device is not None else hw.resolve_device(device)
    say = log if ctx.master else (lambda *a, **k: None)
    if cfg.training.threads and dev.type == "cpu":
        torch.set_num_threads(cfg.training.threads)
    lock = None
    try:
        # before any data or model work: model.init_from's source is here and takes seq_len,
        # and the model it gives fits
        shaped = with_source_shape(cfg, layout.root, strict=True)[0]
        if check_memory:
            memory.check_memory(shaped, dev, ctx.world_size)
        state, state_path = None, None
        if ctx.master:
            lock = _take_lock(layout, resume, say)
            state_path, state = _choose_resume(layout, resume, say)
        dist.barrier(long=True)
        if ctx.world_size > 1:  # every rank loads what rank 0 chose
            state_path = dist.broadcast_object(str(state_path) if state_path else None)
            if state_path and not ctx.master:  # mapped: ranks on one machine share the pages
                state_path = Path(state_path)
                state = ckpt.load(state_path, mmap=True)
        trainer = Trainer(cfg, layout, dev, ctx, use_wandb, on_checkpoint, say, cost_per_hour)
        restored = [state]  # handed over, so the trainer can free it once restored
        del state
        return trainer.run(restored, state_path)
    finally:
        if lock:
            lock.release()
            _drop_if_empty(layout.run_dir)  # a run that failed before training leaves nothing
        dist.teardown()


def _check_prompt(prompt: str, tok) -> None:
    """training.sample_prompt must encode with the run's tokenizer: checked before training."""
    try:
        tok.encode(prompt)
    except SLMError as e:
        raise SLMError(f"training.sample_prompt {prompt!r}: {e}; change the prompt (or set it "
                       "to '') so that the samples after training can be made") from None


def _drop_if_empty(run_dir: Path) -> None:
    try:
        if all(p.name == ".lock" for p in run_dir.iterdir()):
            (run_dir / ".lock").unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:  # something arrived meanwhile: keep it
        pass


def _take_lock(layout: RunLayout, resume: str, say) -> RunLock:
    lock = RunLock(layout.lock)
    if resume == "never":
        moved = ckpt.move_aside(layout.run_dir, (layout.model_final, layout.model_best))
        if moved:
            lock, old = RunLock(layout.lock), lock
            old.release()
            say(f"--resume never: moved the old run to {moved}")
    for p in ckpt.remove_partial(layout.run_dir) + ckpt.remove_partial(
            layout.models_dir, layout.model_final.name):
        say(f"removed {p}, left by a save that was cut short")
    return lock


def _choose_resume(layout: RunLayout, resume: str, say) -> tuple[Path | None, dict | None]:
    if resume not in ("auto", "never"):
        path = Path(resume)
        return path, ckpt.check_resumable(ckpt.load(path, mmap=True), path)
    if resume == "auto":
        found = ckpt.find_resumable(layout.run_dir, say)
        if found:
            return found
    return None, None


class _Signals:
    """First SIGTERM/SIGINT: finish the step, checkpoint, stop. A second SIGINT: stop now."""

    def __init__(self):
        self.got: int | None = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
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


@dataclass
class StepOut:
    loss_sum: torch.Tensor  # training loss of the step, summed over ranks
    grad_norm: torch.Tensor
    factor: float  # learning-rate factor used
    stop: int | None  # a signal any rank got
    abandoned: bool = False  # a stop request came between micro-steps: the step was not taken


class Trainer:
    """One run: build() makes data, model, optimizer and sinks; run() loops and finishes."""

    def __init__(self, cfg: Config, layout: RunLayout, dev, ctx, use_wandb: bool,
                 on_checkpoint, say, cost_per_hour: float | None):
        import os

        self.cfg, self.t, self.layout, self.dev, self.ctx = cfg, cfg.training, layout, dev, ctx
        self.world, self.master = ctx.world_size, ctx.master
        self.use_wandb, self.on_checkpoint, self.say = use_wandb, on_checkpoint, say
        if cost_per_hour is None and os.environ.get("SLM_COST_PER_HOUR"):
            cost_per_hour = float(os.environ["SLM_COST_PER_HOUR"])
        self.cost_per_hour = cost_per_hour
        self.s = TrainState()
        self.last_val: dict = {}
        self.in_a_row = 0  # skipped updates in a row

    # ------------------------------------------------------------------ build

    def run(self, restored: list, state_path: Path | None) -> Result:
        """restored: [the checkpoint's state or None], emptied here so that the state (the whole
        checkpoint, optimizer included) is freed once restored, not kept for the whole run."""
        state = restored.pop()
        self.build(state, state_path)
        if state is not None and (self.budget.done(self.s.step, self.s.tokens)
                                  or self.budget.over_cost()):
            return self.already_done(state, state_path)
        if state is not None:
            self._budget_change(state)
        del state
        self.loop()
        return self.finish()

    def build(self, state, state_path) -> None:
        self.ds, self.tok = self._data(state, state_path)
        _check_prompt(self.t.sample_prompt, self.tok)
        self.model, init_sd = self._model(state, state_path)
        self._precision()
        self.wrapped = dist.wrap_model(self.model, self.ctx, self._fsdp_dtype())
        self.optimizer = build_optimizer(self.model, self.t, self.dev.type)
        self.loader = BatchLoader(self.ds.train, self.tok.id, self.cfg.seq_len, self.t.batch_size,
                                  self.t.seed, self.ctx.rank, self.world,
                                  masks=self.ds.masks and self.ds.masks["train"])
        if state is not None:
            self._restore(state, state_path)
        self.step_model = self._compiled(self.wrapped)
        self.hellaswag = self._hellaswag()
        self.flops_tok = self.model.flops_per_token(self.cfg.seq_len)
        self.peak = hw.peak_flops(self.dev)
        self.tokens_per_step = self.cfg.tokens_per_step(self.world)
        self.token_bytes = torch.from_numpy(self.tok.token_bytes())
        self._write_run_files()
        self.metrics = Metrics(self._sinks(state), log=self.say)
        self.budget = Budget(self.t, self.s.elapsed, self.cost_per_hour,
                             self.cfg.modal.max_cost_usd, self.world)
        self.budget.agree(dist.broadcast_object(self.budget.elapsed()))

    def _data(self, state, state_path):
        """Rank 0 tokenizes; the others wait, then read the same shards."""
        cfg, tok = self.cfg, None
        if cfg.data.format == "chat" and cfg.model.init_from:  # the fine-tuned model's tokenizer
            from src.training.init_from import source_tokenizer

            tok = source_tokenizer(cfg.model.init_from, self.layout.root)
        if self.master:
            ds = prepare(cfg, self.layout.root, log=self.say, tokenizer=tok)
        dist.barrier(long=True)
        if not self.master:
            ds = prepare(cfg, self.layout.root, log=lambda *a: None, tokenizer=tok)
        tok = ds.tokenizer
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = tok.vocab_size
        elif cfg.model.vocab_size < tok.vocab_size and not cfg.model.init_from:
            raise SLMError(
                f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{tok.vocab_size} tokens; remove model.vocab_size or raise it"
            )
        return ds, tok

    def _model(self, state, state_path):
        """The model, with weights from model.init_from or the checkpoint (loaded before FSDP
        shards it; the optimizer is built on the sharded parameters)."""
        init_sd = None
        if self.cfg.model.init_from:  # fine-tuning: the source sets the shape (also resuming)
            from src.training.init_from import resolve_init

            init_sd = resolve_init(self.cfg, self.tok, load_weights=state is None, log=self.say,
                                   root=self.layout.root)
        if state is not None:
            _check_compatible(self.cfg, state, self.tok.id, state_path)
            _check_global_batch(self.cfg, state, self.world, state_path)
        torch.manual_seed(self.t.seed)
        model = GPT(self.cfg.model).to(self.dev)
        if init_sd is not None:
            model.load_state_dict(init_sd)
        self.accum = dist.plan(self.cfg, self.world)
        if state is not None:
            ckpt.load_weights(model, state["model_state_dict"], state_path)
        return model, init_sd

    def _precision(self) -> None:
        self.amp = hw.amp_dtype(self.dev, self.t.dtype)
        self.autocast = hw.autocast(self.dev, self.amp)
        fp16_cuda = self.dev.type == "cuda" and self.amp == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        if self.dev.type == "cuda":  # TF32 tensor cores for what stays float32 (A100 and later)
            torch.set_float32_matmul_precision("high")
            warn = hw.emulated_bf16_warning(torch.cuda.get_device_name(self.dev),
                                            torch.cuda.get_device_capability(self.dev),
                                            self.t.dtype)
            if warn:
                self.say(warn)
        if self.ctx.sharded and self.scaler is not None:
            raise SLMError("training.parallelism fsdp with float16 (this GPU has no bfloat16): "
                           "FSDP's shards cannot use the fp16 gradient scaler; use parallelism: "
                           "ddp")
        if self.world == 1 and self.t.parallelism == "fsdp":
            self.say("note: training.parallelism fsdp with one process: nothing to shard, "
                     "training as a single process (launch with torchrun --nproc_per_node=N to "
                     "shard)")

    def _fsdp_dtype(self) -> torch.dtype | None:
        """FSDP's compute dtype for parameters: bf16 where training autocasts to bf16."""
        return torch.bfloat16 if self.amp == torch.bfloat16 else None

    def _restore(self, state: dict, state_path: Path) -> None:
        osd = state["optimizer_state_dict"]
        if dist.SHARDED in osd:  # written under FSDP: shards beside the checkpoint
            dist.load_sharded_optimizer(self.model, self.optimizer, osd, Path(state_path))
        elif self.ctx.sharded:
            dist.load_optimizer_state(self.model, self.optimizer, osd, self.ctx)
        else:
            ckpt.load_weights(self.optimizer, osd, state_path)
        self.loader.load_state_dict(state["loader"])
        self.s = TrainState.from_checkpoint(state)
        set_rng_state(state["rng"], self.dev)
        if state.get("world_size", self.world) != self.world:
            self.say(f"note: checkpoint written with {state['world_size']} ranks, resuming with "
                     f"{self.world}")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.say(f"resumed from {state_path} at step {self.s.step} ({self.s.tokens:,} tokens)")

    def _compiled(self, model):
        """torch.compile'd model (compiled lazily, at the first step) where training.compile asks
        for it on a device in COMPILE_DEVICES; a compile failure is caught there (_eager_after)."""
        self.compiled = self.compile_pending = bool(self.t.compile
                                                    and self.dev.type in COMPILE_DEVICES)
        return torch.compile(model) if self.compiled else model

    def _eager_after(self, e: Exception) -> None:
        """torch.compile failed at the first step: say so loudly, once, and train eagerly."""
        from torch._dynamo.exc import TorchDynamoException

        if not (self.compile_pending and isinstance(e, TorchDynamoException)):
            raise e
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        self.say(f"WARNING: torch.compile failed ({type(e).__name__}: {first}); this run trains "
                 "WITHOUT compile, slower (recorded as compiled: false). Fix the compiler set-up, "
                 "or set training.compile: false to skip the attempt")
        self.step_model, self.compiled, self.compile_pending = self.wrapped, False, False

    def _forward_backward(self, x, y, accum: int) -> torch.Tensor:
        with self.autocast():
            _, loss = self.step_model(x, y)
            loss = loss / accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def _hellaswag(self):
        if not (self.t.hellaswag_every and self.master):
            return None
        if self.ctx.sharded:
            self.say("note: training.hellaswag_every is skipped under FSDP (run `slm eval` "
                     "instead)")
            return None
        from src.eval import hellaswag as hs

        rows = hs.load_examples(hs.locate(self.t.hellaswag_file), self.t.hellaswag_examples)
        return lambda: hs.evaluate(self.model, self.tok, rows, self.autocast)

    def _write_run_files(self) -> None:
        if not self.master:
            return
        t, lay = self.t, self.layout
        lay.run_dir.mkdir(parents=True, exist_ok=True)
        lay.config.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.tok.save(lay.tokenizer)
        self.say(
            f"model {self.model.num_params() / 1e6:.2f}M params | {self.tokens_per_step:,} "
            f"tokens/step ({t.batch_size} x {self.cfg.seq_len} x {self.accum} accum x "
            f"{self.world} ranks) | device {self.dev}"
        )

    def _sinks(self, state) -> list:
        if not self.master:
            return []
        resumed = state is not None
        t = self.t
        console = Console(t.max_steps, max_tokens=t.max_tokens, max_seconds=t.max_seconds,
                          max_cost=self.cfg.modal.max_cost_usd if self.cost_per_hour else None)
        self.say = console.through(self.say)  # messages print above the progress bar
        sinks = [JsonlSink(self.layout.metrics, self.s.step if resumed else None), console]
        if self.use_wandb:
            from src.training.wandb_sink import open_wandb

            extra = {"params": self.model.num_params(), "tokens_per_step": self.tokens_per_step,
                     "grad_accum": self.accum, "world_size": self.world, "device": str(self.dev)}
            wb = open_wandb(self.cfg, self.layout, self.s.wandb_run_id, resumed, extra,
                            log=self.say)
            if wb is not None:
                sinks.append(wb)
                self.s.wandb_run_id = wb.run_id
        return sinks

    def _budget_change(self, state: dict) -> None:
        """A resumed run whose budget changed: say so, and go on per training.budget_change."""
        keys = ("max_steps", "max_tokens", "max_seconds")
        old_t = config_from_dict(state["config"]).training
        changed = [f"training.{k} {getattr(old_t, k)} -> {getattr(self.t, k)}" for k in keys
                   if getattr(old_t, k) != getattr(self.t, k)]
        s, t = self.s, self.t
        if not changed or s.step < t.warmup_steps:
            return
        p_old = Budget(old_t).progress(s.step, s.tokens, s.elapsed)
        f0 = lr_factor(old_t, s.step, p_old, s.schedule_from)
        p0 = self.budget.progress(s.step, s.tokens)
        lr = t.learning_rate
        what = {"continue": f"continues from {f0 * lr:.2e} and decays to the end value over the "
                            "new budget",
                "rewarm": f"warms from {f0 * lr:.2e} back up to {lr:.2e} over {t.warmup_steps} "
                          "steps, then decays over the new budget",
                "restretch": f"follows the schedule stretched over the new budget: it jumps to "
                             f"{lr_factor(t, s.step, p0) * lr:.2e}"}[t.budget_change]
        others = ", ".join(m for m in ("continue", "rewarm", "restretch") if m != t.budget_change)
        self.say(f"note: the budget changed since step {s.step} ({', '.join(changed)}; the old "
                 f"one was {min(p_old, 1):.0%} used); the learning rate {what} "
                 f"(training.budget_change: {t.budget_change}; the others: {others})")
        s.schedule_from = None if t.budget_change == "restretch" else {
            "step": s.step, "progress": p0, "factor": f0, "mode": t.budget_change}

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        t, s = self.t, self.s
        self.p_start = self.budget.progress(s.step, s.tokens)
        self._new_window()
        self.bad_seen = (torch.zeros((), dtype=torch.bool, device=self.dev)
                         if self.dev.type == "cuda" else None)
        self.stopped = False
        self.model.train()
        with _Signals() as sig:
            while not self.stopped and not self.budget.done(s.step, s.tokens):
                out = self.step(sig)
                if out.abandoned:  # stopped between micro-steps: save the last completed step
                    self.interrupt(out.stop, sig.got)
                last = self.budget.done(s.step, s.tokens)
                if self.bad_seen is not None and (last or out.stop is not None or any(
                        s.step % n == 0 for n in (t.log_every, t.eval_every, t.checkpoint_every))):
                    if bool(self.bad_seen):
                        raise _nonfinite_error(s.step, self.layout.run_dir, at_or_before=True)
                if self.budget.max_cost and not last and s.step % t.log_every == 0 \
                        and self.budget.over_cost():
                    self.say(f"budget reached: ${self.budget.cost():.2f} of modal.max_cost_usd "
                             f"${self.budget.max_cost:.2f} at step {s.step}; stopping with a "
                             "checkpoint")
                    self.stopped = last = True
                if s.step % t.log_every == 0 or last or s.step == 1:
                    self.log_train(out, last)
                if s.step % t.eval_every == 0 or last:
                    with self._aside("eval"):
                        self.log_eval(samples=not last)
                if self.hellaswag and (s.step % t.hellaswag_every == 0 or last):
                    with self._aside("eval"):
                        row = {"step": s.step, "tokens": s.tokens, **self.hellaswag()}
                    self.say(f"step {s.step:>6} | hellaswag acc_norm "
                             f"{row['hellaswag/acc_norm']:.4f}")
                    self.metrics.log(row)
                stop = out.stop if self.world > 1 else sig.got
                if stop is not None:
                    self.interrupt(stop, sig.got)
                if s.step % t.checkpoint_every == 0 and not last:
                    with self._aside("checkpoint"):
                        self.save(self.layout.step(s.step))
                        self.metrics.call("on_checkpoint", self.layout.step(s.step), s.step)

    def step(self, sig) -> StepOut:
        """One optimizer step: accumulate micro-batches, clip, check, update."""
        t, s, accum = self.t, self.s, self.accum
        factor = lr_factor(t, s.step, self.budget.progress(s.step, s.tokens), s.schedule_from)
        set_lr(self.optimizer, factor)
        loss_sum = torch.zeros((), device=self.dev)
        start = self._step_start(accum)
        for micro in range(accum):
            if start is not None and micro and sig.got is not None:
                return self._abandon(start, loss_sum, factor, sig.got)
            x, y = self.loader.next_batch(self.dev)
            dist.grad_sync(self.wrapped, micro == accum - 1)  # reduce on the last micro-step
            try:
                loss_sum += self._forward_backward(x, y, accum)
            except Exception as e:  # torch.compile failed (at its first call): redo eagerly
                self._eager_after(e)
                loss_sum += self._forward_backward(x, y, accum)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gnorm = dist.clip_grad_norm(self.model, t.grad_clip, self.ctx)
        stop = sig.got
        if self.world > 1:  # global loss sum, rank 0's clock, and a signal seen by any rank
            loss_sum, stop, agreed = _sync_step(loss_sum, sig.got, self.budget.elapsed(),
                                                self.ctx)
            self.budget.agree(agreed)
        skip = not self._finite(loss_sum, gnorm)
        if self.scaler:  # fp16: the scaler skips overflowing steps itself
            if not skip:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not skip:
            self.optimizer.step()
        if not skip:  # train/loss is the mean over the log interval (no sync here)
            self.win_loss += loss_sum
            self.win_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        if self.compile_pending is not None:  # this process's first step: compiled or not
            self.compile_pending = None
            self.metrics.call("on_config", {"compiled": self.compiled}, s.step)
        s.tokens += self.tokens_per_step
        self.win_tokens += self.tokens_per_step
        return StepOut(loss_sum, gnorm, factor, stop)

    def _step_start(self, accum: int) -> tuple | None:
        """Where a step starts, so that a stop request between its micro-steps can abandon it.
        One process only: under torchrun the ranks agree on a stop once per step."""
        if accum == 1 or self.world > 1:
            return None
        return self.loader.state_dict(), rng_state(self.dev)

    def _abandon(self, start: tuple, loss_sum, factor: float, got: int) -> StepOut:
        """Drop a partial step: gradients, data position and RNG go back to the step's start,
        so the checkpoint written next is the last completed step (exact resume holds)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loader.load_state_dict(start[0])
        set_rng_state(start[1], self.dev)
        return StepOut(loss_sum, torch.zeros(()), factor, got, abandoned=True)

    def _finite(self, loss_sum, gnorm) -> bool:
        """False when this step's update must be skipped (training.skip_nonfinite)."""
        t, s = self.t, self.s
        finite = torch.isfinite(loss_sum)
        if self.scaler is None:  # with fp16, the grad scaler skips overflowing steps itself
            finite &= torch.isfinite(gnorm)
        if self.dev.type == "cuda" and not t.skip_nonfinite:
            self.bad_seen |= ~finite  # checked at log/eval/checkpoint steps: no per-step sync
            return True
        if bool(finite):
            self.in_a_row = 0
            return True
        if not t.skip_nonfinite:
            raise _nonfinite_error(s.step + 1, self.layout.run_dir)
        s.skipped_nonfinite += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise SLMError(
                f"loss or gradients were NaN/Inf {self.in_a_row} steps in a row (steps "
                f"{s.step + 2 - self.in_a_row}-{s.step + 1}): training does not recover; the "
                f"last checkpoints in {self.layout.run_dir} are kept. Lower "
                "training.learning_rate or check the data")
        self.say(f"warning: non-finite loss/gradients at step {s.step + 1}; update skipped "
                 f"({s.skipped_nonfinite} so far)")
        self.metrics.log({"step": s.step + 1, "skipped_nonfinite": s.skipped_nonfinite})
        return False

    def _new_window(self) -> None:
        """Start a log interval: its tokens, summed loss, and the time spent outside training."""
        self.win_tokens, self.win_start = 0, time.time()
        self.win_loss, self.win_steps = torch.zeros((), device=self.dev), 0
        self.aside = {"eval": 0.0, "checkpoint": 0.0}

    @contextlib.contextmanager
    def _aside(self, kind: str):
        """Time work that is not training (eval, samples, checkpoints): throughput leaves it out."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)  # queued training steps count as training
        t0 = time.time()
        try:
            yield
        finally:
            self.aside[kind] += time.time() - t0

    def log_train(self, out: StepOut, last: bool) -> None:
        s, now = self.s, time.time()
        tps = self.win_tokens / max(now - self.win_start - sum(self.aside.values()), 1e-9)
        loss = self.win_loss if self.win_steps else out.loss_sum
        loss = loss.item() / max(self.win_steps, 1) / self.world
        aside = self.aside
        self._new_window()
        p = self.budget.progress(s.step, s.tokens, self.budget.elapsed())
        eta = (now - self.budget.started) * (1 - p) / max(p - self.p_start, 1e-9)
        row = {
            "step": s.step, "tokens": s.tokens, "time": round(self.budget.elapsed(), 3),
            "train/loss": loss, "lr": self.t.learning_rate * out.factor,
            "grad_norm": float(out.grad_norm), "tokens_per_sec": tps,
            "flops_per_sec": tps * self.flops_tok,
            "mfu": hw.mfu(tps, self.flops_tok, self.peak, self.world),
            "eval_seconds": round(aside["eval"], 3),
            "checkpoint_seconds": round(aside["checkpoint"], 3),
            "eta_seconds": eta, "progress": p,
        }
        if self.cost_per_hour:
            row["cost_usd"] = self.budget.cost()
        if self.dev.type == "cuda":
            row["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
        else:
            row["memory/peak_rss_gb"] = peak_rss_gb()
        self.metrics.log(row)

    def log_eval(self, samples: bool) -> None:
        s, cfg = self.s, self.cfg
        batches = val_batches(self.ds.val, self.tok.id, cfg.seq_len, self.t.batch_size,
                              self.t.eval_tokens, self.ctx.rank, self.world,
                              masks=self.ds.masks and self.ds.masks["val"])
        sharded = self.ctx.sharded
        self.last_val = evaluate(
            self.model, batches, self.token_bytes, self.autocast,
            reduce=dist.all_reduce_sum if self.world > 1 else None,
            lockstep=_most_batches if sharded else None, seq_len=cfg.seq_len)
        self.last_val.pop("val/tokens", None)
        if s.best_val_loss is None or self.last_val["val/loss"] < s.best_val_loss:
            s.best_val_loss = self.last_val["val/loss"]
        row = {"step": s.step, "tokens": s.tokens, "time": round(self.budget.elapsed(), 3),
               **self.last_val}
        if samples and self.t.num_samples and (self.master or sharded):  # FSDP: all ranks
            row["samples"] = self.samples()
        self.metrics.log(row)

    @torch.no_grad()
    def samples(self) -> list[dict]:
        t, tok = self.t, self.tok
        g = torch.Generator(device=self.dev).manual_seed(t.seed + self.s.step)  # not training's
        prompt_ids = [tok.eot_id] + (tok.encode(t.sample_prompt) if t.sample_prompt else [])
        out = []
        self.model.eval()
        for _ in range(t.num_samples):
            idx = torch.tensor([prompt_ids], device=self.dev)
            new = [int(n) for n in self.model.generate(idx, t.sample_tokens, temperature=0.8,
                                                       top_k=200, generator=g)]
            out.append({"prompt": t.sample_prompt, "text": tok.decode(new)})
        self.model.train()
        return out

    def save(self, path: Path, final: bool = False) -> dict | None:
        """Write a checkpoint (every rank calls: FSDP gathers the model to rank 0, and each rank
        writes its own shard of the optimizer state beside the checkpoint)."""
        self.s.elapsed = self.budget.elapsed()
        model = dist.model_state(self.model, self.ctx)  # first: FSDP reshards its parameters
        optimizer = (dist.save_sharded_optimizer(self.model, self.optimizer, path, self.ctx)
                     if self.ctx.sharded else dist.optimizer_state(self.model, self.optimizer,
                                                                   self.ctx))
        st = checkpoint_dict(
            self.s, model=model, optimizer=optimizer,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            loader=self.loader.state_dict(), rng=rng_state(self.dev), config=self.cfg.to_dict(),
            tok=self.tok, world=self.world, parallelism=self.t.parallelism,
            tokens_per_step=self.tokens_per_step, final=final)
        if not self.master:
            return None
        ckpt.save(st, path)
        if not final:
            ckpt.prune(self.layout.run_dir, self.t.keep_last)
        if self.on_checkpoint:
            self.on_checkpoint(path)
        return st

    def interrupt(self, stop: int, got: int | None) -> None:
        path = self.layout.step(self.s.step)
        self.save(path)
        dist.barrier()
        self.metrics.call("on_interrupt", got, self.s.step)
        self.metrics.close()
        raise Interrupted(f"{signal.Signals(stop).name}: saved {path} at step {self.s.step}; "
                          "re-run to resume", stop)

    # ------------------------------------------------------------------ finish

    def finish(self) -> Result:
        s, lay = self.s, self.layout
        final_state = self.save(lay.final, final=True)
        samples = None
        if self.t.num_samples and (self.master or self.ctx.sharded):  # shown last
            samples = self.samples()
        if self.master:
            self._write_model(final_state["model_state_dict"])
            self.metrics.call("on_final", lay.final, lay.model_final, self.last_val)
            nan = float("nan")
            self.say(f"done: step {s.step}, {s.tokens:,} tokens in {self.budget.elapsed():.0f} "
                     f"s; val loss {self.last_val.get('val/loss', nan):.4f}, "
                     f"val bpb {self.last_val.get('val/bpb', nan):.4f}")
            self.say(f"checkpoint: {lay.final}\nmodel:      {lay.model_final}")
            if samples:
                self.metrics.log({"step": s.step, "tokens": s.tokens, "samples": samples})
        self.metrics.close()
        dist.barrier()
        return Result(lay.run_dir, lay.final, lay.model_final, s.step, s.tokens,
                      self.last_val.get("val/loss"), self.last_val.get("val/bpb"))

    def _write_model(self, model_state_dict: dict) -> None:
        v = self.last_val
        ckpt.save(ckpt.model_file(model_state_dict, self.cfg.to_dict(), self.tok, self.s.step,
                                  self.s.tokens, v.get("val/loss"), v.get("val/bpb")),
                  self.layout.model_final)
        if self.on_checkpoint:
            self.on_checkpoint(self.layout.model_final)

    def already_done(self, state: dict, state_path: Path) -> Result:
        """Resumed a run that had ended (its budget, or its cost stop): report, fill any gap."""
        s, lay = self.s, self.layout
        if self.budget.done(s.step, s.tokens):
            self.say(f"run '{self.cfg.name}' is already complete at step {s.step} ({state_path}); "
                     "--resume never starts it over")
        else:
            self.say(f"run '{self.cfg.name}' stopped at its budget modal.max_cost_usd "
                     f"${self.budget.max_cost:.2f} (step {s.step}); raise modal.max_cost_usd to "
                     "continue it")
        self.metrics.close()
        if self.master and not lay.model_final.is_file():  # stopped between final.pt and it
            self._write_model(state["model_state_dict"])
            self.say(f"wrote the missing model file {lay.model_final}")
        return Result(lay.run_dir, state_path, lay.model_final, s.step, s.tokens, None, None)


# ----------------------------------------------------------------------------- helpers


def _most_batches(n: int) -> int:
    t = torch.tensor(n)
    dist.all_reduce_max(t)
    return int(t)


def _sync_step(loss_sum: torch.Tensor, got: int | None, elapsed: float, ctx) -> tuple:
    """Once per step: (global loss sum, signal any rank got, rank 0's elapsed time).

    The signal and the clock are agreed between the hosts (a CPU all-reduce), so the host never
    waits for the GPU; the loss is summed on the device, queued behind the step's work, and is
    read only when a metric line is logged."""
    ctl = torch.tensor([elapsed if ctx.master else 0.0, got == signal.SIGTERM,
                        got == signal.SIGINT], dtype=torch.float64)
    dist.all_reduce_host(ctl)
    el, term, intr = ctl.tolist()
    total = loss_sum.clone()
    dist.all_reduce_sum(total)
    sig = signal.SIGTERM if term else signal.SIGINT if intr else None
    return total, sig, el


def _check_compatible(cfg: Config, state: dict, tok_id: str, path: Path) -> None:
    saved = state.get("config", {}).get("model", {})
    old, new = shape_of(saved), cfg.model.model_dump()
    diff = [f"model.{k}={old[k]!r} there, {new[k]!r} here" for k in SHAPE_KEYS
            if saved and old[k] != new[k]]
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


def _check_global_batch(cfg: Config, state: dict, world: int, path: Path) -> None:
    """A resumed run keeps its global batch, whatever the number of processes."""
    old_world = int(state.get("world_size", 1))
    old = state.get("tokens_per_step")
    if old is None:
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


def _nonfinite_error(step: int, run_dir: Path, at_or_before: bool = False) -> SLMError:
    when = f"at or before step {step}" if at_or_before else f"at step {step}"
    return SLMError(
        f"loss or gradients became NaN/Inf {when}; stopped without saving, so the last good "
        f"checkpoint in {run_dir} is kept. Lower training.learning_rate, check the data, or set "
        "training.skip_nonfinite: true to skip such steps"
    )
