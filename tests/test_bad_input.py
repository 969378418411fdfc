"""Bad input, tried on purpose: every case exits with status 2 and one message that names the
input and the fix, never a traceback from inside a library.

The table runs the `slm` command's own entry point (`src.cli.main`) in this process, so it is
quick; an exception that escaped main would fail the test just as a traceback would.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, fast_args, run_cli

from src.cli import build_parser, main
from src.training.config import load_config
from src.training.trainer import train

TRAIN = ["train", "--no-wandb", "--device", "cpu", "--samples", "0"]


@pytest.fixture(scope="module")
def env(corpus, tmp_path_factory):
    """A trained tiny run, and a folder of broken files made from it."""
    n = torch.get_num_threads()
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      {**FAST, "data.source": str(corpus), "training.max_steps": 4,
                       "training.threads": 1})
    train(cfg, data_root=root, device="cpu", use_wandb=False, log=lambda *a: None)
    torch.set_num_threads(n)
    bad = tmp_path_factory.mktemp("bad")
    final = root / "checkpoints/tiny/final.pt"
    good = final.read_bytes()

    (bad / "malformed.yaml").write_text("model:\n  n_layer: [1\n")
    (bad / "indent.yaml").write_text("model:\n n_layer: 2\n  n_head: 3\n")
    (bad / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (bad / "list.yaml").write_text("- model\n- data\n")
    (bad / "empty_dir").mkdir()
    (bad / "empty_files").mkdir()
    (bad / "empty_files/a.txt").write_text("")
    (bad / "empty_files/b.txt").write_text("")
    (bad / "latin1").mkdir()
    (bad / "latin1/a.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (bad / "rows.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (bad / "fields.jsonl").write_text('{"body": "no text field here"}\n')
    (bad / "notes.pt").write_text("these are my notes, not a model\n")
    (bad / "truncated.pt").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        flipped[i] ^= 0xFF
    (bad / "damaged.pt").write_bytes(bytes(flipped))
    state = torch.load(final, weights_only=True)
    # the seed guide's own checkpoint layout: weights and optimizer, no config or tokenizer
    torch.save({"model_state_dict": state["model_state_dict"],
                "optimizer_state_dict": state["optimizer_state_dict"], "step": 4},
               bad / "other_tool.pt")
    edited = dict(state, model_state_dict={k: v for k, v in state["model_state_dict"].items()
                                           if "wte" not in k})
    torch.save(edited, bad / "edited.pt")
    return {"root": root, "bad": bad, "final": final, "model": root / "models/tiny_final.pt",
            "corpus": corpus}


def _train(e, *extra, **kw):
    """A fast training command over the trained run's data folder (its shards are cached)."""
    return [*TRAIN, "--data-root", e["root"], *fast_args(e["corpus"], **kw), *extra]


