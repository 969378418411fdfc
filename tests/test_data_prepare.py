"""Preparation: resumes after SIGKILL to the same bytes; never redone; partitioned API; dtypes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from src.data.prepare import PIECE_CHARS, dataset_dir, finalize, plan, prepare, prepare_part
from src.data.shards import open_shard, read_header
from src.training.config import load_config


def _tokens(paths, tok_id) -> np.ndarray:
    return np.concatenate([np.asarray(open_shard(p, tok_id)) for p in paths])


def _docs(ds, split) -> list[str]:
    """A split's documents, decoded and cut at the end-of-text tokens."""
    toks = _tokens(getattr(ds, split), ds.tokenizer.id)
    ends = np.flatnonzero(toks == ds.tokenizer.eot_id)
    assert len(ends) and ends[-1] == len(toks) - 1, "every document ends with end-of-text"
    return [ds.tokenizer.decode(x) for x in np.split(toks, ends + 1)[:-1]]


def _bins(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("datasets/*/*.bin"))}


def test_killed_preparation_resumes_after_its_last_shard_to_the_same_bytes(corpus, tmp_path):
    over = [f"data.source={corpus}", "data.vocab_size=512", "data.shard_tokens=2048"]
    ref_cfg = load_config(ROOT / "configs" / "tiny.yaml", over + ["data.num_workers=1"])
    prepare(ref_cfg, tmp_path / "a", progress=False, log=lambda *a: None)  # never interrupted

    root = tmp_path / "b"
    args = ["prepare", "--config", ROOT / "configs" / "tiny.yaml", "--data-root", root,
            "--workers", "2", "--no-progress", *(f"--{o}" for o in over)]
    proc = subprocess.Popen([sys.executable, "-m", "src", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline = None, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list(root.glob("datasets/*/part_0000.progress.json"))
        if found and len(json.loads(found[0].read_text())["train"]["shards"]) >= 3:
            progress = found[0]
            break
        time.sleep(0.02)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress is not None, "the preparation ended before it could be interrupted"
    out = progress.parent
    assert not (out / "manifest.json").exists()
    done = json.loads(progress.read_text())["train"]["shards"]
    before = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in done}
    if sys.platform.startswith("linux"):  # tokenizer processes never outlive a killed parent
        assert len(workers) == 2
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(c) for c in workers):
            time.sleep(0.05)
        assert not [c for c in workers if _alive(c)], "worker processes outlived the preparation"

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after its {len(done)} complete shard(s)" in resumed.stdout
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before  # not rewritten
    a, b = _bins(tmp_path / "a"), _bins(root)
    assert len(a) > 10 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), "resumed shards differ from an uninterrupted run"
    ma, mb = (json.loads(next(r.glob("datasets/*/manifest.json")).read_text())
              for r in (tmp_path / "a", root))
    assert ma["shards"] == mb["shards"] and ma["train"] == mb["train"]


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _children(pid: int) -> set[int]:
    if not Path("/proc").is_dir():
        return set()
    kids = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return {k for k in kids if (st := _stat(k)) and int(st[1]) == pid}


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return bool(st) and st[0] not in ("Z", "X")  # a zombie has exited


