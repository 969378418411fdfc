"""Batches from token shards: memory-mapped, shuffled by a seed, rank-aware, resumable.

The training stream is cut into windows of seq_len + 1 tokens (stride seq_len) across all shards;
each epoch visits every window once in an order fixed by (seed, epoch). The loader's whole state is
one integer, `position` (windows consumed by all ranks together), saved in every checkpoint.
At each micro-step the world takes the next batch_size * world_size windows and rank r reads its
own batch_size of them, so N ranks x B see exactly what 1 rank x N*B would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from src.data.shards import open_shard
from src.errors import SLMError


class TokenStream:
    """Shards concatenated into one read-only token array."""

    def __init__(self, paths: list[Path], tokenizer_id: str):
        self.shards = [open_shard(p, tokenizer_id) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries where needed."""
        out, pos = [], start
        while length > 0:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            lo = pos - int(self.offsets[i])
            take = min(length, len(self.shards[i]) - lo)
            out.append(self.shards[i][lo : lo + take])
            pos, length = pos + take, length - take
        return out[0] if len(out) == 1 else np.concatenate(out)


def _masked(buf: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a (B, T + 1) window; targets where mask is 0 become -1 (no loss: chat data)."""
    x, y = buf[:, :-1], buf[:, 1:]
    if mask is not None:
        y = y.masked_fill(mask[:, 1:] == 0, -1)
    return x, y


class BatchLoader:
    def __init__(self, paths, tokenizer_id, seq_len, batch_size, seed, rank=0, world_size=1,
                 masks=None):
        self.stream = TokenStream(paths, tokenizer_id)
        self.masks = TokenStream(masks, tokenizer_id) if masks else None
        self.T, self.B, self.seed = seq_len, batch_size, seed
        self.rank, self.world = rank, world_size
        self.n_windows = (self.stream.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise SLMError(
                f"the training data has {self.stream.n_tokens} tokens, fewer than one sequence "
                f"of {seq_len + 1}; add text or lower training.seq_len / model.block_size"
            )
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _window(self, k: int) -> int:
        epoch, i = divmod(k, self.n_windows)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        return int(self._perm[i])

    def next_batch(self, device="cpu"):
        """(x, y) of shape (B, T) for this rank; advances the shared position."""
        first = self.position + self.rank * self.B
        starts = [self._window(k) * self.T for k in range(first, first + self.B)]
        self.position += self.B * self.world
        buf = torch.from_numpy(np.stack([self.stream.read(s, self.T + 1) for s in starts])
                               .astype(np.int64))
        if self.masks is not None:
            m = np.stack([self.masks.read(s, self.T + 1) for s in starts]).astype(np.int64)
            buf = torch.cat([buf, torch.from_numpy(m)])  # one transfer for both
        if device != "cpu" and torch.device(device).type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device != "cpu":
            buf = buf.to(device)
        if self.masks is not None:
            return _masked(buf[: self.B], buf[self.B :])
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, s: dict) -> None:
        same_seed = s.get("seed", self.seed) == self.seed
        if s.get("n_windows") not in (None, self.n_windows) or not same_seed:
            raise SLMError(
                "the checkpoint was trained on different data (another dataset, seq_len or seed); "
                "resume with the same data config, or start over with --resume never"
            )
        self.position = int(s["position"])


def val_batches(paths, tokenizer_id, seq_len, batch_size, max_tokens, rank=0, world_size=1,
                masks=None):
    """Fixed validation windows (the first max_tokens of the split), this rank's share; with
    masks (chat data) only the assistant's tokens are scored."""
    stream = TokenStream(paths, tokenizer_id)
    ms = TokenStream(masks, tokenizer_id) if masks else None
    n = min((stream.n_tokens - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:  # a short split: one window of what there is
        t = torch.from_numpy(stream.read(0, stream.n_tokens).astype(np.int64)[None])
        m = ms and torch.from_numpy(ms.read(0, stream.n_tokens).astype(np.int64)[None])
        yield _masked(t, m)
        return
    mine = list(range(rank, n, world_size))
    for i in range(0, len(mine), batch_size):
        ks = mine[i : i + batch_size]
        buf = torch.from_numpy(np.stack([stream.read(k * seq_len, seq_len + 1) for k in ks])
                               .astype(np.int64))
        m = ms and torch.from_numpy(np.stack([ms.read(k * seq_len, seq_len + 1) for k in ks])
                                    .astype(np.int64))
        yield _masked(buf, m)
