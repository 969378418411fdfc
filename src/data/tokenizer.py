"""Tokenizers: byte-level BPE (trained with `tokenizers`), raw bytes, characters, GPT-2's BPE.

Every tokenizer serialises to a small dict of strings (`to_dict`), kept in every checkpoint, so a
model is always decoded with the tokenizer it was trained with. `id` is a hash of that dict;
shards carry it in their header.

Beside the shards and in every run folder a tokenizer is saved as two files:
    tokenizer.json      Hugging Face's tokenizer JSON, for every kind: `tokenizers.Tokenizer.
                        from_file` and `transformers` load it with the same ids
    tokenizer_slm.json  slm's record: kind, id, vocab size, end-of-text id (and a char
                        tokenizer's characters)
Folders written before this layout hold one tokenizer.json that is slm's record; `load` reads them.

Byte-level BPE is trained with `tokenizers` and encoded with tiktoken, through a `tiktoken.
Encoding` built from the same vocabulary (about 8x faster on one thread). The two give the same
tokens (tests/test_fast_bpe.py); preparation still re-encodes one text in AUDIT_EVERY, chosen by a
hash of its content, with `tokenizers`, keeps `tokenizers`' tokens where they differ, and counts
such texts in the manifest. "<|endoftext|>" inside a text is text: only the end of a document
produces the end-of-text token.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from src.errors import SLMError

EOT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # the chat format's tokens (src/data/chat.py)
CHAT_TOKENS = (IM_START, IM_END)
# tokenizers' ByteLevel(use_regex=True) pre-tokenizer is GPT-2's pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# this is the same pattern as tiktoken writes it for GPT-2 (possessive quantifiers: the same
# pieces with less backtracking; tests/test_fast_bpe.py compares the pieces character by character)
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
AUDIT_EVERY = 64  # preparation re-encodes this share of texts with `tokenizers` to compare
META_FORMAT = "slm-tokenizer-v2"
# checked when the fast encoder is built: it is used only if both engines agree on this text
PROBE = ("def f(x):\r\n\treturn x  *  2   # naïve ünïcode ✓ 😀👍🏽 Ελληνικά русский 日本語 한국어\n"
         "  it's we'll I'M   \t\n\n\u00a0\u3000\u2028 1234567 ١٢٣ Ⅻ <|endoftext|>   ")


def clean(text: str) -> str:
    """text with lone surrogates (which UTF-8 cannot hold, e.g. from JSON) replaced by '?'."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class Tokenizer:
    kind: str
    vocab_size: int
    eot_id: int
    engine = "slm"  # what encodes the text: slm's own code, tiktoken or tokenizers
    chat = False  # bytes/char/gpt2: whether the two chat tokens follow the base vocab

    @property
    def chat_ids(self) -> tuple[int, int] | None:
        """(id of <|im_start|>, id of <|im_end|>), or None for a tokenizer without chat tokens
        (a bpe trained before slm reserved them). Encoding text never produces them."""
        if not self.chat:
            return None
        return self.vocab_size - 2, self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_serial(self, texts: list[str]) -> list[list[int]]:
        """encode_batch on this thread only (preparation runs one tokenizer per process)."""
        return self.encode_batch(texts)

    def encode_audited(self, texts: list[str]) -> tuple[list, np.ndarray]:
        """encode_serial (each text's ids as a list or a 1-D integer array), and per text: 0 not
        checked, 1 checked against a second engine and equal, 2 checked and different (the
        reference engine's ids are returned)."""
        return self.encode_serial(texts), np.zeros(len(texts), np.int8)

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens): for bits per byte."""
        raise NotImplementedError

    @property
    def id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def save(self, path: str | Path) -> None:
        """Hugging Face's tokenizer JSON at path, slm's record beside it (<stem>_slm.json)."""
        path = Path(path)
        meta = {"format": META_FORMAT, "id": self.id, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "eot": EOT, "file": path.name}
        meta |= {k: v for k, v in self.to_dict().items() if k != "json"}
        _write(path, tokenizers_object(self).to_str(pretty=True))
        _write(meta_path(path), json.dumps(meta, indent=1))

    @property
    def dtype(self):
        """Shard token type: uint16 while every id fits (vocab <= 65,536), uint32 above."""
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32


def _write(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class ByteTokenizer(Tokenizer):
    kind, vocab_size, eot_id = "bytes", 257, 256

    def __init__(self, chat: bool = False):
        self.chat, self.vocab_size = chat, 259 if chat else 257

    def encode(self, text):
        return list(clean(text).encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "bytes"} | ({"chat": True} if self.chat else {})

    def token_bytes(self):
        return np.array([1] * 256 + [0] * (self.vocab_size - 256), dtype=np.int64)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str, chat: bool = False):
        self.chars, self.chat = chars, chat
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + (3 if chat else 1)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(clean(t))
        return cls("".join(sorted(seen)))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in clean(text)]
        except KeyError as e:
            raise SLMError(f"character {e.args[0]!r} is not in this char tokenizer's vocab") \
                from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars} | ({"chat": True} if self.chat else {})

    def token_bytes(self):
        n = self.vocab_size - len(self.chars)
        return np.array([len(c.encode("utf-8")) for c in self.chars] + [0] * n, dtype=np.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE, as GPT-2's, trained on the corpus with Hugging Face `tokenizers` and
    encoded with tiktoken where the vocabulary allows (the same tokens, faster)."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        tok.encode_special_tokens = True  # "<|endoftext|>" in a text is text, as in tiktoken
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)
        self._fast = None  # the tiktoken encoding, built on first use (False: not usable)

    @property
    def chat_ids(self):
        ids = tuple(self.tok.token_to_id(t) for t in CHAT_TOKENS)
        return None if None in ids else ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT, *CHAT_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, s: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(s))

    @property
    def engine(self) -> str:
        """'tiktoken', or 'tokenizers' where the vocabulary has a feature tiktoken lacks."""
        if self._fast is None:
            enc = tiktoken_encoding(self.tok)
            self._fast = enc is not None and enc.encode_ordinary(PROBE) == self._slow([PROBE])[0]
            self._fast = enc if self._fast else False
        return "tiktoken" if self._fast else "tokenizers"

    def _slow(self, texts):
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def encode(self, text):
        return self.encode_serial([text])[0]

    def encode_batch(self, texts):
        texts = [clean(t) for t in texts]
        if self.engine == "tiktoken":
            return self._fast.encode_ordinary_batch(texts)
        return self._slow(texts)

    def encode_serial(self, texts):
        texts = [clean(t) for t in texts]
        if self.engine == "tiktoken":
            return [self._fast.encode_ordinary(t) for t in texts]
        return self._slow(texts)

    def encode_audited(self, texts):
        flags = np.zeros(len(texts), np.int8)
        if self.engine != "tiktoken":
            return self._slow([clean(t) for t in texts]), flags
        texts = [clean(t) for t in texts]
        to_numpy = getattr(self._fast, "encode_to_numpy", None)  # no Python ints: faster
        if to_numpy:  # no special tokens allowed or refused: the same as encode_ordinary
            ids = [to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        else:
            ids = [self._fast.encode_ordinary(t) for t in texts]
        check = [k for k, t in enumerate(texts) if audited(t)]
        for k, ref in zip(check, self._slow([texts[k] for k in check])):
            flags[k] = 1 if np.array_equal(ids[k], ref) else 2
            ids[k] = ref
        return ids, flags

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self):
        return {"kind": "bpe", "json": self.tok.to_str()}

    def token_bytes(self):
        # byte-level tokens are spelled in a 256-symbol alphabet: one symbol per byte
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for s, i in self.tok.get_vocab().items():
            out[i] = 0 if s in (EOT, *CHAT_TOKENS) else len(s)
        return out


def audited(text: str) -> bool:
    """Whether preparation checks this text with both engines: one in AUDIT_EVERY, by content."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % AUDIT_EVERY == 0


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken; its files are downloaded once and cached by tiktoken."""

    kind, vocab_size, eot_id, engine = "gpt2", 50257, 50256, "tiktoken"

    def __init__(self, chat: bool = False):
        self.chat, self.vocab_size = chat, 50259 if chat else 50257
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/OS errors when offline
            raise SLMError(
                "GPT-2's tokenizer files could not be loaded (tiktoken downloads them once, "
                f"then caches them in $TIKTOKEN_CACHE_DIR): {type(e).__name__}. Connect to the "
                "network once, or use data.tokenizer: bpe, which trains on your corpus offline"
            ) from None

    def encode(self, text):
        return self.enc.encode_ordinary(clean(text))

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch([clean(t) for t in texts])

    def encode_serial(self, texts):
        return [self.enc.encode_ordinary(clean(t)) for t in texts]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if i < self.eot_id])

    def to_dict(self):
        return {"kind": "gpt2"} | ({"chat": True} if self.chat else {})

    def token_bytes(self):
        out = np.array([len(self.enc.decode_single_token_bytes(i)) for i in range(self.eot_id)]
                       + [0] * (self.vocab_size - self.eot_id))
        return out.astype(np.int64)


# ----------------------------------------------------------------------------- tiktoken <-> tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _plain_byte_level_bpe(d: dict) -> bool:
    """Whether a `tokenizers` JSON is a byte-level BPE with nothing tiktoken does not do."""
    m, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    return (d.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and m.get("type") == "BPE" and not m.get("dropout") and not m.get("byte_fallback")
            and not m.get("continuing_subword_prefix") and not m.get("end_of_word_suffix")
            and not m.get("ignore_merges"))


def tiktoken_encoding(hf):
    """A `tiktoken.Encoding` that gives the same ids as the byte-level BPE `hf` (a
    `tokenizers.Tokenizer`) on every text, or None where that cannot be shown for this vocabulary.

    Both split text into the same pieces (GPT2_SPLIT), then merge within each piece. `tokenizers`
    merges the adjacent pair that comes first in its merge list; tiktoken the adjacent pair whose
    joined bytes have the lowest rank (rank = id here), whichever two tokens make it. The two agree
    on every piece when (1) each merge makes a token with a higher id than the merge before it and
    every multi-byte token is made by a merge, and (2) `tokenizers` turns the bytes of every token,
    alone, into that one token. Why (2) suffices: at the first step where tiktoken joined a pair x, y
    that is not a merge, x and y stood side by side in `tokenizers`' own state, built by merges
    inside their span in the same order as on the bytes of x+y alone, which would then end as
    [x, y]. BpeTrainer's vocabularies pass both checks; a hand-made one may not."""
    try:
        import tiktoken
    except ImportError:
        return None
    d = json.loads(hf.to_str())
    if not _plain_byte_level_bpe(d) or not all(t.get("special") for t in d["added_tokens"]):
        return None
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    try:
        ranks = {bytes(u2b[c] for c in s): i for s, i in vocab.items() if s not in specials}
    except KeyError:  # a token spelled outside the byte alphabet
        return None
    last = -1
    for mg in merges:  # (1)
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        i = vocab.get(a + b, -1)
        if i <= last:
            return None
        last = i
    if len(ranks) != 256 + len(merges) or sum(len(t) == 1 for t in ranks) != 256:
        return None
    model = hf.model  # (2)
    if any([t.id for t in model.tokenize(s)] != [i] for s, i in vocab.items() if s not in specials):
        return None
    return tiktoken.Encoding(name=f"slm-bpe-{len(vocab)}", pat_str=GPT2_SPLIT,
                             mergeable_ranks=ranks, special_tokens=specials)


