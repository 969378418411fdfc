"""Hostile input, table-driven: every case runs the real `slm` entry point (`src.cli.main`, in
this process) and must end with exit status 2, exactly one `error:` line that names the input,
no traceback, and every file that was in the work folder before byte-identical after.

The cases are grouped by the promise they try to break: never overwrite the user's files, check
every file format before a library reads it, check every path before work starts, refuse numbers
outside their range, no silent surprises in configs, one-line usage errors.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, fast_args

from src.cli import main
from src.tools.export import export
from src.training.config import load_config
from src.training.trainer import train

LONG = "n" * 300


@pytest.fixture(scope="module")
def work(corpus, tmp_path_factory):
    """A work folder: a trained tiny run, the user's own files, and damaged weight files."""
    n = torch.get_num_threads()
    w = tmp_path_factory.mktemp("hostile")
    root = w / "data"
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      {**FAST, "data.source": str(corpus), "training.max_steps": 2,
                       "training.threads": 1})
    train(cfg, data_root=root, device="cpu", use_wandb=False, log=lambda *a: None)
    torch.set_num_threads(n)
    model = root / "models/tiny_final.pt"
    export(model, w / "good.safetensors", "safetensors")
    _user_files(w)
    _bad_weights(w)
    return {"w": w, "root": root, "model": model, "run": root / "checkpoints/tiny",
            "corpus": corpus}


