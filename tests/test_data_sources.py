"""Sources: local Parquet/JSON lines through `datasets`, hub layout, URL cache, offline failures."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import ROOT, run_cli

from src.data import sources
from src.data.prepare import plan, prepare
from src.data.shards import open_shard
from src.errors import SLMError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
QUIET = {"progress": False, "log": lambda *a: None}


def _docs(ds, split) -> list[str]:
    toks = np.concatenate([np.asarray(open_shard(p, ds.tokenizer.id)) for p in getattr(ds, split)])
    ends = np.flatnonzero(toks == ds.tokenizer.eot_id)
    return [ds.tokenizer.decode(x) for x in np.split(toks, ends + 1)[:-1]]


@pytest.fixture
def texts(corpus) -> list[str]:
    return [p.read_text() for p in sorted(corpus.glob("*.txt"))]


def test_parquet_jsonl_and_text_in_one_folder_go_through_datasets(fast_cfg, texts, tmp_path):
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:30], "n": list(range(30))}), d / "a.parquet",
                   row_group_size=10)
    with gzip.open(d / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts[30:50]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
    for i, t in enumerate(texts[50:]):
        (d / f"c{i}.txt").write_text(t)
    (d / "notes.csv").write_text("ignored,file\n")

    cfg = fast_cfg(data__source=str(d))  # the default: a byte-level BPE trained on the corpus
    parts = plan(cfg, tmp_path / "root", log=lambda *a: None)
    units = [p["unit"] for p in parts]
    assert [u.get("builder", u["kind"]) for u in units] == ["text", "json"] + ["parquet"] * 3
    ds = prepare(cfg, tmp_path / "root", **QUIET)
    assert ds.tokenizer.kind == "bpe" and ds.manifest["dtype"] == "uint16"
    assert sorted(_docs(ds, "train") + _docs(ds, "val")) == sorted(texts)
    assert ds.manifest["train"]["documents"] + ds.manifest["val"]["documents"] == len(texts)


def test_text_field_is_read_and_a_missing_one_is_named(fast_cfg, texts, tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts[:25]))
    cfg = fast_cfg(data__source=str(f), data__tokenizer="char", data__text_field="content")
    ds = prepare(cfg, tmp_path / "root", **QUIET)
    assert sorted(_docs(ds, "train") + _docs(ds, "val")) == sorted(texts[:25])

    pq.write_table(pa.table({"body": texts[:25]}), tmp_path / "rows.parquet")
    for name in ("rows.jsonl", "rows.parquet"):
        cfg = fast_cfg(data__source=str(tmp_path / name), data__tokenizer="char")
        with pytest.raises(SLMError, match=rf"{name}.*no 'text'.*(content|body).*data.text_field"):
            prepare(cfg, tmp_path / "root", **QUIET)


def test_hub_dataset_layout_picks_splits(fast_cfg, texts, tmp_path):
    """hf:<folder> is the hub code path on a downloaded dataset repo (no network needed)."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:20]}), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": texts[20:40]}), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": texts[40:45]}),
                   repo / "data" / "validation-00000-of-00001.parquet")
    cfg = fast_cfg(data__source=f"hf:{repo}", data__val_source=f"hf:{repo}",
                   data__tokenizer="char")
    ds = prepare(cfg, tmp_path / "root", **QUIET)
    assert _docs(ds, "train") == texts[:40]
    assert _docs(ds, "val") == texts[40:45]
    src = ds.manifest["source"]
    assert (src["kind"], src["split"], src["format"]) == ("hub", "train", "parquet")
    assert src["files"] == 2
    assert ds.manifest["val_source"]["split"] == "validation"

    with pytest.raises(SLMError, match=r"no split 'nope' \(splits: train, validation\)"):
        prepare(fast_cfg(data__source=f"hf:{repo}", data__split="nope"), tmp_path / "r2", **QUIET)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www, counting requests."""
    www = tmp_path / "www"
    www.mkdir()
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield www, f"http://127.0.0.1:{srv.server_port}", hits
    srv.shutdown()


def test_url_is_downloaded_once_and_its_checksum_recorded(fast_cfg, texts, tmp_path, server):
    www, base, hits = server
    with gzip.open(www / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in texts[:30]:
            f.write(json.dumps({"text": t}) + "\n")
    url = f"{base}/docs.jsonl.gz"
    ds = prepare(fast_cfg(data__source=url, data__tokenizer="char"), tmp_path / "root", **QUIET)
    src = ds.manifest["source"]
    assert src["kind"] == "url" and src["url"] == url
    assert src["sha256"] == hashlib.sha256((www / "docs.jsonl.gz").read_bytes()).hexdigest()
    assert sorted(_docs(ds, "train") + _docs(ds, "val")) == sorted(texts[:30])
    assert len(list((tmp_path / "root" / "datasets" / "downloads").glob("*docs.jsonl.gz"))) == 1

    other = fast_cfg(data__source=url, data__tokenizer="char", data__shard_tokens=10_000)
    prepare(other, tmp_path / "root", **QUIET)  # a new dataset from the same download
    assert hits == ["/docs.jsonl.gz"]

    with pytest.raises(SLMError, match=r"missing\.txt: the server answered 404"):
        prepare(fast_cfg(data__source=f"{base}/missing.txt"), tmp_path / "root", **QUIET)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline(exc) -> None:
    msg = str(exc.value)
    assert "needs the network" in msg and "point data.source at local files" in msg


def test_hub_and_url_sources_fail_at_once_offline(fast_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SLMError) as e:
        prepare(fast_cfg(data__source="fineweb-edu-10b"), tmp_path, **QUIET)
    _offline(e)
    pin = sources.PRESETS["fineweb-edu-10b"]
    assert f"hf:HuggingFaceFW/fineweb-edu@{pin.revision}" in str(e.value)
    assert f"hf download HuggingFaceFW/fineweb-edu --repo-type dataset --revision {pin.revision}" \
        in str(e.value)

    monkeypatch.delenv("HF_HUB_OFFLINE")  # no flag: the hub server itself does not answer
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SLMError) as e:
        sources.resolve("hf:roneneldan/TinyStories", tmp_path)
    _offline(e)

    with pytest.raises(SLMError) as e:
        sources.resolve(f"http://127.0.0.1:{_closed_port()}/input.txt", tmp_path)
    _offline(e)
    assert not (tmp_path / "datasets" / "downloads").exists() or not any(
        (tmp_path / "datasets" / "downloads").iterdir())


def test_cli_preset_offline_is_a_clear_error(tmp_path):
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every connection goes through a dead proxy
    r = run_cli("prepare", "--config", ROOT / "configs" / "tiny.yaml", "--data-root", tmp_path,
                "--data.source", "tinyshakespeare", timeout=60,
                env={"https_proxy": proxy, "HTTPS_PROXY": proxy, "NO_PROXY": "", "no_proxy": ""})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "raw.githubusercontent.com" in r.stderr or "127.0.0.1" in r.stderr
    assert "needs the network" in r.stderr and "--data.source" in r.stderr


def test_presets_name_their_sources():
    stories = sources.PRESETS["tinystories"]
    assert sources.expand("tinystories") == f"hf:roneneldan/TinyStories@{stories.revision}"
    assert sources.expand("fineweb-edu-10b").startswith("hf:HuggingFaceFW/fineweb-edu@")
    assert sources.expand("openwebtext").startswith("hf:Skylion007/openwebtext@")
    assert sources.expand("tinyshakespeare").endswith("/tinyshakespeare/input.txt")
    assert sources.fingerprint("tinystories") == sources.fingerprint(sources.expand("tinystories"))
    assert sources.fingerprint("tinystories") != sources.fingerprint("hf:roneneldan/TinyStories")


def test_every_preset_resolves_to_pinned_parquet_files_or_a_checked_file(tmp_path, monkeypatch):
    """No preset depends on a loading script or on what a repo's main branch holds today."""
    monkeypatch.setattr(sources, "require_hub", lambda *a, **k: None)  # resolve without a network
    hex40 = "[0-9a-f]{40}"
    for name, preset in sources.PRESETS.items():
        if isinstance(preset, sources.UrlPreset):
            assert re.search(f"/{hex40}/", preset.url), f"{name}: the URL names no commit"
            assert re.fullmatch("[0-9a-f]{64}", preset.sha256), name
            continue
        assert isinstance(preset, sources.HubPreset), f"{name}: not pinned"
        for split in preset.splits:
            groups, info = sources.resolve(name, tmp_path, split=split)
            assert info["revision"] == preset.revision and re.fullmatch(hex40, info["revision"])
            assert [g["builder"] for g in groups] == ["parquet"], name
            pattern = f"hf://datasets/{re.escape(preset.repo)}@{preset.revision}/.+\\.parquet"
            assert groups[0]["files"] and all(re.fullmatch(pattern, f) for f in groups[0]["files"])
            assert info["data_files"] == list(preset.splits[split])
        assert "train" in preset.splits, name
    with pytest.raises(SLMError, match=r"fineweb-edu-10b: no split 'validation' \(splits: train\)"):
        sources.resolve("fineweb-edu-10b", tmp_path, split="validation")


