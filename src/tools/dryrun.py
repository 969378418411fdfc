"""`--dry-run`: what a run would do, without doing it (config, size, FLOPs, memory)."""

from __future__ import annotations

import torch
import yaml

from src.model.gpt import GPT


def memory_estimate_gb(model: GPT, cfg, world: int = 1) -> dict:
    """Rough per-GPU memory: weights + grads + AdamW moments in fp32, plus activations."""
    n = model.num_params()
    states = n * (4 + 4 + 8)  # fp32 weights, grads, two Adam moments
    if cfg.training.parallelism == "fsdp" and world > 1:
        states /= world
    m, B, T = cfg.model, cfg.training.batch_size, cfg.seq_len
    # per layer ~ 34*B*T*C bytes in 16-bit with flash attention (Korthikanti et al., 2022)
    act = 34 * B * T * m.n_embd * m.n_layer * (0.25 if m.grad_checkpoint else 1)
    act += B * T * m.padded_vocab * 4 * 2  # logits in fp32 and their gradient
    return {"params_optimizer_gb": states / 2**30, "activations_gb": act / 2**30,
            "total_gb": (states + act) / 2**30}


def device_memory_gb(device) -> float | None:
    """All the memory of the device a run trains on (GPU memory, or the machine's RAM)."""
    import os

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[1] / 2**30
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_memory(cfg, device, world: int = 1) -> None:
    """Refuse a model that cannot fit in the device's memory, before anything is allocated."""
    from src.errors import SLMError

    if cfg.model.vocab_size is None:
        cfg = cfg.model_copy(deep=True)
        cfg.model.vocab_size = 256
    with torch.device("meta"):
        model = GPT(cfg.model)
    need, have = memory_estimate_gb(model, cfg, world)["total_gb"], device_memory_gb(device)
    if have is not None and need > have:
        raise SLMError(
            f"this run needs about {need:,.1f} GB but {device} has {have:,.1f} GB; make the model "
            "smaller (model.n_layer / n_embd / vocab_size), lower training.batch_size, or pass "
            "--ignore-memory to try anyway")


def describe(cfg, device: str = "auto") -> str:
    vocab_note = ""
    if cfg.model.vocab_size is None:  # char tokenizer: known after preparation
        cfg = cfg.model_copy(deep=True)
        cfg.model.vocab_size = 256
        vocab_note = " (char vocab assumed 256 until the data is read)"
    with torch.device("meta"):
        model = GPT(cfg.model)
    mem = memory_estimate_gb(model, cfg)
    lines = [
        "# resolved config",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "",
        f"parameters:        {model.num_params():,} ({model.num_params() / 1e6:.1f}M){vocab_note}",
        f"tokens per step:   {cfg.tokens_per_step():,} "
        f"({cfg.training.batch_size} seqs x {cfg.seq_len} tokens x {cfg.grad_accum()} accum)",
        f"FLOPs per token:   {model.flops_per_token(cfg.seq_len):.3e} (6N + 12*L*T*C)",
        f"memory estimate:   {mem['total_gb']:.2f} GB ({mem['params_optimizer_gb']:.2f} weights+"
        f"grads+AdamW, {mem['activations_gb']:.2f} activations at batch {cfg.training.batch_size})",
    ]
    try:
        from src.tools.cost import estimate_text

        lines.append(estimate_text(cfg))
    except ModuleNotFoundError:
        pass
    return "\n".join(lines)