def tiktoken_to_tokenizers(enc, eot: str = EOT):
    """A `tokenizers` byte-level BPE equal to a tiktoken encoding with GPT-2's split pattern."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    ranks = enc._mergeable_ranks
    spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731

    def last_merge(token: bytes, rank: int):
        parts = [bytes([x]) for x in token]  # replay BPE with merges ranked below this token's
        while len(parts) > 2:
            merged = [ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            best = min(range(len(merged)), key=merged.__getitem__)
            if merged[best] >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return parts

    vocab = {spell(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(t) > 1:
            parts = last_merge(t, r)
            if len(parts) == 2:
                merges.append((spell(parts[0]), spell(parts[1])))
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(eot, special=True)])
    return hf


def tokenizers_object(tok: Tokenizer):
    """Our tokenizer as a Hugging Face `tokenizers.Tokenizer` with the same ids."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if tok.kind == "bpe":
        return HFTokenizer.from_str(tok.tok.to_str())
    if tok.kind == "gpt2":
        hf = tiktoken_to_tokenizers(tok.enc)
        if tok.chat:
            hf.add_special_tokens([AddedToken(t, special=True) for t in CHAT_TOKENS])
        return hf
    if tok.kind == "bytes":  # one token per byte, ids = byte values: BPE without merges
        b2u = bytes_to_unicode()
        hf = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)} | {EOT: 256}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    elif tok.kind == "char":  # one token per character
        if EOT in tok.stoi:
            raise SLMError("this char tokenizer cannot be exported: it has a character named "
                           f"{EOT!r}")
        hf = HFTokenizer(models.BPE(vocab={**tok.stoi, EOT: tok.eot_id}, merges=[]))
        hf.decoder = decoders.Fuse()
    else:
        raise SLMError(f"tokenizer kind {tok.kind!r} cannot be exported")
    hf.add_special_tokens([AddedToken(EOT, special=True)]
                          + [AddedToken(t, special=True) for t in CHAT_TOKENS if tok.chat])
    return hf