def test_a_hub_preset_is_read_from_its_pinned_parquet_files(fast_cfg, texts, tmp_path,
                                                            monkeypatch):
    """The real preset path (datasets' parquet reader over the named files), on local copies."""
    pin = sources.PRESETS["tinystories"]
    mirror = tmp_path / "mirror"
    monkeypatch.setattr(sources, "hub_file",
                        lambda repo, rev, path: str(mirror / repo / rev / path))
    chunks = {"train": [texts[0:10], texts[10:20], texts[20:30], texts[30:40]],
              "validation": [texts[40:45]]}
    for split, files in pin.splits.items():
        for path, docs in zip(files, chunks[split], strict=True):
            f = mirror / pin.repo / pin.revision / path
            f.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), f)
    cfg = fast_cfg(data__source="tinystories", data__val_source="tinystories",
                   data__tokenizer="char")
    ds = prepare(cfg, tmp_path / "root", **QUIET)
    assert _docs(ds, "train") == texts[:40]
    assert _docs(ds, "val") == texts[40:45]
    src, val = ds.manifest["source"], ds.manifest["val_source"]
    assert (src["kind"], src["format"], src["revision"]) == ("hub", "parquet", pin.revision)
    assert src["data_files"] == list(pin.splits["train"]) and src["repo"] == "roneneldan/TinyStories"
    assert (val["split"], val["data_files"]) == ("validation", list(pin.splits["validation"]))


def test_a_pinned_download_with_other_content_is_refused(fast_cfg, texts, tmp_path, server,
                                                         monkeypatch):
    www, base, hits = server
    (www / "input.txt").write_text("".join(texts[:20]))
    good = hashlib.sha256((www / "input.txt").read_bytes()).hexdigest()
    cfg = fast_cfg(data__source="tinyshakespeare", data__tokenizer="char")
    monkeypatch.setitem(sources.PRESETS, "tinyshakespeare",
                        sources.UrlPreset(f"{base}/input.txt", sha256="0" * 64))
    with pytest.raises(SLMError, match=f"SHA-256 is {good}, not the pinned 0{{64}}"):
        prepare(cfg, tmp_path / "root", **QUIET)
    assert not list((tmp_path / "root" / "datasets" / "downloads").glob("*input.txt*"))

    monkeypatch.setitem(sources.PRESETS, "tinyshakespeare",
                        sources.UrlPreset(f"{base}/input.txt", sha256=good))
    ds = prepare(cfg, tmp_path / "root", **QUIET)
    assert ds.manifest["source"]["sha256"] == good and len(hits) == 2
