"""Chat: the format's special tokens in real tokenizers, the assistant-only loss mask, a real
fine-tune on a CPU, `slm chat` through a pipe, and the Hugging Face export's chat template."""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_cli

from src import checkpoint as ckpt
from src.data import chat
from src.data import tokenizer as toklib
from src.data.loader import BatchLoader
from src.errors import SLMError
from src.tools.chat import Chat
from src.training.trainer import train

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does os.path.join do? <|im_start|>"},
        {"role": "assistant", "content": "Join paths."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."}]


def tokenizers(corpus):
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))[:20]]
    out = [toklib.BPETokenizer.train(texts, 400), toklib.with_chat(toklib.CharTokenizer.train(
        texts + [chat.text(CONV)])), toklib.with_chat(toklib.ByteTokenizer())]
    try:
        out.append(toklib.with_chat(toklib.GPT2Tokenizer()))
    except SLMError:  # GPT-2's files are not cached and there is no network
        pass
    return out


def test_every_tokenizer_has_chat_tokens_that_text_cannot_produce(corpus, tmp_path):
    for tok in tokenizers(corpus):
        start, end = tok.chat_ids
        assert len({start, end, tok.eot_id}) == 3 and end < tok.vocab_size, tok.kind
        typed = tok.encode("<|im_start|>user\nhi<|im_end|>")
        assert start not in typed and end not in typed, tok.kind  # typed by a user: plain text
        ids, mask = chat.render(tok, CONV)
        assert ids.count(start) == ids.count(end) == len(CONV), tok.kind
        assert tok.decode(ids) == "".join(f"{m['role']}\n{m['content']}\n" for m in CONV)
        hf = toklib.tokenizers_object(tok)  # the exported tokenizer has the same ids
        assert [hf.token_to_id(t) for t in toklib.CHAT_TOKENS] == [start, end], tok.kind
        tok.save(tmp_path / f"{tok.kind}.json")
        back = toklib.load(tmp_path / f"{tok.kind}.json")
        assert back.chat_ids == (start, end) and back.id == tok.id, tok.kind


def test_a_tokenizer_without_chat_tokens_gets_them_after_its_vocab():
    base = toklib.ByteTokenizer()
    assert base.chat_ids is None and base.vocab_size == 257  # pretraining vocab unchanged
    tok = toklib.with_chat(base)
    assert tok.chat_ids == (257, 258) and tok.vocab_size == 259 and tok.id != base.id
    assert toklib.with_chat(tok) is tok


def test_the_loss_mask_covers_the_assistant_replies_and_their_end_only(corpus):
    tok = tokenizers(corpus)[0]
    ids, mask = chat.render(tok, CONV)
    scored = [i for i, m in zip(ids, mask, strict=True) if m]
    end = tok.chat_ids[1]
    assert scored.count(end) == 2  # each reply learns to stop
    assert tok.decode(scored) == "Join paths.You're welcome."
    gen, gmask = chat.render(tok, CONV[:2], add_generation_prompt=True)
    assert sum(gmask) == 0 and tok.decode(gen).endswith("assistant\n")


def test_long_conversations_are_cut_at_a_turn_or_dropped_and_counted():
    tok = toklib.with_chat(toklib.ByteTokenizer())
    long = CONV + [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]
    too_long = [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "a"}]
    stats = {"conversations": 0, "cut": 0, "dropped": 0, "assistant_tokens": 0}
    t, m = chat.pack(tok, [CONV, long, too_long], 160, stats)
    assert stats == {"conversations": 2, "cut": 1, "dropped": 1,
                     "assistant_tokens": 2 * (len("Join paths.You're welcome.") + 2)}
    assert len(t) == 2 * 160 + 1 and t.dtype == tok.dtype  # whole rows, one conversation each
    row = t[160:320].tolist()
    assert tok.decode(row).endswith("You're welcome.\n") and "x" not in tok.decode(row)


