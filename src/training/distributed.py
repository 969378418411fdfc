"""Multi-process training through torchrun: launch checks, process group, DDP/FSDP2, collectives.

    torchrun --standalone --nproc_per_node=4 train_local.py --config configs/gpt_124m.yaml
    torchrun --standalone --nproc_per_node=2 train_local.py --device cpu          # gloo, on a CPU

`training.parallelism: ddp` (default) keeps a full replica per rank and all-reduces gradients;
`fsdp` shards parameters, gradients and optimizer state over the ranks with FSDP2 (`fully_shard`,
one unit per transformer block). Either way checkpoints hold the full, unsharded state in the
plain single-process format, so a run saved with N ranks resumes with any M ranks (or one).
With one process every function here is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as td

from src.errors import SLMError

# Collectives that wait longer than this fail instead of hanging (rank 0 may be writing a large
# checkpoint meanwhile). Waits for rank 0 preparing data use a separate, day-long timeout.
TIMEOUT_S = float(os.environ.get("SLM_DIST_TIMEOUT_S", 1800))
_LONG = timedelta(hours=24)
_long_group = None  # gloo group for the long waits
_host_group = None  # gloo group for per-step agreements when the default group is NCCL


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set when torchrun chose it
    parallelism: str = "ddp"

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP over several ranks: every rank must run every forward (lockstep)."""
        return self.parallelism == "fsdp" and self.world_size > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan(cfg, world: int) -> int:
    """Gradient-accumulation steps per rank for this world size; refuses batches that do not split.

    Global batch (tokens per optimizer step) = batch_size x seq_len x accumulation x world size.
    With training.batch_tokens set it is that number, which must be a multiple of
    batch_size x seq_len x world size; without it, gradient_accumulation_steps is used as given.
    """
    t = cfg.training
    per_micro = t.batch_size * cfg.seq_len * world
    if t.batch_tokens is not None and t.batch_tokens % per_micro:
        lo = max(per_micro, t.batch_tokens // per_micro * per_micro)
        hint = f"{lo:,}" + (f" or {lo + per_micro:,}" if lo < t.batch_tokens else "")
        raise SLMError(
            f"training.batch_tokens {t.batch_tokens:,} does not split over {world} process(es): it "
            f"must be a multiple of batch_size x seq_len x world size = {t.batch_size} x "
            f"{cfg.seq_len} x {world} = {per_micro:,}. Set training.batch_tokens to {hint}, or "
            "change training.batch_size or the number of processes"
        )
    return cfg.grad_accum(world)


def check_launch(cfg, world: int, device: str) -> None:
    """Refuse launch settings that cannot work, before any process group or data work."""
    t = cfg.training
    plan(cfg, world)
    if world <= 1:
        return
    if device == "mps":
        raise SLMError("--device mps cannot run under torchrun (no multi-process backend for "
                       "Apple GPUs); use one process, or --device cpu")
    if t.parallelism == "fsdp" and t.optimizer == "muon":
        raise SLMError("training.optimizer: muon needs whole weight matrices, which FSDP shards; "
                       "use training.parallelism: ddp with muon, or optimizer: adamw with fsdp")
    if t.parallelism == "fsdp" and t.dtype == "float16":
        raise SLMError("training.dtype: float16 needs a gradient scaler that FSDP's shards do not "
                       "support here; use dtype bfloat16 (or auto on a GPU with bf16), or "
                       "parallelism: ddp")


def setup(device: str = "auto", parallelism: str = "ddp") -> Context:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    world = world_size()
    if world <= 1:
        return Context(parallelism=parallelism)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise SLMError(f"WORLD_SIZE={world} is set but RANK/MASTER_ADDR are not: start several "
                       "processes with torchrun (torchrun --standalone --nproc_per_node=N "
                       "train_local.py ...), or unset WORLD_SIZE")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise SLMError("--device cuda under torchrun, but no CUDA GPU is visible (NCCL needs "
                       "one GPU per process); use --device cpu to train with the gloo backend")
    if use_cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise SLMError(f"torchrun started more processes on this machine than it has GPUs "
                           f"({n} visible; local rank {local}); use --nproc_per_node={n} or fewer")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    global _long_group, _host_group
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if use_cuda else "gloo",
                              device_id=dev if use_cuda else None,
                              timeout=timedelta(seconds=TIMEOUT_S))
    _long_group = td.new_group(backend="gloo", timeout=_LONG)
    # small per-step agreements (stop signals, rank 0's clock) between the hosts: over gloo, so
    # the CPU never waits for the GPU's queued work to learn them (None: the default is gloo)
    _host_group = td.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S)) \
        if use_cuda else None
    return Context(rank, world, local, dev, parallelism)


def teardown() -> None:
    global _long_group, _host_group
    _long_group = _host_group = None
    if td.is_initialized():
        td.destroy_process_group()


def barrier(long: bool = False) -> None:
    """Wait for every rank. long=True: rank 0 may take hours (tokenizing data) before arriving."""
    if td.is_initialized():
        td.barrier(group=_long_group if long else None)


