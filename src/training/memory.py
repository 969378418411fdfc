"""Memory a run needs and the memory it has: refused before anything is allocated.

    memory_estimate_gb(model, cfg, world)   weights, gradients and AdamW moments, plus activations
    check_memory(cfg, device, world)        SLMError when the estimate exceeds the device's memory

`train()` checks every run (on Modal too) unless told not to (`--ignore-memory`); `--dry-run`,
`--smoke`'s forecast and `slm plan` print the same estimate.
"""

from __future__ import annotations

import os

import torch

from src.errors import SLMError
from src.model.gpt import GPT

MEMORY_SHARE = 0.9  # a plan or forecast counts on this share of a device's memory at most


def memory_estimate_gb(model: GPT, cfg, world: int = 1) -> dict:
    """Rough per-GPU memory: weights + grads + AdamW moments in fp32, plus activations."""
    n = model.num_params()
    states = n * (4 + 4 + 8)  # fp32 weights, grads, two Adam moments
    if cfg.training.parallelism == "fsdp" and world > 1:
        states /= world
    m, B, T = model.cfg, cfg.training.batch_size, cfg.seq_len  # the model's: vocab filled in
    # per layer ~ 34*B*T*C bytes in 16-bit with flash attention (Korthikanti et al., 2022)
    act = 34 * B * T * m.n_embd * m.n_layer * (0.25 if m.grad_checkpoint else 1)
    act += B * T * m.padded_vocab * 4 * 2  # logits in fp32 and their gradient
    return {"params_optimizer_gb": states / 2**30, "activations_gb": act / 2**30,
            "total_gb": (states + act) / 2**30}


def device_memory_gb(device) -> float | None:
    """All the memory of the device a run trains on (GPU memory, or the machine's RAM)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[1] / 2**30
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        except (ValueError, OSError, AttributeError):
            return None
    return None


def memory_verdict(cfg, device, world: int = 1) -> tuple[float, float | None]:
    """(GB the run needs per device, GB the device has or None where unknown)."""
    with torch.device("meta"):
        model = GPT(cfg.model.model_copy(update={"vocab_size": cfg.model_vocab}))
    return memory_estimate_gb(model, cfg, world)["total_gb"], device_memory_gb(device)


def check_memory(cfg, device, world: int = 1) -> None:
    """Refuse a model that cannot fit in the device's memory, before anything is allocated."""
    need, have = memory_verdict(cfg, device, world)
    if torch.device(device).type == "cpu":  # the processes of one machine share its memory
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if have is not None and need > have:
        raise SLMError(
            f"this run needs about {need:,.1f} GB per device but {device} has {have:,.1f} GB: it "
            "does not fit; make the model smaller (model.n_layer / n_embd / vocab_size), lower "
            "training.batch_size (raise gradient_accumulation_steps to keep the batch), set "
            "model.grad_checkpoint: true, or pass --ignore-memory to try anyway")


