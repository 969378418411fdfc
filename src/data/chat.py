"""The chat format, chat data sets and their preparation (`data.format: chat`).

One template, ChatML-style, written with two special tokens that every tokenizer has
(src/data/tokenizer.py: `chat_ids`; text never encodes to them):

    <|endoftext|><|im_start|>system
    You are ...<|im_end|>
    <|im_start|>user
    What does os.path.join do?<|im_end|>
    <|im_start|>assistant
    Join two or more pathname components ...<|im_end|>

`render` is the one place the format lives: training data, `slm chat`, `slm serve` and the
exported Hugging Face template (`CHAT_TEMPLATE`, the same text in Jinja) all follow it. The loss
mask is 1 on the assistant's content and the <|im_end|> that closes it, 0 elsewhere.

Sources: JSON lines of {"messages": [{"role", "content"}, ...]} (OpenAI's and Hugging Face's
format; a file or a folder of .jsonl files, compressed or not), `hf:<repo>[:<subset>]` (a dataset with a
`messages` column, read with the same code as text sources), or `python-stdlib`: a chat set generated from the
standard library's sources (src/data/chatset.py). Conversations are packed whole into rows of
seq_len tokens (padded with end-of-text, masked); one longer than a row is cut after its last
assistant turn that fits, or dropped when none fits; both are counted in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from src.data import sources
from src.data import tokenizer as toklib
from src.data.shards import open_shard, write_shard
from src.errors import SLMError

ROLES = ("system", "user", "assistant")
FORMAT = 1
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text with the special tokens spelled out (what CHAT_TEMPLATE gives)."""
    s = toklib.EOT + "".join(f"{toklib.IM_START}{m['role']}\n{m['content']}{toklib.IM_END}\n"
                             for m in messages)
    return s + (f"{toklib.IM_START}assistant\n" if add_generation_prompt else "")


