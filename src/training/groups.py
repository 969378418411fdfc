"""Parameter groups shared by AdamW and Muon: the token embedding's own learning rate."""

from __future__ import annotations


def is_token_embedding(name: str) -> bool:
    """A token table: the token embedding (with tied embeddings, also the output head) and the
    value embeddings (model.value_embeds)."""
    return name.endswith("transformer.wte.weight") or ".ve." in f".{name}"


def embedding_group(params: list, t) -> list[dict]:
    """training.embedding_lr: the token tables' own group, not decayed (appended last, so
    the other groups, and checkpoints written without it, keep their order)."""
    return [{"params": params, "lr": t.embedding_lr, "weight_decay": 0.0}] if params else []