# ----------------------------------------------------------------------------- load


def from_dict(d: dict, where: str = "tokenizer record") -> Tokenizer:
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        chat = bool(d.get("chat"))
        if kind == "bytes":
            return ByteTokenizer(chat)
        if kind == "char":
            return CharTokenizer(d["chars"], chat)
        if kind == "bpe":
            return BPETokenizer.from_json(d["json"])
        if kind == "gpt2":
            return GPT2Tokenizer(chat)
    except SLMError:
        raise
    except Exception as e:  # KeyError, TypeError, the tokenizers library's own errors
        raise SLMError(
            f"{where}: the {kind} tokenizer in it is damaged ({type(e).__name__}: {e}); it was "
            "altered or not written by slm"
        ) from None
    raise SLMError(f"{where}: unknown tokenizer record (kind={kind!r}); was it written by slm?")


def with_chat(tok: Tokenizer) -> Tokenizer:
    """tok with the chat tokens: itself when it has them; bytes, char and gpt2 get them after
    their vocab (the model's embedding grows to match, src/training/init_from.py). A bpe trained
    without them cannot take them: it is retrained."""
    if tok.chat_ids is not None:
        return tok
    if tok.kind == "bpe":
        raise SLMError("this bpe tokenizer was trained before slm reserved the chat tokens "
                       f"{IM_START} and {IM_END}; pretrain again (a fresh data root) to get them")
    return from_dict(tok.to_dict() | {"chat": True})


