"""Parameter groups shared by AdamW and Muon: the token embedding's own learning rate."""

from __future__ import annotations


def is_token_embedding(name: str) -> bool:
    """The token embedding's parameter (with tied embeddings, also the output head)."""
    return name.endswith("transformer.wte.weight")


def embedding_group(params: list, t) -> list[dict]:
    """training.embedding_lr: the token embedding's own group, not decayed (appended last, so
    the other groups, and checkpoints written without it, keep their order)."""
    return [{"params": params, "lr": t.embedding_lr, "weight_decay": 0.0}] if params else []
