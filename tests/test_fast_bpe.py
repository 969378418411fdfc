"""Byte-level BPE encoded through tiktoken gives exactly the ids `tokenizers` gives for the same
vocabulary; where it might not, slm stays on `tokenizers` or falls back per text and counts it."""

from __future__ import annotations

import json
import random
import zlib

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from src.data import sources
from src.data import tokenizer as toklib
from src.data.prepare import prepare
from src.data.workers import encode as worker_encode
from src.errors import SLMError

EOT = toklib.EOT
HOSTILE = [
    "def f(x):\r\n\treturn x  *  2\r\n",
    "tabs\t\tand\t \t mixed \t\n\t\n",
    "spaces" + " " * 300 + "end" + " " * 17 + "\n" + " " * 64,
    "trailing spaces   ",
    "trailing newlines\n\n\n",
    "\n\n\n   \n\t  \r\n \r\n\r\n",
    "naïve café façade — “quotes” ‘single’ …",
    "emoji 😀😃 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷🇩🇪",
    "Ελληνικά русский 日本語のテキスト 한국어 العربية עברית हिन्दी ไทย",
    "mixedΑΒΓabcАБВ123٤٥٦Ⅻⅻ½²³",
    "it's we'll I'M you'RE they've 's 't 'd 'll ''s",
    "numbers 1234567890 12.5e-3 0x1F 1_000_000 ١٢٣٤ ۱۲۳",
    "nbsp\u00a0ideographic\u3000line\u2028para\u2029zw\u200bj\u200dnj\u200c bom\ufeff",
    "combining e\u0301 a\u0308 n\u0303 z\u0336\u0336",
    "controls \x00\x01\x1f\x7f\x85 end",
    "literal <|endoftext|> in text <|endoftext|>",
    "lone surrogate \ud800 and \udfff pair \ud83d\ude00",
    "",
    " ",
    "a",
]


def reference(tok: toklib.BPETokenizer) -> HFTokenizer:
    """`tokenizers` itself, loaded from the tokenizer's record, "<|endoftext|>" as text."""
    hf = HFTokenizer.from_str(tok.to_dict()["json"])
    hf.encode_special_tokens = True
    return hf


def ref_ids(hf: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch([toklib.clean(t) for t in texts],
                                           add_special_tokens=False)]


@pytest.fixture(scope="module")
def stdlib_docs():
    docs = list(sources.iter_documents(sources.EMBEDDED))
    return docs[::8], docs[3::8]  # (train on these, compare on those): ~1.5 MB each


@pytest.fixture(scope="module")
def stdlib_bpe(stdlib_docs):
    return toklib.BPETokenizer.train(stdlib_docs[0], 2048)


def test_same_ids_as_tokenizers_on_the_embedded_corpus(stdlib_bpe, stdlib_docs):
    texts = stdlib_docs[1]
    assert stdlib_bpe.engine == "tiktoken"
    got = stdlib_bpe.encode_serial(texts)
    assert sum(map(len, got)) > 100_000
    assert got == ref_ids(reference(stdlib_bpe), texts)
    assert stdlib_bpe.encode_batch(texts[:20]) == got[:20]


@pytest.mark.parametrize("vocab", [300, 1024])
def test_same_ids_as_tokenizers_on_hostile_text(stdlib_bpe, vocab):
    rng = random.Random(vocab)
    words = HOSTILE + ["".join(rng.choice(HOSTILE)[rng.randrange(5):][:9] for _ in range(4))
                       for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(200)]
    trained_on_it = toklib.BPETokenizer.train(map(toklib.clean, corpus), vocab)
    for tok in (trained_on_it, stdlib_bpe):
        assert tok.engine == "tiktoken"
        hf = reference(tok)
        texts = HOSTILE + corpus[:50]
        assert tok.encode_serial(texts) == ref_ids(hf, texts)
        assert [tok.encode(t) for t in HOSTILE] == ref_ids(hf, HOSTILE)
        for t in HOSTILE:
            assert tok.decode(tok.encode(t)) == toklib.clean(t)