B = "bad"
# (case, argv from env, what the message must name: the input and the fix)
CASES = [
    # --- config files and overrides
    ("malformed YAML", lambda e: ["train", "--config", e[B] / "malformed.yaml"],
     ["malformed.yaml", "not valid YAML at line 3"]),
    ("YAML bad indentation", lambda e: ["train", "--config", e[B] / "indent.yaml"],
     ["indent.yaml", "not valid YAML at line 3, column 9"]),
    ("config not UTF-8", lambda e: ["train", "--config", e[B] / "latin1.yaml"],
     ["latin1.yaml", "not UTF-8", "save the config as UTF-8"]),
    ("config not a mapping", lambda e: ["train", "--config", e[B] / "list.yaml"],
     ["list.yaml", "expected sections (model:, data:, training:"]),
    ("config file missing", lambda e: ["train", "--config", "configs/nope.yaml"],
     ["config file not found: configs/nope.yaml", "configs/tiny.yaml"]),
    ("unknown key", lambda e: _train(e, "--model.n_layr", "3"),
     ["model.n_layr: unknown key", "did you mean 'n_layer'?"]),
    ("unknown section", lambda e: _train(e, "--trainig.max_steps", "3"),
     ["trainig: unknown key", "did you mean 'training'?"]),
    ("wrong type", lambda e: _train(e, "--model.n_layer", "abc"),
     ["model.n_layer", "valid integer", "'abc'"]),
    ("out of range", lambda e: _train(e, "--training.batch_size", "0"),
     ["training.batch_size", "greater than or equal to 1", "(got 0)"]),
    ("out of range (float)", lambda e: _train(e, "--training.learning_rate", "-1"),
     ["training.learning_rate", "greater than 0"]),
    ("not a choice", lambda e: _train(e, "--data.tokenizer", "wordpiece"),
     ["data.tokenizer", "'bpe', 'bytes', 'char' or 'gpt2'", "'wordpiece'"]),
    ("cross-key: seq_len > block_size", lambda e: _train(e, "--training.seq_len", "999"),
     ["training.seq_len: 999 is longer than model.block_size 64", "lower seq_len"]),
    ("cross-key: vocab < tokenizer", lambda e: _train(e, "--model.vocab_size", "300"),
     ["model.vocab_size: 300 is smaller than the bpe tokenizer's 512", "at least 512"]),
    ("cross-key: n_embd % n_head", lambda e: _train(e, "--model.n_head", "3"),
     ["model", "n_embd (64) must be divisible by n_head (3)"]),
    ("bad run name", lambda e: _train(e, "--name", "my/run"),
     ["name:", "use letters, digits", "'my/run'"]),
    ("override without a value", lambda e: [*TRAIN, "--training.learning_rate"],
     ["option --training.learning_rate needs a value"]),
    ("not a config key", lambda e: [*TRAIN, "--bogus"],
     ["unknown option '--bogus'", "--section.key value"]),
    ("override into a value", lambda e: _train(e, "--model.n_layer.x", "3"),
     ["override model.n_layer.x", "'n_layer' is not a section"]),
    # --- Modal GPUs
    ("GPU Modal does not know", lambda e: _train(e, "--modal.gpu", "X100"),
     ["modal.gpu", "unknown GPU 'X100'", "did you mean H100?", "A100-80GB"]),
    ("GPU count past 8", lambda e: _train(e, "--modal.gpu", "H100:9"),
     ["modal.gpu", "GPU count 9 in 'H100:9'", "1 to 8"]),
    ("A10 past Modal's cap of 4", lambda e: _train(e, "--modal.gpu", "A10:8"),
     ["modal.gpu", "GPU count 8 in 'A10:8'", "1 to 4"]),
    ("cluster without whole hosts", lambda e: _train(e, "--modal.nodes", "2"),
     ["modal.nodes: 2 containers need all GPUs of each host", "H100:8"]),
    # --- data sources
    ("data source missing", lambda e: _train(e, **{"data.source": "/no/such/corpus"}),
     ["data.source /no/such/corpus: no such file or folder", "python-stdlib"]),
    ("data source empty folder", lambda e: _train(e, **{"data.source": e[B] / "empty_dir"}),
     ["empty_dir: the folder has no", ".txt"]),
    ("data source of empty files", lambda e: _train(e, **{"data.source": e[B] / "empty_files"}),
     ["empty_files: no text found", "point data.source at files that hold text"]),
    ("text not UTF-8", lambda e: _train(e, **{"data.source": e[B] / "latin1"}),
     ["latin1/a.txt: not UTF-8 text (bad byte near offset 3)", "iconv"]),
    ("JSONL row not JSON", lambda e: _train(e, **{"data.source": e[B] / "rows.jsonl"}),
     ["rows.jsonl: not valid JSON lines", "fix the file"]),
    ("JSONL row without the field", lambda e: _train(e, **{"data.source": e[B] / "fields.jsonl"}),
     ["fields.jsonl: the rows have no 'text' column (they have: body)", "data.text_field"]),
    # --- checkpoints given to `slm sample`
    ("sample: no such file", lambda e: ["sample", e[B] / "nope.pt"],
     ["nope.pt does not exist"]),
    ("sample: not a checkpoint", lambda e: ["sample", e[B] / "notes.pt"],
     ["notes.pt is not a usable checkpoint", "not a PyTorch checkpoint", "use another"]),
    ("sample: truncated", lambda e: ["sample", e[B] / "truncated.pt"],
     ["truncated.pt is not a usable checkpoint: it is truncated", "use another"]),
    ("sample: damaged", lambda e: ["sample", e[B] / "damaged.pt"],
     ["damaged.pt is not a usable checkpoint: it is damaged", "fails its checksum"]),
    ("sample: another tool's checkpoint", lambda e: ["sample", e[B] / "other_tool.pt"],
     ["other_tool.pt has no config or tokenizer", "not written by slm"]),
    ("sample: weights that do not fit", lambda e: ["sample", e[B] / "edited.pt"],
     ["edited.pt: its weights do not fit", "transformer.wte.weight"]),
    ("sample: a folder", lambda e: ["sample", e["root"] / "checkpoints"],
     ["checkpoints is a folder", "final.pt"]),
    # --- checkpoints given to `slm train --resume`
    ("resume: another model shape",
     lambda e: _train(e, "--resume", e["final"], "--name", "shape", **{"model.n_layer": 3}),
     ["final.pt is from a different model shape (model.n_layer=2 there, 3 here)",
      "--resume never"]),
    ("resume: another tokenizer",
     lambda e: _train(e, "--resume", e["final"], "--name", "tok",
                      **{"data.tokenizer": "bytes", "model.vocab_size": 512}),
     ["final.pt was trained with another tokenizer", "use the same data config"]),
    ("resume: a finished model file", lambda e: _train(e, "--resume", e["model"], "--name", "m"),
     ["tiny_final.pt cannot be resumed from: it has no optimizer_state_dict",
      "checkpoints/<name>/step_N.pt or final.pt"]),
    ("resume: another tool's checkpoint",
     lambda e: _train(e, "--resume", e[B] / "other_tool.pt", "--name", "o"),
     ["other_tool.pt cannot be resumed from", "config"]),
    ("resume: truncated", lambda e: _train(e, "--resume", e[B] / "truncated.pt", "--name", "t"),
     ["truncated.pt is not a usable checkpoint: it is truncated"]),
    ("resume: not a checkpoint", lambda e: _train(e, "--resume", e[B] / "notes.pt", "--name", "n"),
     ["notes.pt is not a usable checkpoint"]),
    ("resume: weights that do not fit",
     lambda e: _train(e, "--resume", e[B] / "edited.pt", "--name", "w"),
     ["edited.pt: its weights do not fit"]),
    ("resume: no such file", lambda e: _train(e, "--resume", e[B] / "nope.pt", "--name", "x"),
     ["checkpoint", "nope.pt does not exist"]),
]


