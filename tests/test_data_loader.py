"""Reading shards: corrupt or foreign shards refused by name; rank slices; boundaries; resume."""

from __future__ import annotations

import numpy as np
import pytest

from src.data.loader import BatchLoader, TokenStream, val_batches
from src.data.prepare import prepare
from src.data.shards import HEADER_BYTES, open_shard, write_shard
from src.errors import SLMError

TID = "f" * 32


def _shards(tmp_path, sizes, dtype=np.uint16):
    """Shards holding 0, 1, 2, ... consecutively, so any read can be checked by value."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        p = tmp_path / f"train_{i:05d}.bin"
        write_shard(p, np.arange(start, start + n, dtype=dtype), TID)
        paths.append(p)
        start += n
    return paths


def test_truncated_foreign_and_mismatched_shards_are_refused_by_name(tmp_path):
    (good,) = _shards(tmp_path, [5000])
    raw = good.read_bytes()

    short = tmp_path / "short.bin"
    short.write_bytes(raw[:-10])  # the last tokens missing
    with pytest.raises(SLMError, match=r"short\.bin.*truncated"):
        open_shard(short, TID)

    stub = tmp_path / "stub.bin"
    stub.write_bytes(raw[:100])  # shorter than a header
    with pytest.raises(SLMError, match=r"stub\.bin.*bad header"):
        open_shard(stub)

    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04" + raw[4:])  # some other file format
    with pytest.raises(SLMError, match=r"foreign\.bin.*not an slm token shard"):
        open_shard(foreign)

    with pytest.raises(SLMError, match=r"train_00000\.bin.*another tokenizer"):
        BatchLoader([good], "0" * 32, seq_len=16, batch_size=2, seed=0)


def test_training_start_refuses_a_truncated_shard_of_a_prepared_dataset(fast_cfg, tmp_path):
    cfg = fast_cfg(data__tokenizer="char", data__shard_tokens=200_000)
    ds = prepare(cfg, tmp_path, progress=False)
    victim = ds.train[1]
    with open(victim, "r+b") as f:
        f.truncate(HEADER_BYTES + 1000)
    with pytest.raises(SLMError, match=victim.name):
        prepare(cfg, tmp_path, progress=False)  # what training calls before its first step


def test_reads_cross_shard_boundaries(tmp_path):
    s = TokenStream(_shards(tmp_path, [100, 7, 300]), TID)
    assert s.n_tokens == 407
    assert s.read(95, 20).tolist() == list(range(95, 115))  # spans all three shards
    assert s.read(0, 407).tolist() == list(range(407))


def test_ranks_read_disjoint_slices_that_add_up_to_one_rank(tmp_path):
    paths = _shards(tmp_path, [3000, 1000, 2000])
    T, B, world = 16, 4, 2
    ranks = [BatchLoader(paths, TID, T, B, seed=7, rank=r, world_size=world) for r in range(world)]
    single = BatchLoader(paths, TID, T, B * world, seed=7)
    seen = set()
    for _ in range(20):
        xs = [loader.next_batch()[0] for loader in ranks]
        starts = [set(x[:, 0].tolist()) for x in xs]  # token value = position: a window's start
        assert not starts[0] & starts[1]
        assert not seen & (starts[0] | starts[1])
        seen |= starts[0] | starts[1]
        x1, _ = single.next_batch()
        assert np.array_equal(np.concatenate([x.numpy() for x in xs]), x1.numpy())
    assert all(loader.position == single.position for loader in ranks)


def test_position_save_and_restore_is_exact(tmp_path):
    paths = _shards(tmp_path, [4000, 4000])
    a = BatchLoader(paths, TID, 32, 3, seed=1)
    for _ in range(90):  # past the end of an epoch (250 windows), into a reshuffled one
        a.next_batch()
    b = BatchLoader(paths, TID, 32, 3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    other = BatchLoader(paths, TID, 16, 3, seed=1)
    with pytest.raises(SLMError, match="different data"):
        other.load_state_dict(a.state_dict())


def test_uint32_shards_read_back(tmp_path):
    paths = _shards(tmp_path, [70_000, 10], dtype=np.uint32)
    s = TokenStream(paths, TID)
    assert s.read(69_990, 20).tolist() == list(range(69_990, 70_010))
    (x, y), = list(val_batches(paths, TID, seq_len=8, batch_size=1, max_tokens=8))
    assert x.tolist() == [list(range(8))] and y.tolist() == [list(range(1, 9))]