def _pieces_agree(codepoints: list[int], pattern: str = toklib.GPT2_SPLIT) -> bool:
    """Whether tiktoken (GPT2_SPLIT) cuts text into the same pieces as tokenizers' ByteLevel
    pre-tokenizer, for each code point in a few contexts. tiktoken's pieces are made visible by a
    vocabulary holding tokenizers' pieces and each two neighbours joined: any other cut shows."""
    import tiktoken

    u2b = {u: b for b, u in toklib.bytes_to_unicode().items()}
    ctx = "a{c}a {c}b 1{c}1  {c}{c} !{c}!\t{c}\n'{c}'s  {c}{c}  x"
    text = "|".join(ctx.format(c=chr(cp)) for cp in codepoints)
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = [bytes(u2b[ch] for ch in p) for p, _ in pre.pre_tokenize_str(text)]
    vocab = {bytes([b]) for b in range(256)} | set(pieces)
    vocab |= {a + b for a, b in zip(pieces, pieces[1:])}
    ranks = {t: i for i, t in enumerate(sorted(vocab, key=lambda t: (len(t), t)))}
    enc = tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={})
    return [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)] == pieces


def test_tiktoken_cuts_text_into_the_same_pieces_as_tokenizers():
    spaces = [0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200E), 0x2028,
              0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x180E]
    odd = [*range(0x300, 0x370), *range(0x2160, 0x2189), 0xB2, 0xB3, 0xB9, 0xBD, 0x2070, 0x2460,
           *range(0x1F3FB, 0x1F400), 0xFE0F, 0x200D, 0x10FFFF, 0xE000, 0xFFFD]
    sample = [*range(0x250), *spaces, *odd, *(c for c in range(0x250, 0x110000, 251)
                                                  if not 0xD800 <= c < 0xE000)]
    assert _pieces_agree(sample)
    # the probe sees a cut that differs: a pattern without Unicode letters fails it
    ascii_letters = toklib.GPT2_SPLIT.replace(r"\p{L}++", "[a-zA-Z]++").replace(
        r"[^\s\p{L}", r"[^\sa-zA-Z")
    assert ascii_letters != toklib.GPT2_SPLIT and _pieces_agree([0x61, 0x7A], ascii_letters)
    assert not _pieces_agree([0xE9], ascii_letters) and not _pieces_agree([0x416], ascii_letters)


def _toy_bpe(merges: list[tuple[str, str]]) -> HFTokenizer:
    """A byte-level BPE written by hand: the 256 bytes, end-of-text, then these merges."""
    b2u = toklib.bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)} | {EOT: 256}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return hf


def test_a_vocabulary_tiktoken_would_merge_differently_stays_on_tokenizers():
    import tiktoken

    # "jz" is merged before "qj", and "qjz" is made from "qj" + "z": on "qjz", tokenizers stops at
    # [q, jz] (no merge joins them) while tiktoken joins q + jz, since "qjz" is in the vocabulary
    hf = _toy_bpe([("j", "z"), ("q", "j"), ("qj", "z")])
    assert [t.value for t in hf.model.tokenize("qjz")] == ["q", "jz"]
    ranks = {bytes([b]): b for b in range(256)} | {b"jz": 257, b"qj": 258, b"qjz": 259}
    raw = tiktoken.Encoding("raw", pat_str=toklib.GPT2_SPLIT, mergeable_ranks=ranks,
                            special_tokens={})
    assert raw.encode_ordinary("qjz") == [259]  # what a naive conversion would produce
    assert toklib.tiktoken_encoding(hf) is None
    tok = toklib.BPETokenizer(hf)
    assert tok.engine == "tokenizers"
    assert tok.encode("qjz qjz") == hf.encode("qjz qjz").ids == [ord("q"), 257, ord(" "), ord("q"), 257]
    # a vocabulary whose merges make every token from its own bytes is used through tiktoken
    assert toklib.BPETokenizer(_toy_bpe([("q", "j"), ("j", "z"), ("qj", "z")])).engine == "tiktoken"


def _audited_docs(n_audited: int, n_plain: int) -> list[str]:
    docs, audited, plain = [], 0, 0
    for i in range(100_000):
        text = f"note {i}: the qjz of qjzqjz and more qjz\n" * 20
        a = zlib.crc32(text.encode()) % toklib.AUDIT_EVERY == 0
        if (a and audited < n_audited) or (not a and plain < n_plain):
            docs.append(text)
            audited, plain = audited + a, plain + (not a)
        if audited == n_audited and plain == n_plain:
            return docs
    raise AssertionError("not enough documents")


