"""Tokenizers: byte-level BPE (trained with `tokenizers`), raw bytes, characters, GPT-2's BPE.

Every tokenizer serialises to a small dict of strings (`to_dict`), saved beside the shards and in
every checkpoint, so a model is always decoded with the tokenizer it was trained with. `id` is a
hash of that dict; shards carry it in their header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from src.errors import SLMError

EOT = "<|endoftext|>"


class Tokenizer:
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_serial(self, texts: list[str]) -> list[list[int]]:
        """encode_batch on this thread only (preparation runs one tokenizer per process)."""
        return self.encode_batch(texts)

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
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        tmp.replace(path)

    @property
    def dtype(self):
        """Shard token type: uint16 while every id fits (vocab <= 65,536), uint32 above."""
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32


class ByteTokenizer(Tokenizer):
    kind, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "bytes"}

    def token_bytes(self):
        return np.array([1] * 256 + [0], dtype=np.int64)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise SLMError(f"character {e.args[0]!r} is not in this char tokenizer's vocab") \
                from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def to_dict(self):
        return {"kind": "char", "chars": self.chars}

    def token_bytes(self):
        return np.array([len(c.encode("utf-8")) for c in self.chars] + [0], dtype=np.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE, as GPT-2's, trained on the corpus with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, s: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(s))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self):
        return {"kind": "bpe", "json": self.tok.to_str()}

    def token_bytes(self):
        # byte-level tokens are spelled in a 256-symbol alphabet: one symbol per byte
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for s, i in self.tok.get_vocab().items():
            out[i] = 0 if s == EOT else len(s)
        return out


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken; its files are downloaded once and cached by tiktoken."""

    kind, vocab_size, eot_id = "gpt2", 50257, 50256

    def __init__(self):
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
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def encode_serial(self, texts):
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if i != self.eot_id])

    def to_dict(self):
        return {"kind": "gpt2"}

    def token_bytes(self):
        out = np.array(
            [len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size - 1)] + [0]
        )
        return out.astype(np.int64)


def from_dict(d: dict, where: str = "tokenizer record") -> Tokenizer:
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "bpe":
            return BPETokenizer.from_json(d["json"])
        if kind == "gpt2":
            return GPT2Tokenizer()
    except SLMError:
        raise
    except Exception as e:  # KeyError, TypeError, the tokenizers library's own errors
        raise SLMError(
            f"{where}: the {kind} tokenizer in it is damaged ({type(e).__name__}: {e}); it was "
            "altered or not written by slm"
        ) from None
    raise SLMError(f"{where}: unknown tokenizer record (kind={kind!r}); was it written by slm?")


def load(path: str | Path) -> Tokenizer:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SLMError(f"{path}: not a readable slm tokenizer file ({e})") from None
    return from_dict(d, str(path))