def meta_path(path: str | Path) -> Path:
    """Where slm's record of the tokenizer saved at path lives (tokenizer.json ->
    tokenizer_slm.json)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_slm.json")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SLMError(f"{path}: not a readable {what} ({e})") from None


def saved(path: str | Path) -> bool:
    """Whether a complete tokenizer was saved at path (by this slm or an older one)."""
    path = Path(path)
    if meta_path(path).is_file():
        return path.is_file()
    try:
        return "kind" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def load(path: str | Path) -> Tokenizer:
    """The tokenizer saved at path: tokenizer.json and its tokenizer_slm.json, or the single
    tokenizer.json of a folder written before slm saved Hugging Face's format there."""
    path = Path(path)
    d = _read_json(path, "tokenizer file")
    if isinstance(d, dict) and "kind" in d:  # slm's own record (older folders)
        return from_dict(d, str(path))
    mp = meta_path(path)
    if not mp.is_file():
        raise SLMError(f"{path}: {mp.name} is missing beside it (slm keeps the tokenizer's kind "
                       "and id there); copy the whole folder, or delete it to rebuild")
    meta = _read_json(mp, "slm tokenizer record")
    rec = {k: v for k, v in meta.items() if k not in ("format", "id", "vocab_size", "eot_id",
                                                       "eot", "file")}
    if rec.get("kind") == "bpe":
        rec["json"] = json.dumps(d)  # any spelling: from_json re-serialises it
    tok = from_dict(rec, str(mp))
    if tok.id != meta.get("id"):
        raise SLMError(f"{path} does not match {mp.name} (tokenizer id {tok.id} != "
                       f"{meta.get('id')}): one was altered after slm wrote them; restore both, "
                       "or delete the folder to rebuild")
    return tok
