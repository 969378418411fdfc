"""Tokenizers round-trip; datasets are cached, reused, and rebuilt when their source changes."""

from __future__ import annotations

import pytest

from src.data import tokenizer as toklib
from src.data.prepare import prepare

TEXT = "def f(x):\n    return x * 2  # naïve — ünïcode ✓\n"


@pytest.mark.parametrize("kind", ["bpe", "bytes", "char"])
def test_round_trip_and_reload(kind, tmp_path):
    if kind == "bpe":
        tok = toklib.BPETokenizer.train([TEXT * 50, "class A:\n    pass\n" * 20], 300)
    elif kind == "char":
        tok = toklib.CharTokenizer.train([TEXT])
    else:
        tok = toklib.ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert max(ids) < tok.vocab_size and tok.eot_id < tok.vocab_size
    assert sum(tok.token_bytes()[i] for i in ids) == len(TEXT.encode())  # bits-per-byte basis
    tok.save(tmp_path / "t.json")
    again = toklib.load(tmp_path / "t.json")
    assert again.id == tok.id and again.encode(TEXT) == ids


def test_gpt2_tokenizer_works_or_says_why():
    try:
        tok = toklib.GPT2Tokenizer()
    except Exception as e:  # offline: a clear message, not a library traceback
        assert "GPT-2's tokenizer files could not be loaded" in str(e)
        assert "data.tokenizer: bpe" in str(e)
        return
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.vocab_size == 50257


def test_dataset_is_cached_and_rebuilt_when_source_changes(fast_cfg, tmp_path):
    src = tmp_path / "text"
    src.mkdir()
    for i in range(30):
        (src / f"doc{i}.txt").write_text(f"document {i}\n" + TEXT * (i + 1))
    cfg = fast_cfg(**{"data.source": str(src), "data.vocab_size": 300})
    logs = []
    first = prepare(cfg, tmp_path / "root", log=logs.append)
    assert any("preparing" in m for m in logs)
    assert first.manifest["train"]["tokens"] > 0 and first.manifest["val"]["tokens"] > 0
    assert (first.dir / "tokenizer.json").is_file()

    logs.clear()
    again = prepare(cfg, tmp_path / "root", log=logs.append)
    assert again.dir == first.dir and not logs  # reused, nothing redone

    (src / "doc3.txt").write_text("changed text\n" * 40)
    logs.clear()
    changed = prepare(cfg, tmp_path / "root", log=logs.append)
    assert changed.dir != first.dir and any("preparing" in m for m in logs)

    other_tok = prepare(fast_cfg(**{"data.source": str(src), "data.tokenizer": "bytes"}),
                        tmp_path / "root", log=lambda *a: None)
    assert other_tok.dir not in (first.dir, changed.dir) and other_tok.tokenizer.kind == "bytes"


def test_single_document_source_gets_a_validation_tail(fast_cfg, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(2000)))
    ds = prepare(fast_cfg(**{"data.source": str(f), "data.tokenizer": "char"}), tmp_path / "r",
                 log=lambda *a: None)
    text_val = ds.tokenizer.decode(__import__("numpy").fromfile(ds.val[0], dtype="<u2", offset=256))
    assert text_val.startswith("line 19") and "line 1999" in text_val  # the last 5%, at a line
