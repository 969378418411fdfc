"""Multi-process training through torchrun: process group, model wrapping, collectives.

With one process every function here is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from src.errors import SLMError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set when torchrun chose it


def setup(device: str = "auto") -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise SLMError("--device cuda under torchrun, but no CUDA GPU is visible; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Context(rank, world, local, dev)


def teardown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def broadcast_object(obj):
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> None:
    if td.is_initialized():
        td.all_reduce(t, op=td.ReduceOp.SUM)


def wrap_model(model, ctx: Context, t):
    if ctx.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device is not None and ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def no_sync(model, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-step."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model, max_norm: float, ctx: Context) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def gather_full_state(state: dict, model, optimizer, ctx: Context) -> dict:
    """DDP keeps full replicas: rank 0's state is the whole state."""
    return state