def _user_files(w: Path) -> None:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        d = w / f"user_hf_{name.split('.')[0]}"
        d.mkdir()
        (d / name).write_text("the user's own file\n")
    (w / "mine.safetensors").write_text("the user's own weights\n")
    (w / "mine.json").write_text("{}\n")
    (w / "side.json").write_text("the user's notes, not slm's\n")
    (w / "mine.gguf").write_text("the user's own gguf\n")
    (w / "plot.png").write_bytes(b"\x89PNG the user's picture")
    (w / "plots").mkdir()
    (w / "folder.safetensors").mkdir()
    (w / "a_file").write_text("a file, not a folder\n")
    (w / "empty_val.txt").write_text("")
    (w / "empty.yaml").write_text("")
    (w / "comments.yaml").write_text("# just a comment\n# and another\n")
    (w / "dup_section.yaml").write_text("model:\n  n_layer: 2\nmodel:\n  n_layer: 4\n")
    (w / "dup_key.yaml").write_text("model:\n  n_layer: 2\n  n_layer: 4\n")
    (w / "dup_top.yaml").write_text("name: a\nname: b\n")
    for name, rows in [("missing", ['{"text": "one"}', '{"body": "two"}']),
                       ("number", ['{"text": 123}', '{"text": 456}']),
                       ("null", ['{"text": "one"}', '{"text": null}']),
                       ("list", ['{"text": ["one", "two"]}'])]:
        (w / f"rows_{name}.jsonl").write_text("\n".join(rows * 50) + "\n")
    zipped = w / "other.zip.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("readme.txt", "not a torch file")
    hf = w / "hf_bad_bin"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2,
                                                "n_embd": 64, "n_positions": 64,
                                                "vocab_size": 512}))
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(), protocol=2))


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_weights(w: Path) -> None:
    """Damaged copies of good.safetensors, each with the good .json beside it."""
    good = (w / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    body = good[8 + n :]
    first = next(k for k in header if k != "__metadata__")

    def with_header(h: dict, data: bytes = body) -> bytes:
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    def edit(**kw) -> bytes:
        h = json.loads(json.dumps(header))
        h[first].update(kw)
        return with_header(h)

    off = header[first]["data_offsets"]
    forms = {
        "lying_length": struct.pack("<Q", len(good) * 4) + good[8:],
        "past_end": edit(data_offsets=[off[0], len(body) + 4096]),
        "wrong_shape": edit(shape=[3, 5]),
        "wrong_dtype": edit(dtype="Q77"),
        "negative_shape": edit(shape=[-1, 64]),
        "truncated": good[: 8 + n + len(body) // 2],
        "not_json": struct.pack("<Q", n) + b"{" * n + body,
        "list_header": with_header([1, 2, 3]),  # type: ignore[arg-type]
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
        "empty": b"",
        "short": b"\x01\x02",
    }
    side = (w / "good.json").read_text()
    for name, data in forms.items():
        (w / f"bad_{name}.safetensors").write_bytes(data)
        (w / f"bad_{name}.json").write_text(side)


BAD_ST = ["lying_length", "past_end", "wrong_shape", "wrong_dtype", "negative_shape",
          "truncated", "not_json", "list_header", "pickle", "empty", "short"]


def _train(e, *extra):
    return ["train", "--no-wandb", "--device", "cpu", "--samples", "0", "--data-root", e["root"],
            *fast_args(e["corpus"]), *extra]


W = "w"
# (case, argv from the work fixture, strings the one error line must contain)
CASES = [
    # --- 1. never overwrite what the user has
    *[(f"export hf into a folder holding the user's {f}",
       lambda e, f=f: ["export", e["model"], "--to", "hf", e[W] / f"user_hf_{f}"],
       [f"user_hf_{f}", "not empty", "--force"])
      for f in ("config", "tokenizer", "model")],
    ("export hf into the run folder", lambda e: ["export", e["model"], "--to", "hf", e["run"]],
     ["not empty", "--force"]),
    ("export safetensors over the user's file",
     lambda e: ["export", e["model"], "--to", "safetensors", e[W] / "mine.safetensors"],
     ["mine.safetensors", "already exists", "--force"]),
    ("export safetensors without suffix onto the user's file",
     lambda e: ["export", e["model"], "--to", "safetensors", e[W] / "mine"],
     ["mine.safetensors", "--force"]),
    ("export safetensors over a sidecar .json the user never named",
     lambda e: ["export", e["model"], "--to", "safetensors", e[W] / "side.safetensors"],
     ["side.json", "--force"]),
    ("export gguf over the user's file",
     lambda e: ["export", e["model"], "--to", "gguf", e[W] / "mine.gguf"],
     ["mine.gguf", "--force"]),
    ("export safetensors onto a folder",
     lambda e: ["export", e["model"], "--to", "safetensors", e[W] / "folder.safetensors"],
     ["folder.safetensors", "is a folder"]),
    ("plot -o over the user's picture",
     lambda e: ["plot", e["run"], "-o", e[W] / "plot.png"], ["plot.png", "--force"]),
    ("plot -o an existing folder", lambda e: ["plot", e["run"], "-o", e[W] / "plots"],
     ["plots", "folder"]),
    ("plot -o without an image suffix", lambda e: ["plot", e["run"], "-o", e[W] / "chart"],
     ["chart", ".png"]),
    ("plot -o with an unknown suffix", lambda e: ["plot", e["run"], "-o", e[W] / "chart.docx"],
     ["chart.docx", ".png"]),
    # --- 2. every file format is checked before a library sees it
    *[(f"sample a {b} safetensors", lambda e, b=b: ["sample", e[W] / f"bad_{b}.safetensors"],
       [f"bad_{b}.safetensors"]) for b in BAD_ST],
    *[(f"eval a {b} safetensors",
       lambda e, b=b: ["eval", e[W] / f"bad_{b}.safetensors", "--data-root", e["root"],
                       "--no-hellaswag"], [f"bad_{b}.safetensors"]) for b in BAD_ST],
    *[(f"export a {b} safetensors",
       lambda e, b=b: ["export", e[W] / f"bad_{b}.safetensors", "--to", "safetensors",
                       e[W] / f"new_{b}.safetensors"], [f"bad_{b}.safetensors"])
      for b in BAD_ST],
    *[(f"init_from a {b} safetensors",
       lambda e, b=b: _train(e, "--name", f"init_{b}", "--model.init_from",
                             e[W] / f"bad_{b}.safetensors"), [f"bad_{b}.safetensors"])
      for b in BAD_ST[::2]],
    ("init_from a folder with a crafted pytorch_model.bin",
     lambda e: _train(e, "--name", "init_bin", "--model.init_from", e[W] / "hf_bad_bin"),
     ["pytorch_model.bin"]),
    *[(f"{cmd} a zip that is not a torch file", lambda e, cmd=cmd: [cmd, e[W] / "other.zip.pt"],
       ["other.zip.pt"]) for cmd in ("sample", "eval")],
    ("export a zip that is not a torch file",
     lambda e: ["export", e[W] / "other.zip.pt", "--to", "hf", e[W] / "new_hf"],
     ["other.zip.pt"]),
    # --- 3. every path slm writes is checked before work starts
    *[(f"{cmd} --data-root that is a file",
       lambda e, cmd=cmd: [cmd, "--data-root", e[W] / "a_file", "--name", "x"],
       ["a_file", "not a folder"]) for cmd in ("train", "prepare")],
    *[(f"{cmd} --data-root under /proc", lambda e, cmd=cmd: [cmd, "--data-root", "/proc/slm"],
       ["/proc/slm", "system folder"]) for cmd in ("train", "prepare")],
    ("train --data-root under a file",
     lambda e: ["train", "--data-root", e[W] / "a_file/data"], ["a_file"]),
    ("export hf under a file",
     lambda e: ["export", e["model"], "--to", "hf", e[W] / "a_file/out"], ["a_file"]),
    ("export safetensors under a file",
     lambda e: ["export", e["model"], "--to", "safetensors", e[W] / "a_file/x.safetensors"],
     ["a_file"]),
    ("export gguf under /proc",
     lambda e: ["export", e["model"], "--to", "gguf", "/proc/x.gguf"], ["/proc"]),
    ("plot to /proc", lambda e: ["plot", e["run"], "-o", "/proc/slm.png"], ["/proc"]),
    ("plot under a file", lambda e: ["plot", e["run"], "-o", e[W] / "a_file/p.png"], ["a_file"]),
    ("export hf with a too-long folder name",
     lambda e: ["export", e["model"], "--to", "hf", e[W] / LONG], ["longer than"]),
    *[(f"{cmd} with a 300-character run name",
       lambda e, cmd=cmd: [cmd, "--data-root", e["root"], "--name", LONG], ["name", "at most"])
      for cmd in ("train", "prepare", "cost")],
    # --- 4. numbers are validated, not clamped
    *[(f"sample {flag} {v}", lambda e, flag=flag, v=v: ["sample", e["model"], flag, v], [flag])
      for flag, v in [("--temperature", "nan"), ("--temperature", "-0.5"),
                      ("--temperature", "inf"), ("--top-k", "-5"), ("--top-k", "-1"),
                      ("--top-k", "many"), ("--top-p", "0"), ("--top-p", "1.5"),
                      ("--top-p", "nan"), ("--top-p", "-0.1"), ("--max-new-tokens", "-3"),
                      ("--max-new-tokens", "0"), ("--num-samples", "0"),
                      ("--num-samples", "-1"), ("--batch-size", "0"), ("--seed", "-1"),
                      ("--max-new-tokens", "1e3")]],
    *[(f"eval {flag} {v}",
       lambda e, flag=flag, v=v: ["eval", e["model"], "--data-root", e["root"],
                                  "--no-hellaswag", flag, v], [flag])
      for flag, v in [("--seq-len", "0"), ("--seq-len", "100000"), ("--batch-size", "0"),
                      ("--eval-tokens", "-1"), ("--hellaswag-limit", "0"),
                      ("--seq-len", "-8")]],
    *[(f"plot --smooth {v}", lambda e, v=v: ["plot", e["run"], "--smooth", v], ["--smooth"])
      for v in ("1", "-0.5", "nan", "2")],
    *[(f"cost --mfu {v}", lambda e, v=v: ["cost", "--mfu", v], ["--mfu"])
      for v in ("0", "1.5", "nan", "-1")],
    *[(f"serve {flag} {v}", lambda e, flag=flag, v=v: ["serve", e["model"], flag, v], [flag])
      for flag, v in [("--port", "0"), ("--port", "70000"), ("--max-batch", "0"),
                      ("--max-tokens", "-1")]],
    *[(f"chat {flag} {v}", lambda e, flag=flag, v=v: ["chat", e["model"], flag, v], [flag])
      for flag, v in [("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "0"),
                      ("--top-p", "2"), ("--top-k", "-1"), ("--max-new-tokens", "0"),
                      ("--seed", "-1")]],
    *[(f"plan {flag} {v}", lambda e, flag=flag, v=v: ["plan", "--gpu", "H100", flag, v], [flag])
      for flag, v in [("--budget", "-5"), ("--budget", "0"), ("--hours", "inf"),
                      ("--flops", "nan"), ("--pick", "0"), ("--tokens-per-param", "-1")]],
    ("train --samples -1", lambda e: ["train", "--samples", "-1"], ["--samples"]),
    ("prepare --workers -2", lambda e: ["prepare", "--workers", "-2"], ["--workers"]),
    # --- 5. memory that cannot be had is refused before allocating
    *[(f"train a model that cannot fit ({k} {v})",
       lambda e, k=k, v=v: _train(e, "--name", "huge", k, v), ["GB", "--ignore-memory"])
      for k, v in [("--model.vocab_size", "100000000"), ("--model.n_embd", "65536"),
                   ("--training.batch_size", "100000000")]],
    # --- 7. no silent surprises in configs
    *[(f"{cmd} {f}", lambda e, cmd=cmd, f=f: [cmd, "--config", e[W] / f, "--data-root",
                                              e["root"]], [f, why])
      for cmd in ("train", "prepare", "cost")
      for f, why in [("empty.yaml", "empty"), ("comments.yaml", "empty"),
                     ("dup_section.yaml", "'model' is given twice"),
                     ("dup_key.yaml", "'n_layer' is given twice"),
                     ("dup_top.yaml", "'name' is given twice")]],
    *[(f"prepare JSON lines whose text is {k}",
       lambda e, k=k: ["prepare", "--data-root", e[W] / "rows_root", "--data.source",
                       e[W] / f"rows_{k}.jsonl", "--data.tokenizer", "bytes"],
       [f"rows_{k}.jsonl", "'text'"]) for k in ("missing", "number", "null", "list")],
    *[(f"{cmd} --name ''", lambda e, cmd=cmd: [cmd, "--name", "", "--data-root", e["root"]],
       ["--name ''"]) for cmd in ("train", "prepare", "cost")],
    # --- 8. messages name the right thing; usage mistakes are one line
    ("resume from a safetensors export",
     lambda e: _train(e, "--resume", e[W] / "good.safetensors"), ["good.safetensors", "export"]),
    ("resume from a run folder", lambda e: _train(e, "--resume", e["run"]),
     ["is a folder", "final.pt"]),
    *[(f"{cmd} with a missing data.val_source",
       lambda e, cmd=cmd: [*_train(e, "--name", "val")[:1], *_train(e, "--name", "val")[6:],
                           "--data.val_source", e[W] / "no_such_val"],
       ["data.val_source", "no_such_val"]) for cmd in ("prepare",)],
    ("train with a missing data.val_source",
     lambda e: _train(e, "--name", "val", "--data.val_source", e[W] / "no_such_val"),
     ["data.val_source", "no_such_val"]),
    ("train with an empty data.val_source",
     lambda e: _train(e, "--name", "val", "--data.val_source", e[W] / "empty_val.txt"),
     ["data.val_source", "empty_val.txt"]),
    ("char tokenizer with a sample_prompt outside its vocabulary",
     lambda e: _train(e, "--name", "snow", "--data.tokenizer", "char",
                      "--training.sample_prompt", "\u2603 snow"), ["training.sample_prompt"]),
    ("unknown command", lambda e: ["trian"], ["trian", "--help"]),
    ("export without --to", lambda e: ["export", e["model"], e[W] / "x"], ["--to"]),
    ("export --to onnx", lambda e: ["export", e["model"], "--to", "onnx", e[W] / "x"],
     ["onnx"]),
    ("sample without a checkpoint", lambda e: ["sample"], ["checkpoint"]),
    ("train --device tpu", lambda e: ["train", "--device", "tpu"], ["tpu"]),
    ("eval --split test", lambda e: ["eval", e["model"], "--split", "test"], ["test"]),
    ("serve --port http", lambda e: ["serve", e["model"], "--port", "http"], ["--port"]),
    ("sample --top-k 2.5", lambda e: ["sample", e["model"], "--top-k", "2.5"], ["--top-k"]),
]


def test_workers_are_capped_at_the_cores():
    from src.data.prepare import _cores, num_workers
    from src.training.config import DataConfig

    notes = []
    assert num_workers(DataConfig(num_workers=500), notes.append) == _cores()
    assert "500" in notes[0] and str(_cores()) in notes[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_the_table_is_large_enough():
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_keeps_every_promise(case, argv, needles, work, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = _hashes(work["w"])
    n = torch.get_num_threads()
    rc = main([str(a) for a in argv(work)])
    torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert rc == 2, f"{case}: exit {rc}\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    msg = err[err.index("error:"):]
    for needle in needles:
        assert needle in msg, f"{case}: {needle!r} not in {msg!r}"
    after = _hashes(work["w"])
    changed = [f for f, h in before.items() if after.get(f) != h]
    assert not changed, f"{case} changed or removed {changed}"
    empty = [d.name for d in (work["root"] / "checkpoints").iterdir()
             if all(p.name == ".lock" for p in d.iterdir())]
    assert not empty, f"{case} left empty run folders {empty}"
    assert "this must never run" not in capsys.readouterr().out


def test_concurrent_prepare_of_one_dataset(corpus, tmp_path):
    """Three `slm prepare` of one new dataset at once: all exit 0 with one identical dataset."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "src", "prepare", "--data-root", str(tmp_path),
            "--data.source", str(corpus), "--data.vocab_size", "300", "--workers", "1"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({o[0].splitlines()[-1] for o in outs}) == 1, outs
    assert not list(tmp_path.rglob("*.tmp"))


def test_exports_use_the_users_umask(work, tmp_path):
    """Exported weights get the permissions of any other file the user creates."""
    export(work["model"], tmp_path / "m.safetensors", "safetensors")
    for f in ("m.safetensors", "m.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may create files in: mode 0555, or for root (whom modes do not stop, and
    tests run as root in CI) the immutable attribute; skipped where neither can be had."""
    import os
    import shutil
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if not chattr or subprocess.run([chattr, "+i", ro], capture_output=True).returncode:
        pytest.skip("root here cannot make a folder unwritable (no chattr +i)")
    try:
        yield ro
    finally:
        subprocess.run([chattr, "-i", ro], capture_output=True)


@pytest.mark.parametrize("args,flag", [
    (["prepare", "--data-root", "{ro}/root"], "--data-root"),
    (["train", "--data-root", "{ro}/root", "--no-wandb"], "--data-root"),
    (["plan", "--budget", "5", "--gpu", "T4", "-o", "{ro}/plan.yaml"], "-o"),
    (["plot", "nosuchrun", "--data-root", "{ro}", "-o", "{ro}/curves.png"], "-o"),
])
def test_an_unwritable_folder_is_one_error_line_before_any_work(args, flag, unwritable, capsys):
    assert main([a.format(ro=unwritable) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not writable" in lines[0]
    assert flag in lines[0], lines[0]
    assert list(unwritable.iterdir()) == []  # nothing was written
