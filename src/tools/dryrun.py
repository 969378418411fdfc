"""`--dry-run`: what a run would do, without doing it (config, size, FLOPs, memory)."""

from __future__ import annotations

import torch
import yaml

from src.model.gpt import GPT
from src.training.memory import memory_estimate_gb, memory_verdict


def describe(cfg, device: str = "auto", root=None) -> str:
    from src.paths import data_root
    from src.training.init_from import with_source_shape

    cfg, _ = with_source_shape(cfg, data_root(root))  # model.init_from: the shape it loads
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
    lines.append(_fits(cfg, device))
    try:
        from src.tools.cost import estimate_text

        lines.append(estimate_text(cfg, root=root))
    except ModuleNotFoundError:
        pass
    return "\n".join(lines)


def _fits(cfg, device: str) -> str:
    """Whether the run fits the memory of the device it would train on here."""
    from src.errors import SLMError
    from src.hardware import resolve_device

    try:
        dev = resolve_device(device)
    except SLMError as e:
        return f"memory here:       unknown ({e})"
    need, have = memory_verdict(cfg, dev)
    if have is None:
        return f"memory here:       unknown for {dev}"
    if need > have:
        return (f"memory here:       does NOT fit: needs ~{need:,.1f} GB, {dev} has {have:,.1f} GB; "
                "training refuses it (lower the model or batch, or --ignore-memory)")
    return f"memory here:       fits ({need:,.1f} of {have:,.1f} GB on {dev})"
