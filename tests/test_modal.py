"""The Modal launcher, offline: what each launch would ask Modal for, and the function bodies run
in-process (`.local()`) with a temporary folder standing in for the /data volume.

No test here talks to Modal's servers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, ROOT

import modal_app
from src.errors import SLMError
from src.training.config import load_config
from src.training.trainer import Interrupted

pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
MODAL_BIN = Path(sys.executable).parent / "modal"


def fast_set(corpus, **kw) -> str:
    """FAST overrides as a --set string (the launcher's own override syntax)."""
    o = {**FAST, "data.source": str(corpus), **{k.replace("__", "."): v for k, v in kw.items()}}
    return " ".join(shlex.quote(f"{k}={'null' if v is None else v}") for k, v in o.items())


def options(fn):
    """The options a with_options() Function would be created with (Modal keeps them privately)."""
    from modal._utils.async_utils import synchronizer

    return synchronizer._translate_in(fn)._options


def offline_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


# ----------------------------------------------------------------------------- the app's settings


def test_import_needs_no_token_and_names_match_the_seed(tmp_path):
    code = ("import modal_app as m; s = m.train._spec_; "
            "print(m.app.name, repr(s.volumes['/data']), [repr(x) for x in s.secrets])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=offline_env(HOME=str(tmp_path)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "slm-training" in r.stdout
    assert "Volume.from_name('slm-data')" in r.stdout
    assert "Secret.from_name('wandb')" in r.stdout


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_launches_with_its_gpu_timeout_and_retries(path):
    cfg = load_config(path)
    opts = modal_app.launch_options(cfg.modal)
    assert opts["gpu"] == cfg.modal.gpu
    assert opts["timeout"] == cfg.modal.timeout <= 86400
    o = options(modal_app.train.with_options(**opts))
    assert o.timeout_secs == cfg.modal.timeout
    assert o.retry_policy.retries == cfg.modal.retries >= 1
    assert o.retry_policy.initial_delay_ms == 0
    gpu = o.resources.gpu_config
    assert (gpu.gpu_type, gpu.count) == (cfg.modal.gpu, 1)
    spec = modal_app.train._spec_  # volume and secret are the function's own, kept by with_options
    assert list(spec.volumes) == ["/data"] and "slm-data" in repr(spec.volumes["/data"])
    assert [repr(s) for s in spec.secrets] == ["modal.Secret.from_name('wandb')"]


def test_seed_configs_use_the_seed_gpus():
    assert load_config(ROOT / "configs/gpt_124m.yaml").modal.gpu == "T4"
    assert load_config(ROOT / "configs/gpt_350m.yaml").modal.gpu == "A100-40GB"
    assert modal_app.DEFAULT_CONFIG == "configs/gpt_124m.yaml"


def test_gpu_and_dotted_overrides_on_the_command_line():
    raw, cfg = modal_app.resolve(modal_app.DEFAULT_CONFIG, "H100:8",
                                 modal_app.split_set("training.learning_rate=1e-3 modal.timeout=3600"))
    assert (cfg.modal.gpu, cfg.modal.timeout, cfg.training.learning_rate) == ("H100:8", 3600, 1e-3)
    assert raw["modal"]["gpu"] == "H100:8"  # what travels to the container
    o = options(modal_app.train.with_options(**modal_app.launch_options(cfg.modal)))
    assert (o.resources.gpu_config.gpu_type, o.resources.gpu_config.count) == ("H100", 8)
    assert o.timeout_secs == 3600
    with pytest.raises(SLMError, match="unknown GPU 'H1000'"):
        modal_app.resolve(modal_app.DEFAULT_CONFIG, "H1000")
    with pytest.raises(SLMError, match="section.key=value"):
        modal_app.split_set("training.learning_rate")


def test_the_command_line_config_sets_the_decorators_for_direct_calls():
    """`modal run modal_app.py::train --config-path X` calls train directly: X's GPU must be used."""
    m = modal_app.cli_modal_section(["modal", "run", "modal_app.py::train", "--config-path",
                                     "configs/gpt_350m.yaml"])
    assert (m.gpu, m.timeout) == ("A100-40GB", 43200)
    m = modal_app.cli_modal_section(["modal", "run", "modal_app.py", "--config=configs/gpt_1b.yaml",
                                     "--gpu", "H100:8", "--set", "modal.timeout=7200"])
    assert (m.gpu, m.timeout) == ("H100:8", 7200)
    # the same through a real import under a `modal run` command line
    code = ("import sys; sys.argv = ['modal', 'run', 'modal_app.py::train', '--config-path', "
            "'configs/gpt_350m.yaml']; import modal_app as m; print(m.train._spec_.gpus, "
            "m.STATIC.timeout)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=offline_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["A100-40GB", "43200"]


def test_a_bad_config_on_the_command_line_stops_before_any_container():
    with pytest.raises(SystemExit) as e:
        modal_app.cli_modal_section(["modal", "run", "modal_app.py::train", "--config-path",
                                     "configs/nope.yaml"])
    assert e.value.code == 2


@pytest.mark.skipif(not MODAL_BIN.exists(), reason="the modal CLI is not installed")
def test_modal_run_help_lists_the_options(tmp_path):
    def help_of(ref):
        r = subprocess.run([str(MODAL_BIN), "run", ref, "--help"], cwd=ROOT, capture_output=True,
                           text=True, env=offline_env(HOME=str(tmp_path)), timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    h = help_of("modal_app.py")
    for opt in ("--config", "--gpu", "--set", "--name", "--no-wandb"):
        assert opt in h
    assert "--config-path" in help_of("modal_app.py::train")


def test_sweep_function_takes_config_and_grid():
    import inspect

    params = inspect.signature(modal_app.sweep._source_info_.raw_f).parameters  # what the CLI reads
    assert {"config", "grid", "gpu", "set", "group", "wandb"} <= set(params)


def test_data_preparation_fans_parts_out(monkeypatch, tmp_path, corpus):
    """Each part of a partitioned preparation gets its own CPU container (here: an in-process
    call each), and the result is the same dataset a local `slm prepare` builds."""
    import json
    import shutil

    from src.data import prepare as prep

    mixed = tmp_path / "mixed"  # text files and a JSON-lines file: two parts
    shutil.copytree(corpus, mixed)
    with open(mixed / "rows.jsonl", "w") as f:
        for p in sorted(corpus.glob("*.txt"))[:30]:
            f.write(json.dumps({"text": p.read_text()}) + "\n")
    done, real = [], prep.prepare_part

    def prepare_part(cfg, root, part, **kw):
        done.append(part["index"])
        return real(cfg, root, part, **kw)

    monkeypatch.setattr(prep, "prepare_part", prepare_part)
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path / "root"))
    out = modal_app.prepare_data.local(config_path="configs/tiny.yaml", set=fast_set(mixed))
    assert done == [0, 1]
    assert out["train_tokens"] > 0 and Path(out["dir"]).parent == tmp_path / "root/datasets"
    local = prep.prepare(load_config("configs/tiny.yaml", [f"{k}={'null' if v is None else v}"
                                     for k, v in {**FAST, "data.source": str(mixed)}.items()]),
                         tmp_path / "local", log=lambda *a: None)
    assert local.manifest["train"]["tokens"] == out["train_tokens"]


# ----------------------------------------------------------------------------- multi-GPU launch


@pytest.mark.parametrize("gpu,n", [("H100:8", 8), ("A100-80GB:2", 2), ("L4:4", 4)])
def test_torchrun_command_for_multi_gpu_strings(gpu, n):
    from src.hardware import parse_gpu

    assert parse_gpu(gpu)[1] == n
    cmd = modal_app.torchrun_command("/tmp/c.yaml", n, "/data")
    assert cmd == ["torchrun", f"--nproc_per_node={n}", "--standalone", "-m", "src", "train",
                   "--config", "/tmp/c.yaml", "--data-root", "/data", "--samples", "0"]
    multi = modal_app.torchrun_command("/tmp/c.yaml", n, "/data", wandb=False, nodes=2,
                                       node_rank=1, master_addr="10.0.0.1")
    assert multi[:6] == ["torchrun", f"--nproc_per_node={n}", "--nnodes=2", "--node_rank=1",
                         "--master_addr=10.0.0.1", f"--master_port={modal_app.MASTER_PORT}"]
    assert "--standalone" not in multi and multi[-1] == "--no-wandb"


def test_several_gpus_in_one_container_go_through_torchrun(monkeypatch, tmp_path, corpus):
    """The body picks torchrun exactly when the GPU string has a count above one."""
    launched = []

    def fake_torchrun(raw, cfg, root, gpus, *a, **k):
        launched.append((cfg.modal.gpu, gpus))
        return {"name": cfg.name, "model": "", "volume_path": "models/x.pt", "download": ""}

    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(modal_app, "_run_torchrun", fake_torchrun)
    monkeypatch.setattr(modal_app, "ensure_data", lambda *a, **k: None)
    out = modal_app.training_body("configs/tiny.yaml", "A10:4", fast_set(corpus), wandb=False)
    assert launched == [("A10:4", 4)] and "error" not in out


def test_multi_gpu_launcher_runs_the_command_commits_and_reports(monkeypatch, tmp_path, corpus):
    """The torchrun path's process handling, with one CPU process standing in for torchrun."""
    real = modal_app.torchrun_command

    def one_process(*a, **k):  # the same arguments, minus torchrun itself
        cmd = real(*a, **k)
        return [sys.executable, *cmd[cmd.index("-m"):]]

    commits = []
    monkeypatch.setattr(modal_app, "torchrun_command", one_process)
    monkeypatch.setattr(modal_app, "COMMIT_POLL_S", 0.5)
    monkeypatch.setattr(modal_app, "commit_volume", lambda log=print: commits.append(time.time()))
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    out = modal_app.training_body("configs/tiny.yaml", "T4:2", fast_set(corpus), wandb=False)
    assert "error" not in out and out["step"] == FAST["training.max_steps"]
    assert out["download"] == "modal volume get slm-data models/tiny_final.pt ."
    assert len(commits) >= 2  # while it ran, and at the end
    rows = [yaml.safe_load(x) for x in (tmp_path / "checkpoints/tiny/metrics.jsonl").open()]
    assert any(r.get("cost_usd") is not None for r in rows)  # the price reached the workers

    monkeypatch.setattr(modal_app, "attempt_seconds", lambda timeout, started=None: 3.0)
    with pytest.raises(RuntimeError, match="the attempt's time limit"):
        modal_app.training_body("configs/tiny.yaml", "T4:2", name="long", wandb=False,
                                set=fast_set(corpus, **{"training.max_steps": 100_000}))


# ----------------------------------------------------------------------------- the training body


class Commits:
    """Stands in for volume.commit(): records which checkpoint files existed at each commit."""

    def __init__(self, root: Path, on_first=None):
        self.root, self.snapshots, self.on_first = root, [], on_first

    def __call__(self, log=print):
        pts = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*.pt"))
        self.snapshots.append(pts)
        if self.on_first and self.on_first(pts):
            self.on_first = None


def run_body(monkeypatch, root, corpus, commits=None, capsys=None, **kw):
    monkeypatch.setenv("SLM_DATA_ROOT", str(root))
    if commits is not None:
        monkeypatch.setattr(modal_app, "commit_volume", commits)
    return modal_app.train.local(config_path="configs/tiny.yaml", set=fast_set(corpus, **kw),
                                 wandb=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """One uninterrupted in-process run: (data root, result, printed output, commit snapshots)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("volume")
    commits = Commits(root)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        out = run_body(mp, root, corpus, commits)
    mp.undo()
    return root, out, buf.getvalue(), commits.snapshots


def test_training_body_trains_and_says_how_to_download(reference):
    root, out, printed, _ = reference
    assert "error" not in out and out["step"] == FAST["training.max_steps"]
    assert isinstance(out["val_loss"], float)
    assert (root / "models" / "tiny_final.pt").is_file()
    assert out["volume_path"] == "models/tiny_final.pt"
    assert out["download"] == "modal volume get slm-data models/tiny_final.pt ."
    assert "modal volume get slm-data models/tiny_final.pt ." in printed
    assert "/data/models" not in out["download"]


def test_data_is_tokenized_before_training_not_by_it(reference):
    _, _, printed, _ = reference
    train_starts = printed.index("model ")  # train()'s first line
    assert "preparing " in printed[:train_starts]
    assert "preparing " not in printed[train_starts:]


def test_volume_is_committed_after_each_checkpoint(reference):
    root, _, _, snapshots = reference
    seen, new_per_commit = set(), []
    for snap in snapshots:
        new_per_commit.append(set(snap) - seen)
        seen |= set(snap)
    saved = {"checkpoints/tiny/step_4.pt", "checkpoints/tiny/step_8.pt",
             "checkpoints/tiny/final.pt", "models/tiny_final.pt"}
    assert saved <= seen
    assert all(len(new) <= 1 for new in new_per_commit)  # one commit per saved file
    for f in saved:
        assert {f} in new_per_commit


def test_an_interrupted_attempt_is_retried_and_resumes_exactly(monkeypatch, tmp_path, corpus,
                                                               reference, capsys):
    """SIGTERM (preemption, or the attempt's deadline) mid-run: a checkpoint, then an exception
    that makes Modal retry; the retry resumes and ends with the uninterrupted run's weights."""

    def preempt_after_first_checkpoint(pts):
        if "checkpoints/tiny/step_4.pt" in pts:
            os.kill(os.getpid(), signal.SIGTERM)
            return True

    commits = Commits(tmp_path, on_first=preempt_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="Modal retries the attempt"):
        run_body(monkeypatch, tmp_path, corpus, commits)
    assert (tmp_path / "checkpoints/tiny/step_5.pt").is_file()
    assert commits.snapshots[-1][-1] == "checkpoints/tiny/step_5.pt"  # committed before retry
    capsys.readouterr()

    out = run_body(monkeypatch, tmp_path, corpus, Commits(tmp_path))  # Modal's retry
    assert "resumed from" in capsys.readouterr().out
    assert out["step"] == FAST["training.max_steps"]
    a = torch.load(tmp_path / "models/tiny_final.pt", weights_only=True)["model_state_dict"]
    ref_root = reference[0]
    b = torch.load(ref_root / "models/tiny_final.pt", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_user_errors_are_reported_not_retried(monkeypatch, tmp_path, corpus):
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    out = modal_app.train.local(config_path="configs/tiny.yaml",
                                set=fast_set(corpus, **{"data.source": str(tmp_path / "none")}),
                                wandb=False)
    assert "no such file or folder" in out["error"]


def test_files_uploaded_one_data_level_too_deep_are_found(tmp_path, corpus, capsys):
    """`modal volume put slm-data ./x /data/datasets/x` lands in /data/data/datasets/x."""
    nested = tmp_path / "data" / "datasets" / "mytext"
    nested.mkdir(parents=True)
    (nested / "a.txt").write_text("hello")
    raw, cfg = modal_app.resolve("configs/tiny.yaml",
                                 overrides=[f"data.source={tmp_path / 'datasets' / 'mytext'}"])
    modal_app.fix_nested_upload(raw, cfg, tmp_path)
    assert cfg.data.source == raw["data"]["source"] == str(nested)
    assert "modal volume put slm-data <local> datasets/mytext" in capsys.readouterr().out


def test_deadline_stops_this_process_or_a_child():
    with pytest.raises(Interrupted), modal_app.Deadline(0.2) as d:
        time.sleep(5)
    assert d.fired
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    with modal_app.Deadline(0.2, pid=child.pid) as d:
        child.wait(timeout=20)
    assert d.fired and child.returncode == -signal.SIGTERM
    assert modal_app.attempt_seconds(86400) == 86400 - modal_app.STOP_MARGIN_S
    assert modal_app.attempt_seconds(600) == 540


# ----------------------------------------------------------------------------- sweeps


def test_grid_expansion():
    from src.tools import sweep as sw

    grid = sw.parse_grid("training.learning_rate=1e-4,3e-4,1e-3 training.weight_decay=0,0.1")
    assert grid == {"training.learning_rate": ["1e-4", "3e-4", "1e-3"],
                    "training.weight_decay": ["0", "0.1"]}
    assert sw.parse_grid("training.learning_rate=1e-4,3e-4;model.n_layer=6") == {
        "training.learning_rate": ["1e-4", "3e-4"], "model.n_layer": ["6"]}
    points = sw.expand("gpt_124m", grid)
    assert [p.name for p in points] == [
        "gpt_124m-lr1e-4-wd0", "gpt_124m-lr1e-4-wd0.1", "gpt_124m-lr3e-4-wd0",
        "gpt_124m-lr3e-4-wd0.1", "gpt_124m-lr1e-3-wd0", "gpt_124m-lr1e-3-wd0.1"]
    assert points[1].overrides == ["training.learning_rate=1e-4", "training.weight_decay=0.1"]
    assert sw.expand("t", {"modal.gpu": ["T4", "H100:8"]})[1].name == "t-gpuH100_8"
    for bad in ("", "learning_rate=1e-4", "training.learning_rate", "training.learning_rate=",
                "training.seed=1,1", "training.seed=1 training.seed=2"):
        with pytest.raises(SLMError, match="--grid"):
            sw.parse_grid(bad)
    with pytest.raises(SLMError, match="share a run name"):
        sw.expand("t", {"data.source": ["a/b", "a_b"]})


def test_sweep_trains_each_point_as_its_own_run_in_one_group(monkeypatch, tmp_path, corpus,
                                                            capsys):
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(modal_app, "commit_volume", lambda log=print: None)
    s = fast_set(corpus, **{"training.max_steps": 4, "training.eval_every": 4})
    table = modal_app.sweep.local(config="configs/tiny.yaml", set=s, group="g1", wandb=False,
                                  grid="training.learning_rate=1e-3,3e-3")
    names = ["tiny-lr1e-3", "tiny-lr3e-3"]
    for n in names:
        run = yaml.safe_load((tmp_path / "checkpoints" / n / "config.yaml").read_text())
        assert run["name"] == n and run["wandb"]["group"] == "g1"
        assert (tmp_path / "models" / f"{n}_final.pt").is_file()
    assert table.splitlines()[0].split()[:3] == ["run", "overrides", "val"]
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert sorted(rows) == names
    printed = capsys.readouterr().out
    assert "final validation loss" in printed and "best: tiny-lr" in printed
    assert printed.count("preparing ") == 1  # one dataset, tokenized once for both points
    assert "slm status --sweep g1 --modal" in printed
    # the table lives on the volume: rebuilt later, without the process that launched the points
    from src.cli import main

    assert main(["status", "--sweep", "g1", "--data-root", str(tmp_path)]) == 0
    later = capsys.readouterr().out
    assert "sweep g1: 2 of 2 points ended" in later
    assert sorted(ln.split()[0] for ln in later.splitlines()[3:]) == names
    assert all("finished" in ln for ln in later.splitlines()[3:])


def test_one_failed_sweep_point_stops_no_other(monkeypatch, tmp_path, corpus, capsys):
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(modal_app, "commit_volume", lambda log=print: None)
    real = modal_app.training_body

    def body(*a, **kw):  # the first point fails every attempt (a lost GPU)
        if "tiny-lr1e-3" in repr((a, kw)):
            raise RuntimeError("the container's GPU fell off the bus")
        return real(*a, **kw)

    monkeypatch.setattr(modal_app, "training_body", body)
    s = fast_set(corpus, **{"training.max_steps": 4, "training.eval_every": 4})
    table = modal_app.sweep.local(config="configs/tiny.yaml", set=s, group="g2", wandb=False,
                                  grid="training.learning_rate=1e-3,3e-3")
    rows = {ln.split()[0]: ln for ln in table.splitlines()[2:]}
    assert "finished" in rows["tiny-lr3e-3"] and (tmp_path / "models/tiny-lr3e-3_final.pt").is_file()
    assert "failed" in rows["tiny-lr1e-3"] and "GPU fell off" in rows["tiny-lr1e-3"]
    result = json.loads((tmp_path / "checkpoints/tiny-lr1e-3/result.json").read_text())
    assert "fell off the bus" in result["error"]


def test_sweep_names_and_missing_sweeps_are_refused(tmp_path, capsys):
    from src.cli import main

    for bad in ("../etc", "a/b", ""):
        assert main(["status", "--sweep", bad, "--data-root", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith("error: sweep name")
    assert main(["status", "--sweep", "nope", "--data-root", str(tmp_path)]) == 2
    assert "no record sweeps/nope.json" in capsys.readouterr().err


def test_sweep_refuses_a_bad_point_before_training(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    with pytest.raises(SLMError, match="tiny-warmup-5"):
        modal_app.sweep_body("configs/tiny.yaml", grid="training.warmup_steps=10,-5")
    assert not (tmp_path / "checkpoints").exists()


def test_the_launcher_and_slm_status_name_the_same_volume_and_lock_store():
    from src import paths

    assert modal_app.VOLUME_NAME == paths.VOLUME_NAME and modal_app.LOCK_DICT == paths.LOCK_DICT


def test_sweep_refuses_a_point_its_init_from_source_cannot_take(monkeypatch, tmp_path, fast_cfg):
    # chat_tiny from a 64-token model: the 128-token point is refused with the others' prices,
    # before any data work or launch (the estimate reads the source's shape)
    from src.training.trainer import train

    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    base = fast_cfg(training__max_steps=2, training__num_samples=0)
    train(base, tmp_path, "cpu", "never", False, log=lambda *a: None)
    with pytest.raises(SLMError, match=r"sweep: \S+: training.seq_len: 128 is longer than the 64"):
        modal_app.sweep_body("configs/chat_tiny.yaml", grid="training.seq_len=64,128",
                             set=f"model.init_from={base.name}")
    assert not list((tmp_path / "datasets").glob("*chat*"))  # nothing prepared for the sweep