def test_a_finished_preparation_is_reused_until_its_inputs_change(fast_cfg, corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(corpus.glob("*.txt"))[:25]:
        (src / p.name).write_text(p.read_text())
    cfg = fast_cfg(data__source=str(src), data__tokenizer="char")
    ds = prepare(cfg, tmp_path / "root", progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in ds.dir.iterdir()}
    assert plan(cfg, tmp_path / "root") == []
    again = prepare(cfg, tmp_path / "root", log=lambda *a: pytest.fail(f"redone: {a}"))
    assert again.dir == ds.dir
    assert {p: p.stat().st_mtime_ns for p in ds.dir.iterdir()} == stamp

    first = sorted(src.glob("*.txt"))[0]
    first.write_text(first.read_text() + "\nextra = 1\n")  # an input changed: a fresh build
    changed = prepare(cfg, tmp_path / "root", progress=False)
    assert changed.dir != ds.dir
    assert changed.manifest["train"]["chars"] + changed.manifest["val"]["chars"] == (
        ds.manifest["train"]["chars"] + ds.manifest["val"]["chars"] + len("\nextra = 1\n"))


def test_plan_parts_and_finalize_give_what_prepare_gives(fast_cfg, corpus, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet", row_group_size=12)
    cfg = fast_cfg(data__source=str(tmp_path / "c.parquet"), data__shard_tokens=50_000,
                   data__num_workers=2, data__tokenizer="char")

    parts = plan(cfg, tmp_path / "fan", log=lambda *a: None)
    assert len(parts) == 5  # one per Parquet row group here
    parts = json.loads(json.dumps(parts))  # what travels to other containers
    results = [prepare_part(cfg, tmp_path / "fan", p, log=lambda *a: None) for p in parts[::-1]]
    assert prepare_part(cfg, tmp_path / "fan", parts[2], log=lambda *a: None) == results[-3]
    ds = finalize(cfg, tmp_path / "fan", results, log=lambda *a: None)
    assert plan(cfg, tmp_path / "fan") == []
    assert ds.manifest["parts"] == 5
    assert sum(read_header(p)["n_tokens"] for p in ds.train + ds.val) == (
        ds.manifest["train"]["tokens"] + ds.manifest["val"]["tokens"])

    prepare(cfg, tmp_path / "local", progress=False, log=lambda *a: None)
    assert _bins(tmp_path / "fan") == _bins(tmp_path / "local")
    assert sorted(_docs(ds, "train") + _docs(ds, "val")) == sorted(docs)


def test_finalize_names_a_missing_part(fast_cfg, corpus, tmp_path):
    cfg = fast_cfg(data__tokenizer="char")
    parts = plan(cfg, tmp_path, log=lambda *a: None)
    from src.errors import SLMError

    with pytest.raises(SLMError, match="part 0 is not tokenized yet"):
        finalize(cfg, tmp_path, [])
    res = [prepare_part(cfg, tmp_path, p, log=lambda *a: None) for p in parts]
    assert finalize(cfg, tmp_path, res).manifest["train"]["tokens"] > 0


def test_few_documents_hold_out_each_tail_and_long_ones_come_back_exactly(fast_cfg, corpus,
                                                                         tmp_path):
    import bz2
    import gzip
    import lzma

    text = "".join(p.read_text() for p in sorted(corpus.glob("*.txt")))[: 3 * PIECE_CHARS + 777]
    (tmp_path / "big.txt").write_text(text)
    variants = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    for ext, opener in variants.items():
        with opener(tmp_path / f"big.txt.{ext}", "wt", encoding="utf-8") as f:
            f.write(text)
    shards = []
    for name in ["big.txt"] + [f"big.txt.{e}" for e in variants]:
        cfg = fast_cfg(data__source=str(tmp_path / name), data__tokenizer="char",
                       data__shard_tokens=100_000)
        ds = prepare(cfg, tmp_path / "root", progress=False, log=lambda *a: None)
        (train,), (val,) = _docs(ds, "train"), _docs(ds, "val")  # one document: split by its tail
        assert train + val == text
        assert val and text[len(train) - 1] == "\n" and 0.04 < len(val) / len(text) < 0.06
        shards.append([p.read_bytes() for p in ds.train + ds.val])
    assert all(s == shards[0] for s in shards)  # compressed files give the same tokens


def test_vocab_above_65535_switches_shards_to_uint32(fast_cfg, tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20_000)]
    chars += [chr(c) for c in range(0x20000, 0x20000 + 50_000)]  # CJK extension B
    d = tmp_path / "wide"
    d.mkdir()
    for i in range(30):
        (d / f"{i:02d}.txt").write_text("".join(chars[i::30]) + "\n")
    cfg = fast_cfg(data__source=str(d), data__tokenizer="char")
    ds = prepare(cfg, tmp_path / "root", progress=False, log=lambda *a: None)
    assert ds.tokenizer.vocab_size > 65_536 and ds.manifest["dtype"] == "uint32"
    assert {read_header(p)["itemsize"] for p in ds.train + ds.val} == {4}
    assert int(_tokens(ds.train + ds.val, ds.tokenizer.id).max()) > 65_535
    assert sorted(_docs(ds, "train") + _docs(ds, "val")) == sorted(
        p.read_text() for p in d.iterdir())

    from src.data.tokenizer import CharTokenizer

    assert CharTokenizer("x" * 65_535).dtype == np.uint16  # 65,536 ids: 0..65,535 fit
    assert CharTokenizer("x" * 65_536).dtype == np.uint32


def test_val_source_and_manifest_records(fast_cfg, corpus, tmp_path):
    files = sorted(corpus.glob("*.txt"))
    cfg = fast_cfg(data__tokenizer="char", data__val_source=str(files[0]))
    ds = prepare(cfg, tmp_path, progress=False, log=lambda *a: None)
    m = ds.manifest
    assert _docs(ds, "val") == [files[0].read_text()]
    assert len(_docs(ds, "train")) == len(files)
    assert m["source"]["kind"] == "local" and m["val_source"]["kind"] == "local"
    assert m["tokenizer"]["id"] == ds.tokenizer.id and (ds.dir / "tokenizer.json").is_file()
    assert [s["file"] for s in m["shards"]] == [p.name for p in ds.train + ds.val]
    assert all(read_header(ds.dir / s["file"])["n_tokens"] == s["tokens"] for s in m["shards"])
    assert ds.dir == dataset_dir(cfg.data, tmp_path)


def test_progress_bar_shows_documents_tokens_and_rate(fast_cfg, tmp_path, capsys):
    prepare(fast_cfg(data__tokenizer="char", data__num_workers=2), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "docs" in err and "tokens" in err and "B/s" in err


def test_workers_count_does_not_change_the_shards(fast_cfg, corpus, tmp_path):
    outs = []
    for n in (1, 3):
        cfg = fast_cfg(data__tokenizer="char", data__shard_tokens=100_000, data__num_workers=n)
        ds = prepare(cfg, tmp_path / str(n), progress=False, log=lambda *a: None)
        outs.append([p.read_bytes() for p in ds.train + ds.val])
    assert outs[0] == outs[1]