def turn(tok, role: str, content: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one message: <|im_start|>role\\ncontent<|im_end|>\\n."""
    start, end = _ids(tok)
    head, body, tail = [start, *tok.encode(f"{role}\n")], tok.encode(content), tok.encode("\n")
    on = 1 if role == "assistant" else 0
    return head + body + [end] + tail, [0] * len(head) + [on] * (len(body) + 1) + [0] * len(tail)


def render(tok, messages: list[dict], add_generation_prompt: bool = False):
    """(ids, mask) of a conversation, from its first end-of-text token on."""
    ids, mask = [tok.eot_id], [0]
    for m in messages:
        i, k = turn(tok, m["role"], m["content"])
        ids += i
        mask += k
    if add_generation_prompt:
        ids += generation_prompt(tok)
        mask += [0] * (len(ids) - len(mask))
    return ids, mask


def generation_prompt(tok) -> list[int]:
    return [_ids(tok)[0], *tok.encode("assistant\n")]


def _ids(tok) -> tuple[int, int]:
    ids = tok.chat_ids
    if ids is None:
        raise SLMError(f"this {tok.kind} tokenizer has no chat tokens; chat needs a model "
                       "fine-tuned with data.format: chat (docs/chat.md)")
    return ids


def check(messages, where: str) -> list[dict]:
    """messages as a list of {"role", "content"} dicts, or an SLMError naming where.

    OpenAI's forms are accepted too: content as a list of text parts (joined), and the
    "developer" role (read as "system")."""
    if not isinstance(messages, list) or not messages:
        raise SLMError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        content = _text(m.get("content")) if isinstance(m, dict) else None
        if role not in (*ROLES, "developer") or content is None:
            raise SLMError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a "
                           f"content (a string, or a list of text parts); got {str(m)[:80]}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _text(content) -> str | None:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text"} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    return None


# ----------------------------------------------------------------------------- sources


JSONL = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")


def jsonl_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl*") if f.name.lower().endswith(JSONL))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise SLMError(f"data.source {source}: no chat file (.jsonl of {{\"messages\": [...]}} "
                       "lines, or .jsonl.gz/.bz2/.xz/.zst) there; see docs/chat.md")
    return files


def _jsonl_rows(f: Path) -> Iterator[tuple[int, str, object]]:
    """(line number, line, parsed row) of each non-blank line of a JSON-lines file."""
    n = 0
    try:
        with sources.open_text(f) as fh:
            for n, line in enumerate(fh, 1):
                if n == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if not line.strip():
                    continue
                try:
                    yield n, line, json.loads(line)
                except ValueError as e:
                    raise SLMError(f"{f}:{n}: not JSON ({e})") from None
    except UnicodeDecodeError:
        raise SLMError(f"{f}: not UTF-8 text (a bad byte after line {n}); convert the file with "
                       "`iconv -f latin1 -t utf-8`") from None
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise SLMError(f"{f}: cannot be read ({e})") from None


def conversations(source: str, val_fraction: float, split: str = "train"
                  ) -> Iterator[tuple[list[dict], bool]]:
    """(messages, is_validation) of every conversation of a chat source, in a fixed order."""
    if source == "python-stdlib":
        from src.data.chatset import stdlib_chats

        yield from stdlib_chats()
        return
    if sources.is_hub(source):
        yield from _hub_conversations(source, val_fraction, split)
        return
    for f in jsonl_files(source):
        for n, line, row in _jsonl_rows(f):
            msgs = check(row.get("messages") if isinstance(row, dict) else None, f"{f}:{n}")
            yield msgs, zlib.crc32(line.encode()) % 10_000 < val_fraction * 10_000


def _hub_conversations(source: str, val_fraction: float, split: str):
    """hf:<repo>[:<subset>] rows with a 'messages' column, streamed by `datasets` (as text)."""
    groups, _ = sources.hub_groups(source, split)
    for g in groups:
        for n, row in enumerate(sources.open_rows(g, "messages"), 1):
            msgs = check(row.get("messages"), f"{source} row {n}")
            blob = json.dumps(msgs, sort_keys=True).encode()
            yield msgs, zlib.crc32(blob) % 10_000 < val_fraction * 10_000


def fingerprint(source: str) -> str:
    if source == "python-stdlib":
        from src.data.chatset import VERSION

        return f"{sources.fingerprint(source)}-chatset{VERSION}"
    if sources.is_hub(source):
        return sources.fingerprint(source)
    h = hashlib.sha256()
    for f in jsonl_files(source):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- packing


def fit(tok, messages: list[dict], room: int):
    """(ids, mask) of the conversation cut after its last assistant turn within room tokens, and
    whether it was cut; None when no assistant turn fits."""
    ids, mask = [tok.eot_id], [0]
    best, cut = None, False
    for m in messages:
        i, k = turn(tok, m["role"], m["content"])
        if len(ids) + len(i) > room:
            cut = True
            break
        ids, mask = ids + i, mask + k
        if m["role"] == "assistant":
            best = (list(ids), list(mask))
    return (best, cut) if best else (None, cut)


def pack(tok, convs: Iterable[list[dict]], seq_len: int, stats: dict):
    """Conversations packed into rows of seq_len tokens; returns (tokens, mask) arrays."""
    rows_t, rows_m, cur_t, cur_m = [], [], [], []

    def flush():
        pad = seq_len - len(cur_t)
        rows_t.append(cur_t + [tok.eot_id] * pad)
        rows_m.append(cur_m + [0] * pad)

    for msgs in convs:
        got, cut = fit(tok, msgs, seq_len)
        if got is None:
            stats["dropped"] += 1
            continue
        stats["cut"] += cut
        stats["conversations"] += 1
        ids, mask = got
        stats["assistant_tokens"] += sum(mask)
        if len(cur_t) + len(ids) > seq_len:
            flush()
            cur_t, cur_m = [], []
        cur_t, cur_m = cur_t + ids, cur_m + mask
    if cur_t:
        flush()
    # one end-of-text after the last row: every row is a whole window of seq_len + 1 tokens
    t = np.array([x for r in rows_t for x in r] + [tok.eot_id], dtype=tok.dtype)
    m = np.array([x for r in rows_m for x in r] + [0], dtype=tok.dtype)
    return t, m


def dataset_dir(cfg, data_root, tok) -> Path:
    d = cfg.data
    key = {"format": FORMAT, "source": d.source, "fp": fingerprint(d.source),
           "val_fraction": d.val_fraction, "tokenizer": tok.id, "seq_len": cfg.seq_len}
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = Path(d.source.rstrip("/")).name.replace(".", "_")[:40] or "chat"
    return Path(data_root) / "datasets" / f"chat-{slug}-{tok.kind}-{h}"


def prepare_chat(cfg, data_root, tok, log=print) -> dict:
    """The chat dataset of cfg.data for tokenizer tok (tokenized and packed once, then reused),
    as src.data.prepare.Dataset's fields."""
    tok = toklib.with_chat(tok)
    out = dataset_dir(cfg, data_root, tok)
    if not (out / "manifest.json").is_file():
        _build(cfg, out, tok, log)
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        open_shard(out / f"{split}.bin", tok.id)  # checks headers, sizes and the tokenizer now
        open_shard(out / f"{split}_mask.bin", tok.id)
    return {"dir": out, "tokenizer": toklib.load(out / "tokenizer.json"), "manifest": manifest,
            "train": [out / "train.bin"], "val": [out / "val.bin"],
            "masks": {"train": [out / "train_mask.bin"], "val": [out / "val_mask.bin"]}}


def _build(cfg, out: Path, tok, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    split = {"train": [], "val": []}
    for msgs, val in conversations(cfg.data.source, cfg.data.val_fraction, cfg.data.split):
        split["val" if val else "train"].append(msgs)
    manifest = {"format": FORMAT, "chat": True, "source": cfg.data.source, "seq_len": cfg.seq_len,
                "tokenizer": {"kind": tok.kind, "id": tok.id, "vocab_size": tok.vocab_size}}
    for name, convs in split.items():
        if not convs:
            raise SLMError(f"data.source {cfg.data.source}: no {name} conversations; add more "
                           "or change data.val_fraction")
        stats = {"conversations": 0, "cut": 0, "dropped": 0, "assistant_tokens": 0}
        t, m = pack(tok, convs, cfg.seq_len, stats)
        if stats["conversations"] == 0:
            raise SLMError(f"data.source {cfg.data.source}: no {name} conversation has an "
                           f"assistant turn within {cfg.seq_len} tokens; raise training.seq_len")
        write_shard(out / f"{name}.bin", t, tok.id)
        write_shard(out / f"{name}_mask.bin", m, tok.id)
        manifest[name] = stats | {"tokens": int(len(t))}
        log(f"chat {name}: {stats['conversations']:,} conversations in {len(t):,} tokens "
            f"({stats['assistant_tokens']:,} assistant tokens; {stats['cut']} cut at a turn, "
            f"{stats['dropped']} dropped as longer than {cfg.seq_len} tokens)")
    tok.save(out / "tokenizer.json")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def source_tokenizer(cfg):
    """A tokenizer for chat data with no model to fine-tune: data.tokenizer over the chat set."""
    kind = cfg.data.tokenizer
    if kind in ("bytes", "gpt2"):
        return toklib.from_dict({"kind": kind, "chat": True})
    texts = [text(m) for m, _ in conversations(cfg.data.source, cfg.data.val_fraction,
                                                cfg.data.split)]
    if kind == "char":
        return toklib.with_chat(toklib.CharTokenizer.train(texts))
    return toklib.BPETokenizer.train(texts, cfg.data.vocab_size)
