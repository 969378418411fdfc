"""`slm eval`: loss / perplexity / bits per byte, and HellaSwag scored the standard way."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from src.cli import main
from src.data.tokenizer import ByteTokenizer
from src.errors import SLMError
from src.eval import hellaswag as hs
from src.model.gpt import GPT, GPTConfig
from src.training.config import load_config
from src.training.trainer import train
from tests.conftest import FAST, ROOT

EXAMPLES = [  # hand-made rows in HellaSwag's format (the real file has more fields; these are used)
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon, which was far away.", "dog", "a"],
     "label": 0},
    {"ctx": "def add(a, b):\n    return", "endings": [" a + b", " a - b", "None", "1"], "label": 0},
    {"ctx": "She opened the door and", "endings": ["left.", "sang a long song.", "x", "it rained"],
     "label": 3},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hs_file(tmp_path):
    p = tmp_path / "hellaswag_val.jsonl"
    p.write_text("".join(json.dumps({**ex, "ind": i, "activity_label": "x"}) + "\n"
                         for i, ex in enumerate(EXAMPLES)))
    return p


def test_accuracy_arithmetic():
    # example 1: totals favour ending 0, per-token means favour ending 1 (label 1)
    # example 2: both pick ending 2 (label 2); example 3: both pick ending 0 (label 1)
    scores = [
        [(-10.0, 5), (-12.0, 8), (-20.0, 10), (-30.0, 10)],
        [(-9.0, 3), (-8.0, 2), (-1.0, 1), (-7.0, 2)],
        [(-1.0, 1), (-5.0, 2), (-6.0, 2), (-9.0, 3)],
    ]
    got = hs.accuracy(scores, [1, 2, 1])
    assert got["hellaswag/acc"] == pytest.approx(1 / 3)
    assert got["hellaswag/acc_norm"] == pytest.approx(2 / 3)
    assert got["hellaswag/examples"] == 3


def _direct_score(model, tok, ctx, ending):
    """Log-likelihood of the ending's tokens after the context, one unpadded row at a time."""
    c = [tok.eot_id] + tok.encode(ctx)
    e = tok.encode(" " + ending)
    x = torch.tensor([c + e])
    logits, _ = model(x[:, :-1])
    lp = F.log_softmax(logits.float(), dim=-1)[0, len(c) - 1 :]
    return lp.gather(1, torch.tensor(e)[:, None]).sum().item(), len(e)


def test_hellaswag_scores_are_mean_log_likelihoods_of_the_endings(hs_file):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257)).eval()
    tok = ByteTokenizer()
    examples = hs.load_examples(hs_file)
    assert [ex["label"] for ex in examples] == [0, 0, 3]
    expect = [[_direct_score(model, tok, ex["ctx"], e) for e in ex["endings"]] for ex in EXAMPLES]
    rows = [r for ex in examples for r in hs.example_rows(tok, ex, 64)]
    got = hs.score_rows(model, rows)  # one right-padded batch of 12 rows
    flat = [s for ex in expect for s in ex]
    assert [n for _, n in got] == [n for _, n in flat]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in flat], rel=1e-5)
    result = hs.evaluate(model, tok, examples, batch_examples=2)
    assert result == pytest.approx(hs.accuracy(expect, [0, 0, 3]))
    assert hs.evaluate(model, tok, hs.load_examples(hs_file, limit=1))["hellaswag/examples"] == 1


def test_long_rows_keep_the_ending_and_the_end_of_the_context():
    tok = ByteTokenizer()
    rows = hs.example_rows(tok, {"ctx": "x" * 100, "endings": ["abc", "d"], "label": 0}, 16)
    assert [len(r) for r, _ in rows] == [17, 17] and [n for _, n in rows] == [4, 2]
    assert bytes(rows[0][0][-4:]) == b" abc"


def test_bad_hellaswag_files_are_named(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"ctx": "a", "label": 0}) + "\n")
    with pytest.raises(SLMError, match=r"h.jsonl:2: not a HellaSwag row"):
        hs.load_examples(p)
    with pytest.raises(SLMError, match="does not exist"):
        hs.locate(tmp_path / "nope.jsonl")


def test_download_fails_fast_offline_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SLM_HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")
    assert hs.locate(download=False) is None
    with pytest.raises(SLMError, match="--hellaswag-file") as e:
        hs.locate()
    assert "could not download HellaSwag" in str(e.value)
    assert not list((tmp_path / "cache").iterdir())  # no partial file left behind


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny run trained with HellaSwag every 6 steps from a local file."""
    root = tmp_path_factory.mktemp("run")
    f = root / "hellaswag_val.jsonl"
    f.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {
        **FAST, "data.source": str(corpus), "training.hellaswag_every": 6,
        "training.hellaswag_file": str(f), "training.threads": 1, "training.num_samples": 0})
    res = train(cfg, data_root=root / "data", device="cpu", use_wandb=False, log=lambda *a: None)
    return res, root, f


def test_hellaswag_during_training_is_logged(trained):
    res, _, _ = trained
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    hs_rows = [r for r in rows if "hellaswag/acc_norm" in r]
    assert [r["step"] for r in hs_rows] == [6, 12]
    assert all(r["hellaswag/examples"] == 3 and 0 <= r["hellaswag/acc"] <= 1 for r in hs_rows)


def test_eval_reproduces_the_validation_loss_of_training(trained, capsys):
    res, root, _ = trained
    saved = torch.load(res.model_path, weights_only=True)
    assert main(["eval", str(res.model_path), "--data-root", str(root / "data"), "--json",
                 "--no-hellaswag", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "the run's validation shards"
    assert out["val/loss"] == pytest.approx(saved["val_loss"], rel=1e-6)
    assert out["val/bpb"] == pytest.approx(saved["val_bpb"], rel=1e-6)
    assert out["val/ppl"] == pytest.approx(math.exp(saved["val_loss"]), rel=1e-6)
    assert out["val/tokens"] == FAST["training.eval_tokens"]


def test_eval_on_another_source_with_hellaswag(trained, tmp_path, capsys, monkeypatch):
    res, _, f = trained
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path / "cache"))
    common = [str(res.model_path), "--data.source", str(text), "--data-root", str(tmp_path),
              "--device", "cpu"]
    assert main(["eval", *common, "--eval-tokens", "0", "--hellaswag-file", str(f)]) == 0
    shown = capsys.readouterr().out
    assert f"val split of {text}" in shown and "bits/byte" in shown
    assert "hellaswag   acc_norm" in shown and "on 3 examples" in shown
    assert main(["eval", *common, "--eval-tokens", "0", "--split", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    val_tokens = int(re.search(r"notes.txt: ([\d,]+) tokens", shown)[1].replace(",", ""))
    assert out["val/tokens"] > 10 * val_tokens  # all of the file, not the 5 % validation tail
    assert out["hellaswag"].startswith("skipped")
    # a cached copy is used without asking; offline with no copy, --hellaswag fails fast
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hellaswag_val.jsonl").write_text(f.read_text())
    assert main(["eval", *common, "--no-loss", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hellaswag/examples"] == 3
    (tmp_path / "cache" / "hellaswag_val.jsonl").unlink()
    monkeypatch.setenv("SLM_HELLASWAG_URL", "http://127.0.0.1:9/x.jsonl")
    assert main(["eval", *common, "--no-loss", "--hellaswag"]) == 2
    assert "--hellaswag-file" in capsys.readouterr().err
    assert main(["eval", *common, "--training.max_steps", "3"]) == 2
    assert "only --data.KEY" in capsys.readouterr().err
