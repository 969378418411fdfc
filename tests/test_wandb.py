"""W&B logging, checked on real offline run folders (no network, no account).

Each offline run leaves <run>/wandb/offline-run-<time>-<id>/run-<id>.wandb, W&B's transaction
log: a LevelDB-style record log of wandb's own protobuf `Record`s, which `wandb sync` uploads. The
reader below parses it with wandb's protobuf classes, so the tests see exactly what W&B would get.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fast_args, run_cli

from src.errors import SLMError
from src.paths import RunLayout
from src.training import wandb_sink
from src.training.metrics import Console, JsonlSink, Metrics
from src.training.trainer import Interrupted, train

# ----------------------------------------------------------------------------- the .wandb reader


def read_records(path: Path) -> list:
    """Every complete record of a .wandb file (a file cut short by a kill is read up to the cut)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + n > len(data):
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def offline_folders(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def summarize(folder: Path, finished: bool = True) -> dict:
    """What one offline W&B run folder holds: id, name, config, history rows, artifacts, exit.

    finished: wait (a few seconds at most) for the exit record, which W&B's service process
    writes just after `run.finish()` returns.
    """
    path = next(folder.glob("run-*.wandb"))
    for _ in range(100):
        recs = read_records(path)
        if not finished or any(r.WhichOneof("record_type") == "exit" for r in recs):
            break
        time.sleep(0.1)
    out = {"id": None, "history": [], "artifacts": [], "exit": False, "preempting": False,
           "summary": {}, "exit_code": None}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["name"], out["project"] = r.run.run_id, r.run.display_name, r.run.project
            out["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            out["group"], out["tags"] = r.run.run_group, list(r.run.tags)
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in r.history.item})
        elif kind == "artifact":
            out["artifacts"].append({"name": r.artifact.name, "type": r.artifact.type,
                                     "aliases": list(r.artifact.aliases),
                                     "files": [e.path for e in r.artifact.manifest.contents],
                                     "local": [e.local_path for e in r.artifact.manifest.contents],
                                     "metadata": json.loads(r.artifact.metadata or "{}")})
        elif kind == "config":  # updates after the start (e.g. compiled: false)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            for i in r.summary.update:
                if i.key:
                    out["summary"][i.key] = json.loads(i.value_json)
        elif kind == "exit":
            out["exit"], out["exit_code"] = True, r.exit.exit_code
        elif kind == "preempting":
            out["preempting"] = True
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def wandb_env(monkeypatch, tmp_path_factory):
    """Offline W&B with its caches in a temporary folder (nothing written to $HOME)."""
    home = tmp_path_factory.mktemp("wandb-home")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # An in-process run exports its W&B service's address; child processes must start their own
    # (as every real run does), or they would share this one's open runs.
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One data root for the module: the corpus is tokenized once, each test has its own run."""
    return tmp_path_factory.mktemp("root")


def _cfg(fast_cfg, name, **kw):
    base = dict(name=name, training__max_steps=12, training__checkpoint_every=4,
                training__eval_every=4, training__log_every=2, wandb__tags=["test", "offline"],
                wandb__group="tests")
    return fast_cfg(**{**base, **kw})


# ----------------------------------------------------------------------------- a real offline run


def test_a_failed_compile_is_loud_and_recorded(fast_cfg, root, monkeypatch, capsys, one_thread):
    """A real torch.compile failure (Inductor with no working C++ compiler): one warning, the run
    trains eagerly to the end, and compiled: false is in metrics.jsonl and the W&B config."""
    import torch._inductor.config as inductor

    from src.training import trainer as tr
    from src.training.metrics import read_metrics

    monkeypatch.setattr(tr, "COMPILE_DEVICES", ("cuda", "cpu"))  # compile here too
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))
    cfg = _cfg(fast_cfg, "wb-nocompile", training__compile=True, training__max_steps=4)
    res = train(cfg, data_root=root, device="cpu")
    out = capsys.readouterr().out
    assert res.step == 4 and out.count("WARNING: torch.compile failed") == 1
    assert "InductorError" in out and "training.compile: false" in out
    run = RunLayout(root, "wb-nocompile")
    assert {"step": 1, "compiled": False} in read_metrics(run.metrics)
    [folder] = offline_folders(run.run_dir)
    assert summarize(folder)["config"]["compiled"] is False


def test_an_eager_run_records_compiled_false_quietly(fast_cfg, root, capsys, one_thread):
    from src.training.metrics import read_metrics

    train(_cfg(fast_cfg, "wb-eager", training__max_steps=2), data_root=root, device="cpu")
    assert "torch.compile" not in capsys.readouterr().out
    assert {"step": 1, "compiled": False} in read_metrics(RunLayout(root, "wb-eager").metrics)


def test_offline_run_has_logged_keys_and_resume_continues_same_run(fast_cfg, root, capsys):
    cfg = _cfg(fast_cfg, "wb-resume")
    run_dir = root / "checkpoints" / "wb-resume"

    def preempt(path):
        if path.name == "step_8.pt":
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 9, saves, stops

    with pytest.raises(Interrupted):
        train(cfg, data_root=root, device="cpu", on_checkpoint=preempt)
    first_out = capsys.readouterr().out
    [first] = offline_folders(run_dir)
    a = summarize(first)
    run_id = torch.load(run_dir / "step_9.pt", weights_only=True)["wandb_run_id"]
    assert a["id"] == run_id and len(run_id) == 8
    assert a["exit"] and a["preempting"], "SIGTERM must finish the W&B run cleanly, as preempted"
    assert a["exit_code"] == 0, "a run stopped to be resumed must not show as failed"
    assert a["summary"]["status"].startswith("stopped by SIGTERM at step 9")
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert "wandb sync --include-online" in first_out
    # The samples table is incremental: each log sends only the new rows.
    incs = [h for h in a["history"] if h.get("samples/_type") == "incremental-table-file"]
    assert [[r[0] for r in json.loads((first / "files" / h["samples/path"]).read_text())["data"]]
            for h in incs] == [[4], [8]]

    res = train(cfg, data_root=root, device="cpu")
    out = capsys.readouterr().out
    assert res.step == 12
    folders = offline_folders(run_dir)
    assert len(folders) == 2
    b = summarize(folders[1])
    assert b["id"] == run_id, "a resumed run continues the same W&B run"
    steps_a = [h["_step"] for h in a["history"]]
    steps_b = [h["_step"] for h in b["history"]]
    assert max(steps_a) <= 9 < min(steps_b), "steps keep increasing across the resume"
    assert steps_b == sorted(steps_b)

    # What W&B gets: the run's identity and full config ...
    assert (b["name"], b["project"], b["group"]) == ("wb-resume", "slm-from-scratch", "tests")
    assert sorted(b["tags"]) == ["offline", "test"]
    assert b["config"]["training"]["learning_rate"] == cfg.training.learning_rate
    assert b["config"]["model"]["vocab_size"] == cfg.model.vocab_size
    assert b["config"]["run"]["params"] > 0 and b["config"]["run"]["world_size"] == 1
    # ... the metrics ...
    keys = set().union(*(h.keys() for h in a["history"] + b["history"]))
    for k in ("train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens", "tokens_per_sec",
              "eta_seconds", "progress", "memory/peak_rss_gb"):
        assert k in keys, f"{k} not logged to W&B"
    tokens = [h["tokens"] for h in a["history"] + b["history"] if "tokens" in h]
    assert tokens == sorted(tokens) and tokens[-1] == res.tokens
    # ... samples as a table of (step, prompt, text), keeping the first attempt's rows ...
    tables = [h for h in b["history"] if h.get("samples/_type") == "incremental-table-file"]
    assert len(tables) == 1  # the resumed attempt's first increment carries the earlier rows
    table = json.loads((folders[1] / "files" / tables[-1]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert [r[0] for r in table["data"]] == [4, 8, 12]
    # ... the final model as an artifact (the best one: validation loss fell all along) ...
    [art] = [x for x in b["artifacts"] if x["type"] == "model"]
    assert art["name"] == "wb-resume-model" and art["files"] == ["wb-resume_final.pt"]
    assert {"final", "best", "latest"} <= set(art["aliases"])
    assert art["metadata"]["val/loss"] == pytest.approx(res.val_loss)
    assert b["summary"]["val/loss"] == pytest.approx(res.val_loss)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if "train/loss" in r][-1]
    assert b["summary"]["final/train_loss"] == pytest.approx(last_train["train/loss"])
    assert b["summary"]["tokens"] == res.tokens and b["summary"]["status"] == "finished"
    assert b["exit"] and b["exit_code"] == 0
    assert f"cd {run_dir / 'wandb'} && wandb sync --include-online ." in out


def train_with_hook(hook: str, root: Path, args: list[str]):
    """Train in a fresh process whose on_checkpoint(p) runs `hook` (Python, p is the path)."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from src.cli import build_parser, load_cfg\n"
        "from src.training.trainer import train\n"
        "cfg = load_cfg(*build_parser().parse_known_args(['train', *sys.argv[2:]]))\n"
        "def hook(p):\n" + "".join(f"    {line}\n" for line in hook.strip().splitlines()) +
        "train(cfg, data_root=sys.argv[1], device='cpu', on_checkpoint=hook)\n"
    )
    return subprocess.run([sys.executable, "-c", script, str(root), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_keeps_its_wandb_run_id(corpus, root):
    """SIGKILL right after step 4's checkpoint (no chance to clean up); the re-run continues."""
    args = fast_args(corpus, name="wb-kill", training__max_steps=8, training__eval_every=4)
    kill = "if p.name == 'step_4.pt':\n    os.kill(os.getpid(), signal.SIGKILL)"
    p = train_with_hook(kill, root, args)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run_dir = root / "checkpoints" / "wb-kill"
    run_id = torch.load(run_dir / "step_4.pt", weights_only=True)["wandb_run_id"]

    r = run_cli("train", "--data-root", root, "--device", "cpu", "--samples", "0", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "wandb sync" in r.stdout, r.stdout + r.stderr
    first, second = offline_folders(run_dir)
    # The killed attempt's .wandb file may hold only what W&B flushed before the kill (it
    # flushes every 15 s); its folder still carries the run id.
    assert first.name.endswith(f"-{run_id}")
    b = summarize(second)
    assert b["id"] == run_id, "the re-run continues the same W&B run"
    assert min(h["_step"] for h in b["history"]) > 4
    assert torch.load(run_dir / "final.pt", weights_only=True)["wandb_run_id"] == run_id


def test_run_killed_before_its_first_checkpoint_keeps_its_wandb_run_id(corpus, root):
    """SIGKILL before any checkpoint: the run id lives in the run folder from the start."""
    args = fast_args(corpus, name="wb-early", training__max_steps=100000,
                     training__checkpoint_every=100000, training__eval_every=100000)
    run_dir = root / "checkpoints" / "wb-early"
    p = subprocess.Popen([sys.executable, "-m", "src", "train", "--data-root", str(root),
                          "--device", "cpu", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until W&B has started (its folder exists) and a few steps ran
            if offline_folders(run_dir) and (run_dir / "metrics.jsonl").is_file() \
                    and (run_dir / "metrics.jsonl").stat().st_size:
                break
            time.sleep(0.2)
    finally:
        p.kill()
        p.wait()
    assert not list(run_dir.glob("step_*.pt")), "the test needs a kill before any checkpoint"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert offline_folders(run_dir)[0].name.endswith(f"-{run_id}")

    short = fast_args(corpus, name="wb-early", training__max_steps=4)
    r = run_cli("train", "--data-root", root, "--device", "cpu", "--samples", "0", *short)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = offline_folders(run_dir)
    assert second.name.endswith(f"-{run_id}") and summarize(second)["id"] == run_id
    assert torch.load(run_dir / "final.pt", weights_only=True)["wandb_run_id"] == run_id


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds W&B's process in /proc")
def test_wandb_crash_mid_run_does_not_stop_training(corpus, root):
    """W&B's background process dies mid-run: a warning; checkpoints and metrics.jsonl go on."""
    crash_wandb = """
if p.name != 'step_4.pt':
    return
for stat in Path('/proc').glob('[0-9]*/stat'):  # kill our child: W&B's service process
    f = stat.read_text().rsplit(')', 1)[1].split()
    if int(f[1]) == os.getpid():
        os.kill(int(stat.parent.name), signal.SIGKILL)
"""
    args = fast_args(corpus, name="wb-crash", training__max_steps=12, training__eval_every=4)
    p = train_with_hook(crash_wandb, root, args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: W&B failed" in p.stdout and "training continues" in p.stdout
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    run_dir = root / "checkpoints" / "wb-crash"
    assert (run_dir / "final.pt").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 12
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8, 12]


# ----------------------------------------------------------------------------- best checkpoint


def test_best_checkpoint_is_uploaded_when_the_final_model_is_worse(fast_cfg, root, tmp_path):
    """A real offline sink fed rows where validation got worse after step 4."""
    cfg = _cfg(fast_cfg, "wb-best")
    res = train(cfg, data_root=root, device="cpu", use_wandb=False)
    layout = RunLayout(tmp_path, "wb-best")
    run_dir = layout.run_dir
    run_dir.mkdir(parents=True)
    ckpt4 = run_dir / "step_4.pt"
    ckpt4.write_bytes(res.final_checkpoint.read_bytes())
    model_path = layout.model_final
    model_path.parent.mkdir()
    model_path.write_bytes(res.model_path.read_bytes())

    logs = []
    sink = wandb_sink.open_wandb(cfg, layout, None, False, log=logs.append)
    sink.log({"step": 4, "tokens": 100, "val/loss": 2.0, "val/bpb": 1.0})
    sink.on_checkpoint(ckpt4, 4)
    ckpt4.unlink()  # pruned by keep_last: the best survives as best.pt
    sink.log({"step": 8, "tokens": 200, "val/loss": 3.0, "val/bpb": 1.5})
    sink.on_checkpoint(run_dir / "step_8.pt", 8)  # worse: not the best (file never read)
    sink.on_final(run_dir / "final.pt", model_path, {"val/loss": 3.1, "val/bpb": 1.6})
    sink.close()

    best_model = model_path.with_name("wb-best_best.pt")
    state = torch.load(best_model, weights_only=True)
    assert "optimizer_state_dict" not in state and state["val_loss"] == 2.0
    assert not (run_dir / "best.pt").exists()
    arts = summarize(offline_folders(run_dir)[0])["artifacts"]
    best, final = [a for a in arts if a["type"] == "model"]  # W&B's "latest": the last logged
    assert best["name"] == final["name"] == "wb-best-model"
    assert best["files"] == ["wb-best_best.pt"] and final["files"] == ["wb-best_final.pt"]
    assert {"best", "step-4"} <= set(best["aliases"]) and "final" not in best["aliases"]
    assert {"latest", "final"} <= set(final["aliases"]) and "best" not in final["aliases"]
    assert best["metadata"]["val/loss"] == 2.0 and best["metadata"]["step"] == 4
    # The files W&B uploads at sync time live inside the run folder (on Modal: on the volume),
    # as hard links: no second copy in a staging folder elsewhere ...
    wandb_dir = run_dir / "wandb"
    for art, model in ((best, best_model), (final, model_path)):
        [local] = art["local"]
        assert not Path(local).is_absolute(), local
        assert os.path.samefile(wandb_dir / local, model)
    assert not any((Path(os.environ["WANDB_DATA_DIR"]) / "artifacts" / "staging").glob("*"))
    # ... named relative to the wandb/ folder, where the printed sync command runs: a copy of
    # that folder elsewhere (`modal volume get`), with the originals gone, still has the models.
    want = {p.name: p.read_bytes() for p in (best_model, model_path)}
    copy = tmp_path / "elsewhere" / "wb-best-wandb"
    shutil.copytree(wandb_dir, copy)
    shutil.rmtree(run_dir)
    shutil.rmtree(model_path.parent)
    [folder] = sorted(copy.glob("offline-run-*"))
    for art in summarize(folder)["artifacts"]:
        if art["type"] == "model":
            [local], [name] = art["local"], art["files"]
            assert (copy / local).read_bytes() == want[name]
    assert any("cd " in x and "&& wandb sync --include-online ." in x for x in logs)


def test_summary_holds_the_best_and_the_final_numbers(fast_cfg, tmp_path):
    """Validation got worse after step 4: the summary keeps the best (and its step) and the last."""
    cfg = _cfg(fast_cfg, "wb-summary", wandb__log_model=False)
    layout = RunLayout(tmp_path, "wb-summary")
    layout.run_dir.mkdir(parents=True)
    sink = wandb_sink.open_wandb(cfg, layout, None, False, log=lambda *a: None)
    m = Metrics([JsonlSink(layout.metrics, None), sink])
    m.log({"step": 2, "tokens": 50, "time": 1.0, "train/loss": 4.0, "cost_usd": 0.01})
    m.log({"step": 4, "tokens": 100, "time": 2.0, "train/loss": 3.0, "cost_usd": 0.02})
    m.log({"step": 4, "tokens": 100, "val/loss": 2.0, "val/bpb": 1.0})
    m.log({"step": 8, "tokens": 200, "time": 4.0, "train/loss": 2.5, "cost_usd": 0.04})
    m.log({"step": 8, "tokens": 200, "val/loss": 3.0, "val/bpb": 1.5})
    m.call("on_final", layout.final, layout.model_final, {"val/loss": 3.0, "val/bpb": 1.5})
    m.close()
    got = summarize(offline_folders(layout.run_dir)[0])["summary"]
    assert (got["val/loss"], got["val/bpb"], got["best/step"]) == (2.0, 1.0, 4)
    assert (got["final/val_loss"], got["final/val_bpb"]) == (3.0, 1.5)
    assert got["final/train_loss"] == got["train/loss"] == 2.5, "the last value, not the lowest"
    assert (got["tokens"], got["time"], got["cost_usd"]) == (200, 4.0, 0.04)


# ----------------------------------------------------------------------------- modes and keys


def _no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_online_without_key_is_refused_before_anything_runs(monkeypatch, tmp_path, fast_cfg):
    _no_credentials(monkeypatch, tmp_path)
    cfg = fast_cfg(wandb__mode="online")
    with pytest.raises(SLMError, match="no API key was found: run `wandb login`"):
        wandb_sink.check_online_ready(cfg)

    monkeypatch.setenv("WANDB_API_KEY", "<your-wandb-api-key>")  # pasted from the guide
    with pytest.raises(SLMError, match=r"\$WANDB_API_KEY is not valid"):
        wandb_sink.check_online_ready(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    wandb_sink.check_online_ready(cfg)

    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'b' * 40}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    wandb_sink.check_online_ready(cfg)  # `wandb login` stores the key there

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over the config
    wandb_sink.check_online_ready(cfg)


def test_cli_reports_missing_key_before_preparing_data(monkeypatch, tmp_path, corpus):
    _no_credentials(monkeypatch, tmp_path)
    r = run_cli("train", "--data-root", tmp_path / "d", *fast_args(corpus, wandb__mode="online"),
                timeout=120)
    assert r.returncode == 2
    assert "no API key" in r.stderr and "--no-wandb" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists(), "nothing may run before the key problem is reported"


def test_mode_resolution(monkeypatch, fast_cfg):
    cfg = fast_cfg(wandb__mode="online")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_sink.resolve_mode(cfg) == "online"
    for env, mode in [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled"),
                      ("ONLINE", "online")]:
        monkeypatch.setenv("WANDB_MODE", env)
        assert wandb_sink.resolve_mode(cfg) == mode
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(SLMError, match="WANDB_MODE"):
        wandb_sink.resolve_mode(cfg)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_sink.open_wandb(cfg, RunLayout(Path("unused"), "x"), None, False) is None


def test_unreachable_server_falls_back_to_offline(monkeypatch, tmp_path, fast_cfg):
    """Online with a key but no route to W&B: a warning and an offline folder, not a hang."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = fast_cfg(name="wb-unreachable", wandb__mode="online")
    logs = []
    sink = wandb_sink.open_wandb(cfg, RunLayout.of_run_dir(tmp_path), "abcd1234", False,
                                 log=logs.append)
    assert sink.mode == "offline"
    assert any("cannot reach the W&B server" in x for x in logs)
    sink.log({"step": 1, "train/loss": 5.0})
    sink.close()
    assert any("wandb sync" in x for x in logs)
    s = summarize(offline_folders(tmp_path)[0])
    assert s["id"] == "abcd1234" and s["history"][0]["train/loss"] == 5.0


def test_online_start_that_times_out_falls_back_to_a_complete_offline_run(
        monkeypatch, tmp_path, fast_cfg):
    """A server that accepts connections and never answers: the start times out, W&B's service
    still holds the run id; the fallback must still write a whole offline run with that id."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # the kernel accepts connections; nobody ever reads or answers
    try:
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
        cfg = fast_cfg(name="wb-silent-server", wandb__mode="online")
        logs = []
        sink = wandb_sink.open_wandb(cfg, RunLayout.of_run_dir(tmp_path), "feed1234", False,
                                     log=logs.append)
        assert sink is not None and sink.mode == "offline", logs
        assert any("logging offline instead" in x for x in logs)
        sink.log({"step": 1, "train/loss": 5.0})
        sink.close()
    finally:
        server.close()
    s = summarize(offline_folders(tmp_path)[0])
    assert s["id"] == "feed1234" and s["history"][0]["train/loss"] == 5.0 and s["exit"]


# ----------------------------------------------------------------------------- sinks and console


def test_failing_sink_is_dropped_and_the_others_continue(tmp_path):
    logs = []
    jsonl = JsonlSink(tmp_path / "metrics.jsonl", None)
    broken = JsonlSink(tmp_path / "other.jsonl", None)
    broken.f.close()  # writing now raises ValueError
    m = Metrics([broken, jsonl], log=logs.append)
    for step in (1, 2):
        m.log({"step": step, "train/loss": 1.0})
    m.close()
    assert len(logs) == 1 and "switched off" in logs[0] and "metrics.jsonl" in logs[0]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]


ROW = {"step": 120, "tokens": 491520, "train/loss": 2.5, "lr": 3e-3, "tokens_per_sec": 12345.0,
       "mfu": 0.4, "eta_seconds": 185.0, "progress": 0.2, "cost_usd": 0.12}


def test_console_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    c = Console(600, out=out)
    c.log(ROW)
    c.log({"step": 120, "val/loss": 2.25, "val/bpb": 1.1,
           "samples": [{"prompt": "def ", "text": "f(x):"}]})
    c.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("step    120/600 | loss 2.5000 | lr 3.00e-03 | 12.3k tok/s | MFU 40.0% | "
                        "ETA 3m05s | $0.12")
    assert lines[1] == "step    120 | val loss 2.2500 | val bpb 1.1000"
    assert "def f(x):" in out.getvalue() and "\r" not in out.getvalue()


def test_console_bar_on_a_terminal():
    out = io.StringIO()
    c = Console(600, out=out, bar=True)
    c.log(ROW)
    c.log({"step": 120, "val/loss": 2.25, "val/bpb": 1.1})
    c.close()
    text = out.getvalue()
    assert " 20%|" in text and "loss 2.5000" in text and "12.3k tok/s" in text
    assert "MFU 40.0%" in text and "ETA 3m05s" in text and "val loss 2.2500" in text


def test_console_shows_progress_in_the_budgets_unit():
    row = {**ROW, "time": 35.0}
    out = io.StringIO()
    Console(100000, out=out, max_seconds=180).log(row)  # the time budget ends the run first
    assert out.getvalue().startswith("step    120 | 0m35s/3m00s | loss 2.5000")
    out = io.StringIO()
    Console(100000, out=out, max_tokens=2_000_000).log(row)
    assert out.getvalue().startswith("step    120 | 491.5k/2.0M tokens | loss")
    out = io.StringIO()
    Console(100000, out=out, max_cost=0.5).log(row)
    assert out.getvalue().startswith("step    120 | $0.12/$0.50 | loss")
    assert "/100000" not in out.getvalue()


def test_messages_print_above_the_bar_not_onto_it():
    out = io.StringIO()
    c = Console(600, out=out, bar=True)
    say = c.through(lambda text: print(text, file=out))
    c.log(ROW)
    say("done: step 600")
    c.close()
    lines = [x.strip() for x in out.getvalue().replace("\r", "\n").splitlines()]
    assert "done: step 600" in lines, out.getvalue()


def test_wandb_warnings_are_shown(fast_cfg, tmp_path, capfd, monkeypatch):
    """W&B's own warnings (here: rows it drops) reach the console; its banners do not."""
    import wandb

    monkeypatch.delenv("WANDB_SILENT", raising=False)  # the tests' default; users lack it
    wandb.teardown()  # W&B read its settings (WANDB_SILENT) once per process: read them again
    cfg = fast_cfg(name="wb-warn")
    sink = wandb_sink.open_wandb(cfg, RunLayout.of_run_dir(tmp_path), None, False,
                                 log=lambda *a: None)
    sink.log({"step": 5, "train/loss": 1.0})
    sink.run.log({"train/loss": 2.0}, step=3)  # W&B drops it: steps must increase
    sink.close()
    err = capfd.readouterr().err
    assert "WARNING" in err and "step 3" in err
    assert "View project at" not in err and "Tracking run with wandb" not in err