def test_texts_the_engines_tokenize_differently_fall_back_and_are_counted(
        fast_cfg, tmp_path, monkeypatch):
    # an engine that cuts "qjz" apart where tokenizers does not: the disagreement the audit is
    # there to catch (no real one is known: the tests above find none)
    monkeypatch.setattr(toklib, "GPT2_SPLIT", r" ?qj(?=z)|" + toklib.GPT2_SPLIT)
    docs = _audited_docs(3, 27)
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i:02d}.txt").write_text(d)
    logs = []
    cfg = fast_cfg(**{"data.source": str(src), "data.vocab_size": 300, "data.num_workers": 1})
    ds = prepare(cfg, tmp_path / "root", log=logs.append)
    assert ds.tokenizer.engine == "tiktoken"
    m = ds.manifest
    assert m["tokenizer"]["engine"] == "tiktoken"
    assert m["train"]["audited"] + m["val"]["audited"] == 3
    assert m["train"]["fallback"] + m["val"]["fallback"] == 3
    assert any("3 texts checked against `tokenizers`: 3 differed" in s for s in logs)
    # the texts that were checked carry tokenizers' ids, the others tiktoken's
    ids, audit = ds.tokenizer.encode_audited(list(docs))
    assert sorted(audit.tolist()) == [0] * 27 + [2] * 3
    ref = ref_ids(reference(ds.tokenizer), docs)
    assert all((list(x) == r) == (a == 2) for x, r, a in zip(ids, ref, audit))


def test_end_of_text_comes_only_from_document_ends(stdlib_bpe):
    text = "a <|endoftext|> b<|endoftext|>"
    toks = [stdlib_bpe, toklib.ByteTokenizer(), toklib.CharTokenizer.train([text])]
    try:
        toks.append(toklib.GPT2Tokenizer())
    except Exception:  # offline: GPT-2's files cannot be had
        pass
    for tok in toks:
        ids = tok.encode(text)
        assert tok.eot_id not in ids and tok.decode(ids) == text, tok.kind
        flat, lens, _, _ = worker_encode(tok, [text, text], [False, True])
        assert list(flat).count(tok.eot_id) == 1 and flat[-1] == tok.eot_id


def test_gpt2_through_tokenizers_gives_tiktoken_ids():
    try:
        tok = toklib.GPT2Tokenizer()
    except Exception:
        pytest.skip("GPT-2's tokenizer files cannot be downloaded here")
    hf = toklib.tokenizers_object(tok)
    hf.encode_special_tokens = True
    assert ref_ids(hf, HOSTILE) == [tok.encode(t) for t in HOSTILE]


# ----------------------------------------------------------------------------- tokenizer.json


@pytest.mark.parametrize("kind", ["bpe", "bytes", "char"])
def test_tokenizer_json_is_hugging_faces_and_loads_back(kind, stdlib_bpe, tmp_path):
    text = toklib.clean("".join(HOSTILE))
    tok = {"bpe": stdlib_bpe, "bytes": toklib.ByteTokenizer(),
           "char": toklib.CharTokenizer.train([text])}[kind]
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.encode_special_tokens = True
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert hf.token_to_id(EOT) == tok.eot_id and hf.get_vocab_size() == tok.vocab_size
    record = json.loads((tmp_path / "tokenizer_slm.json").read_text())
    assert record["kind"] == kind and record["id"] == tok.id and record["eot_id"] == tok.eot_id
    again = toklib.load(tmp_path / "tokenizer.json")
    assert again.id == tok.id and again.encode(text) == tok.encode(text)


def test_an_altered_or_lone_tokenizer_json_is_refused_with_the_fix(stdlib_bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    stdlib_bpe.save(path)
    d = json.loads(path.read_text())
    d["model"]["vocab"]["Ġthe"], d["model"]["vocab"]["Ġa"] = (d["model"]["vocab"]["Ġa"],
                                                             d["model"]["vocab"]["Ġthe"])
    path.write_text(json.dumps(d))
    with pytest.raises(SLMError, match="does not match tokenizer_slm.json"):
        toklib.load(path)
    (tmp_path / "tokenizer_slm.json").unlink()
    with pytest.raises(SLMError, match="tokenizer_slm.json is missing"):
        toklib.load(path)
    assert not toklib.saved(path)