@pytest.mark.parametrize("case, argv, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(case, argv, needles, env, capsys):
    _expect_clear_error(argv(env), needles, capsys)


def _expect_clear_error(argv, needles, capsys):
    n = torch.get_num_threads()
    try:
        rc = main([str(a) for a in argv])
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("error: "))
    # one message: its first line, then only the indented list of a config's problems
    assert all(x.startswith("  ") for x in lines[start + 1:]), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# --- options that need the network, tried offline (a proxy that refuses every connection)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))  # empty
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_gpt2_tokenizer_offline_without_cached_files(env, offline, capsys):
    _expect_clear_error(_train(env, **{"data.tokenizer": "gpt2"}),
                        ["GPT-2's tokenizer files could not be loaded", "TIKTOKEN_CACHE_DIR",
                         "data.tokenizer: bpe"], capsys)


@pytest.mark.parametrize("source", ["hf:roneneldan/TinyStories",
                                    "https://example.com/tinyshakespeare.txt"])
def test_network_data_sources_offline(source, env, offline, capsys):
    # Whatever this version supports for hub and URL sources, offline it is one clear error
    # that names the source.
    _expect_clear_error(_train(env, **{"data.source": source}), [source], capsys)


def test_wandb_online_without_a_key(env, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored login either
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = [a for a in _train(env, **{"wandb.mode": "online"}) if a != "--no-wandb"]
    _expect_clear_error(argv, ["W&B logging is online but no API key", "wandb login",
                               "--no-wandb"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_that_is_not_there(env, capsys):
    argv = [*_train(env)]
    argv[argv.index("cpu")] = "cuda"
    _expect_clear_error(argv, ["no CUDA GPU"], capsys)



# ----------------------------------------------------------------------------- hostile files


def _python_files():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted(ROOT.glob("*.py"))
    return files + sorted((ROOT / "bench").rglob("*.py")) if (ROOT / "bench").is_dir() else files


def _restricted_unpicklers(tree) -> bool:
    """True when the file's only use of pickle is Unpickler subclasses whose find_class can
    refuse (the gate torch's distributed-checkpoint metadata passes before torch reads it)."""
    subclasses = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                  and any(ast.unparse(b) == "pickle.Unpickler" for b in n.bases)]
    guarded = all(any(isinstance(f, ast.FunctionDef) and f.name == "find_class"
                      and any(isinstance(x, ast.Raise) for x in ast.walk(f)) for f in c.body)
                  for c in subclasses)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and ast.unparse(n.func) in ("pickle.load", "pickle.loads", "pickle.Unpickler")]
    return bool(subclasses) and guarded and not calls


def test_no_loader_can_unpickle_code():
    """Every torch.load passes weights_only=True; nothing imports pickle or its relatives, except
    to define a restricted Unpickler (an allow-list in find_class) that vets a file first."""
    loads, problems = 0, []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("cPickle", "dill", "joblib", "cloudpickle")
                       for n in names) or ("pickle" in names and not _restricted_unpicklers(tree)):
                    problems.append(f"{where}: imports a pickle module")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "load" and ast.unparse(node.func.value) == "torch":
                    loads += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = kw.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if node.func.attr == "load" and ast.unparse(node.func.value) in ("np", "numpy"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if "allow_pickle" in kw and ast.unparse(kw["allow_pickle"]) != "False":
                        problems.append(f"{where}: numpy.load with allow_pickle")
    assert loads >= 1  # the check looks at the real loader
    assert problems == []


class _Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(tmp_path, env):
    """Crafted files that run code when unpickled, in each form a .pt can take."""
    marker = tmp_path / "pwned"
    state = torch.load(env["final"], weights_only=True)
    files = {
        # a real checkpoint whose weights entry is a code-running object
        "zip": {**state, "model_state_dict": _Evil(marker)},
        # the object hidden deep inside the optimizer state
        "nested": {**state, "optimizer_state_dict": {"state": {0: {"x": _Evil(marker)}}}},
    }
    out = {}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        out[name] = tmp_path / f"{name}.pt"
    out["raw"] = tmp_path / "raw.pt"  # a bare pickle, no archive around it
    out["raw"].write_bytes(pickle.dumps({"model_state_dict": _Evil(marker)}))
    out["legacy"] = tmp_path / "legacy.pt"  # torch's old non-zip format
    torch.save({"model_state_dict": _Evil(marker)}, out["legacy"],
               _use_new_zipfile_serialization=False)
    return marker, out


def _entry_points(env, path: Path, tmp_path: Path) -> dict[str, list]:
    """Every command that reads a checkpoint, given the crafted file."""
    cmds = {
        "sample": ["sample", path],
        "train --resume PATH": _train(env, "--resume", path, "--name", "evil"),
    }
    # commands that later modules add (eval, export, ...) take the checkpoint first
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        if name not in ("train", "prepare", "sample", "plot", "cost"):
            cmds[name] = [name, path]
    return cmds


@pytest.mark.parametrize("form", ["zip", "nested", "raw", "legacy"])
def test_crafted_pickle_is_refused_by_every_loader(form, hostile, env, tmp_path, capsys):
    marker, files = hostile
    for what, argv in _entry_points(env, files[form], tmp_path).items():
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # a plugin whose arguments differ: argparse refused them
            rc = e.code
        err = capsys.readouterr().err
        assert not marker.exists(), f"{what} ran the code in a {form} pickle"
        assert rc == 2 and "Traceback" not in err, f"{what}: {err}"
        if what in ("sample", "train --resume PATH"):
            assert f"{files[form].name} is not a usable checkpoint" in err, err


def test_crafted_checkpoint_in_a_run_folder_is_skipped_on_resume(hostile, env, tmp_path, capsys):
    """A planted step file is never unpickled: auto-resume skips it and says so."""
    marker, files = hostile
    root = tmp_path / "root"
    shutil.copytree(env["root"], root)
    run = root / "checkpoints" / "tiny"
    (run / "final.pt").rename(run / "step_4.pt")
    shutil.copy(files["zip"], run / "step_999.pt")  # looks newer than step_4.pt
    n = torch.get_num_threads()
    try:
        rc = main([*TRAIN, "--data-root", str(root),
                   *fast_args(env["corpus"], **{"training.max_steps": 6})])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert rc == 0 and not marker.exists()
    assert "skipping step_999.pt" in out and "refuses to unpickle" in out
    assert "resumed from" in out and "step_4.pt at step 4" in out


SECRETS = {
    "WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01secretwandb",
    "MODAL_TOKEN_ID": "ak-secretModalTokenId0123",
    "MODAL_TOKEN_SECRET": "as-secretModalTokenSecret4567",
}


def test_secrets_never_reach_logs_configs_checkpoints_or_metrics(corpus, tmp_path):
    """A real run with W&B logging offline and fake secrets in its environment: none of the
    secrets appears in anything it printed or wrote (run folder, W&B folder, checkpoints, model,
    metrics, config.yaml, dataset)."""
    env = {**SECRETS, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = ["train", "--device", "cpu", "--samples", "1", "--data-root", tmp_path,
            *fast_args(corpus, **{"training.max_steps": 4, "training.eval_every": 4,
                                  "training.threads": 1})]
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written)
    assert any("wandb" in p.parts and p.suffix == ".wandb" for p in written)  # W&B really ran
    assert any(p.name == "config.yaml" for p in written)
    for name, value in SECRETS.items():
        for blob, where in [(r.stdout.encode(), "stdout"), (r.stderr.encode(), "stderr")] + [
            (p.read_bytes(), str(p)) for p in written
        ]:
            assert value.encode() not in blob, f"{name} found in {where}"
            assert value[-12:].encode() not in blob, f"part of {name} found in {where}"