def broadcast_object(obj):
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> None:
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.SUM)


def all_reduce_host(t: torch.Tensor) -> None:
    """Sum a CPU tensor over the ranks between the hosts (no wait for the GPU)."""
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.SUM, group=_host_group)


def all_reduce_max(t: torch.Tensor) -> None:
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.MAX)


def _fsdp_units(model):
    from src.model.gpt import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def wrap_model(model, ctx: Context, param_dtype: torch.dtype | None = None):
    """DDP replica or FSDP2 shards (in place: `model` itself becomes sharded) over the ranks.

    param_dtype: FSDP computes and all-gathers parameters in this dtype (bf16 on GPUs), keeping
    fp32 master weights and reducing gradients in fp32.
    """
    if ctx.world_size <= 1:
        return model
    if ctx.parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _fsdp_units(model):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    # the only buffers are RoPE's tables, the same on every rank: no broadcast every forward
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def grad_sync(model, enabled: bool) -> None:
    """Whether the next backward reduces gradients over the ranks (only the last micro-step does).

    Set before the micro-step's forward; it stays in force through its backward.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP (what DDP.no_sync() toggles)
        model.require_backward_grad_sync = enabled


def clip_grad_norm(model, max_norm: float, ctx: Context) -> torch.Tensor:
    """Global gradient norm (over all shards), clipping to max_norm when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor: each FSDP rank holds part of the sum
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# ----------------------------------------------------------------------------- checkpoints
# Checkpoints hold the full model state in the plain format of a single-process model (parameter
# names of the unwrapped GPT), so step_N.pt and final.pt always have a usable model_state_dict.
# The optimizer state is full too (keyed by parameter index, torch.optim's format), except under
# FSDP: there each rank writes its own shard beside the checkpoint (torch.distributed.checkpoint,
# <checkpoint>.optim/), so no rank ever holds the whole optimizer, and any number of ranks, one
# included, can load it (the shards are re-cut on load).

SHARDED = "sharded"  # optimizer_state_dict of an FSDP checkpoint: {"sharded": "<folder name>"}


def optim_folder(path: Path) -> Path:
    """Where the optimizer shards of checkpoint `path` live: step_8.pt -> step_8.optim/."""
    return path.with_suffix(".optim")


def save_sharded_optimizer(model, optimizer, path: Path, ctx: Context) -> dict:
    """Every rank writes its shard of the optimizer state beside checkpoint `path` (into a
    temporary folder renamed when all are done); returns the marker the checkpoint records."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    folder = optim_folder(path)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if ctx.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp)
    barrier()
    if ctx.master:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return {SHARDED: folder.name}


def load_sharded_optimizer(model, optimizer, marker: dict, path: Path) -> None:
    """Load the optimizer shards written beside checkpoint `path` into this rank's optimizer,
    whatever the world size then and now (under FSDP or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    folder = path.parent / marker[SHARDED]  # (checked complete when the checkpoint was chosen)
    for g in optimizer.param_groups:  # keys set while training (set_lr's initial_lr) are only
        g.setdefault("initial_lr", g["lr"])  # loaded when the template has them
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the shapes to fill
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model, ctx: Context) -> dict:
    """The full model state on rank 0 (a collective under FSDP: every rank must call it)."""
    if not ctx.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())  # {} on ranks > 0


def optimizer_state(model, optimizer, ctx: Context) -> dict:
    """The full optimizer state on rank 0, in torch.optim's own format (a collective under FSDP)."""
    if not ctx.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not osd:
        return {}
    index, groups = {}, []  # parameter names -> the indices torch.optim would give them
    for g in osd["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model, optimizer, state: dict, ctx: Context) -> None:
    """Load a full optimizer state (from a checkpoint of any world size) into this rank."""
    if not ctx.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    for g, saved in zip(optimizer.param_groups, state["param_groups"], strict=False):
        for k, v in saved.items():  # keys set during training (initial_lr) must exist here too
            g.setdefault(k, v)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups, i = [], 0
    for g in state["param_groups"]:
        groups.append({**g, "params": order[i : i + len(g["params"])]})
        i += len(g["params"])
    osd = {"state": {order[k]: v for k, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- failures


def record_failure(e: BaseException) -> BaseException:
    """Note a rank's error for torchrun's summary; a lost peer becomes a short SLMError.

    When one rank dies, torchrun stops the others; their collectives then fail with a
    connection error that only says a peer went away. The dying rank's own error is what
    torchrun reports as the root cause (the first failure).
    """
    if world_size() <= 1:
        return e
    if isinstance(e, td.DistError) or "Connection closed by peer" in str(e):
        return SLMError(f"rank {os.environ.get('RANK', '?')}: lost contact with another rank, which probably failed "
                        f"(its error is shown by torchrun above or below): {str(e)[:300]}")
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            get_error_handler().record_exception(e)
        except Exception:  # noqa: BLE001 - reporting must never hide the original error
            pass
    return e