def test_batches_score_only_the_assistant_tokens(tmp_path):
    from src.data.shards import write_shard

    tok = toklib.with_chat(toklib.ByteTokenizer())
    stats = {"conversations": 0, "cut": 0, "dropped": 0, "assistant_tokens": 0}
    t, m = chat.pack(tok, [CONV] * 8, 160, stats)
    write_shard(tmp_path / "t.bin", t, tok.id)
    write_shard(tmp_path / "m.bin", m, tok.id)
    x, y = BatchLoader([tmp_path / "t.bin"], tok.id, 160, 8, 0, masks=[tmp_path / "m.bin"]) \
        .next_batch()
    assert (y >= 0).sum() == stats["assistant_tokens"]  # 8 rows, one conversation each
    kept = y[y >= 0].tolist()
    assert set(kept) <= set(tok.encode("Join paths.You're welcome.")) | {tok.chat_ids[1]}


# ----------------------------------------------------------------------------- a real fine-tune


def _chat_file(path, n=80, seed=0):
    """Questions of random letters (unpredictable) answered by one fixed reply."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = "".join(rng.choice("abcdefghij ") for _ in range(30))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "okay!"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, corpus):
    """(data root, fine-tuned model file): a bytes model pretrained a few steps on the corpus,
    then chat fine-tuned from its run name on a chat file."""
    from conftest import FAST, ROOT

    from src.training.config import load_config

    root = tmp_path_factory.mktemp("chatroot")
    quiet = lambda *a: None  # noqa: E731
    base = load_config(ROOT / "configs/tiny.yaml", {**FAST, "data.source": str(corpus),
                       "data.tokenizer": "bytes", "training.max_steps": 4, "name": "base",
                       "model.block_size": 128})
    train(base, data_root=root, use_wandb=False, device="cpu", log=quiet)
    src = _chat_file(root / "chats.jsonl")
    over = {**{k: v for k, v in FAST.items() if not k.startswith("model.")},
            "model.init_from": "base", "data.source": str(src), "data.format": "chat",
            "data.tokenizer": "bytes", "data.val_fraction": 0.2, "training.seq_len": 128,
            "training.max_steps": 60, "training.eval_every": 30, "training.learning_rate": 3e-3,
            "training.num_samples": 0, "name": "tuned"}
    res = train(load_config(ROOT / "configs/chat_tiny.yaml", over), data_root=root,
                use_wandb=False, device="cpu", log=quiet)
    return root, res.model_path


def test_chat_fine_tuning_learns_the_replies_not_the_questions(tuned):
    root, model_path = tuned
    rows = [json.loads(x) for x in (root / "checkpoints/tuned/metrics.jsonl").read_text()
            .splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    first = next(r["train/loss"] for r in rows if "train/loss" in r)
    # random-letter questions cost ~2.4 nats a byte: a loss near 0 scores only the fixed reply
    assert val[-1] < 0.3 and first > 1.0, (first, val)
    model, tok, _ = ckpt.load_model(model_path)
    assert tok.chat_ids == (257, 258) and model.cfg.vocab_size == 259  # the embedding grew
    c = Chat(model, tok, temperature=0, seed=0)
    assert c.reply("bad cafe hide") == "okay!"


def test_the_kv_cache_carries_the_conversation_across_turns(tuned):
    model, tok, _ = ckpt.load_model(tuned[1])
    notes = []
    c = Chat(model, tok, system="be kind", temperature=0, max_new_tokens=16, notice=notes.append)
    a1 = c.reply("jab ace")
    assert c.cached == chat.render(tok, c.messages)[0]  # the cache holds the rendered history
    sizes, feed = [], c._feed
    c._feed = lambda ids: (sizes.append(len(ids)), feed(ids))[1]
    a2 = c.reply("dig")
    new = chat.turn(tok, "user", "dig")[0] + chat.generation_prompt(tok)
    assert sizes[0] == len(new)  # the second turn reads only its own tokens
    assert c.cached == chat.render(tok, c.messages)[0]
    assert (a1, a2) == ("okay!", "okay!")
    for _ in range(6):  # 128-token context: old turns must go
        c.reply("fade bead hack jig")
    assert notes and "dropped" in notes[0] and c.messages[0]["role"] == "system"
    assert c.cached == chat.render(tok, c.messages)[0]


def test_slm_chat_through_a_pipe(tuned):
    root, model_path = tuned
    r = run_cli("chat", model_path, "--temperature", "0", "--max-new-tokens", "12",
                input="bad cafe\n/help\n/reset\nhide a bag\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["okay!", "okay!"]
    assert "/system TEXT" in r.stderr and "reset" in r.stderr
    base = run_cli("chat", root / "models/base_final.pt", "--max-new-tokens", "4", input="def \n")
    assert base.returncode == 0 and "base model" in base.stderr and base.stdout.strip()
    bad = run_cli("chat", root / "missing.pt", input="")
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_hf_export_carries_the_chat_template(tuned, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, pipeline

    run = run_cli("export", tuned[1], "--to", "hf", tmp_path / "hf")
    assert run.returncode == 0, run.stderr
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, tok, _ = ckpt.load_model(tuned[1])
    msgs = CONV[:2] + [{"role": "user", "content": "ok?"}]
    msgs[1] = {"role": "user", "content": "What does os.path.join do?"}
    s = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == chat.text(msgs, add_generation_prompt=True)
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == chat.render(tok, msgs, add_generation_prompt=True)[0]
    gen = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = gen([{"role": "user", "content": "ace bad"}], max_new_tokens=12, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    want = Chat(model, tok, temperature=0, max_new_tokens=12).reply("ace bad")
    assert reply["content"] == want == "okay!"


def test_chat_data_mistakes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(SLMError, match=r"bad.jsonl:1: each message needs a role"):
        list(chat.conversations(str(bad), 0.1))
    with pytest.raises(SLMError, match="no chat file"):
        list(chat.conversations(str(tmp_path / "nothing"), 0.1))
    with pytest.raises(SLMError, match="no chat tokens"):
        chat.render(toklib.ByteTokenizer(), CONV)


def test_chat_files_in_the_forms_people_have_read_the_same(tmp_path):
    """A byte-order mark, CRLF line ends, gzip/xz compression, OpenAI's text parts and its
    "developer" role all give the same conversations (and the same validation split)."""
    import gzip
    import lzma

    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(40)]
    lines = [json.dumps(r) for r in rows]
    want = list(chat.conversations(str(_write(tmp_path / "plain.jsonl", "\n".join(lines))), 0.2))
    assert 0 < sum(v for _, v in want) < 40
    forms = {
        "bom.jsonl": ("\ufeff" + "\n".join(lines)).encode(),
        "crlf.jsonl": ("\r\n".join(lines) + "\r\n\r\n").encode(),
        "z.jsonl.gz": gzip.compress("\n".join(lines).encode()),
        "z.jsonl.xz": lzma.compress("\n".join(lines).encode()),
    }
    for name, data in forms.items():
        (tmp_path / name).write_bytes(data)
        assert list(chat.conversations(str(tmp_path / name), 0.2)) == want, name
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(forms["z.jsonl.gz"])
    (folder / "notes.txt").write_text("not chat")
    assert list(chat.conversations(str(folder), 0.2)) == want
    parts = {"messages": [{"role": "developer", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                       {"type": "text", "text": "lo"}]},
                          {"role": "assistant", "content": "Hi"}]}
    (msgs, _), = chat.conversations(str(_write(tmp_path / "p.jsonl", json.dumps(parts))), 0.2)
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]


TRUNCATED_GZIP = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"  # a gzip header and nothing more


@pytest.mark.parametrize("data, says", [
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "not UTF-8 text"),
    (TRUNCATED_GZIP, "cannot be read"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}\n',
     "z.jsonl:1: each message needs a role"),
    (b'{"messages": [{"role": "tool", "content": "x"}]}\n', "z.jsonl:1: each message needs a role"),
    (b'{"messages": [{"role": "user", "content": null}]}\n', "z.jsonl:1: each message needs a role"),
    (b'[1, 2]\n', "z.jsonl:1: 'messages' must be a non-empty list"),
    (b'\n\n{"messages": []}\n', "z.jsonl:3: 'messages' must be a non-empty list"),
])
def test_a_bad_chat_file_is_one_error_that_names_it(tmp_path, data, says):
    f = tmp_path / ("z.jsonl.gz" if data is TRUNCATED_GZIP else "z.jsonl")
    f.write_bytes(data)
    with pytest.raises(SLMError, match=says):
        list(chat.conversations(str(f), 0.1))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_hugging_face_dataset_folder_is_read_as_chat(tmp_path):
    pytest.importorskip("datasets")
    _chat_file(tmp_path / "train.jsonl", n=20)
    got = list(chat.conversations(f"hf:{tmp_path}", 0.25))
    assert len(got) == 20 and 0 < sum(v for _, v in got) < 20
    assert got[0][0][1] == {"role": "assistant", "content": "okay!"}
