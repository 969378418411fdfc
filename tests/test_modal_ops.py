"""Issue 13's Modal defects: the cross-container lock, the timeout margin, app links, cost
reservation, clusters, no retry of errors a retry repeats, GPU names, the W&B secret.

Modal objects are real where they construct offline (App, Function, with_options); the lock store
is a file-backed stand-in with modal.Dict's methods (modal.Dict needs Modal's servers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import modal
import pytest
from conftest import FAST, ROOT
from modal_standin import FileDict

import modal_app
from src.errors import SLMError
from src.training.config import load_config
from src.training.lock import LeaseLock

pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")

HOLDER = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from modal_standin import FileDict
from src.training.lock import LeaseLock
lock = LeaseLock(FileDict({store!r}), "run/x", "run 'x'", owner={owner!r}, lease_s={lease})
held = lock.try_acquire()
print("won" if held is None else "lost", flush=True)
time.sleep({hold})
lock.release()
"""


def holder(store, owner="a", lease=2.0, hold=60.0):
    code = HOLDER.format(root=str(ROOT), tests=str(ROOT / "tests"), store=str(store), owner=owner,
                         lease=lease, hold=hold)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- A5: the run lock


def test_a_second_process_finds_the_lock_taken_and_gets_it_when_the_holder_dies(tmp_path):
    store = tmp_path / "locks.json"
    p = holder(store, lease=2.0)
    try:
        assert p.stdout.readline().strip() == "won"
        other = LeaseLock(FileDict(store), "run/x", "run 'x'", owner="b", lease_s=2.0)
        taken = rf"run 'x' is in use by another container \(pid {p.pid}"
        with pytest.raises(SLMError, match=taken):
            other.acquire()
        time.sleep(2.5)  # longer than the lease: the live holder renewed it
        with pytest.raises(SLMError, match="in use by another container"):
            other.acquire()
        os.kill(p.pid, signal.SIGKILL)  # dies without releasing: its lease runs out
        p.wait()
        other.acquire(wait_s=30, poll_s=0.2)
        assert other.gen == 1 and not other.lost
        other.release()
    finally:
        p.kill()
        p.wait()


def test_of_processes_taking_the_lock_at_once_exactly_one_wins(tmp_path):
    store = tmp_path / "locks.json"
    procs = [holder(store, owner=f"o{i}", hold=1.0) for i in range(4)]
    said = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.wait()
    assert said == ["lost", "lost", "lost", "won"]


def test_release_frees_the_lock_and_a_retried_attempt_takes_over_its_own(tmp_path):
    d = FileDict(tmp_path / "locks.json")
    first = LeaseLock(d, "run/x", "run 'x'", owner="fc-1").acquire()
    with pytest.raises(SLMError):
        LeaseLock(d, "run/x", "run 'x'", owner="fc-2").acquire()
    # the same Modal call retried after a crash: takes over without waiting for the lease
    retry = LeaseLock(d, "run/x", "run 'x'", owner="fc-1").acquire()
    assert first.renew() is False and first.lost  # the old holder notices and stops renewing
    retry.release()
    nxt = LeaseLock(d, "run/x", "run 'x'", owner="fc-2").acquire()
    assert nxt.holder() is None and nxt.gen == 2
    nxt.release()


def test_training_body_refuses_a_run_another_container_trains(monkeypatch, tmp_path, corpus):
    """The Modal path in-process, with the stand-in Dict as the lock store."""
    from test_modal import fast_set

    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path / "vol"))
    d = FileDict(tmp_path / "locks.json")
    other = LeaseLock(d, "run/tiny", "run 'tiny'", owner="fc-other").acquire()
    out = modal_app.training_body("configs/tiny.yaml", set=fast_set(corpus), wandb=False, locks=d)
    assert "run 'tiny' is in use by another container" in out["error"]
    assert not (tmp_path / "vol/checkpoints/tiny").exists()  # nothing written
    other.release()
    out = modal_app.training_body("configs/tiny.yaml", set=fast_set(corpus), wandb=False, locks=d)
    assert "error" not in out and out["step"] == FAST["training.max_steps"]
    assert LeaseLock(d, "run/tiny", "?", owner="x").holder() is None  # released at the end


def test_two_preparations_of_one_dataset_take_turns(monkeypatch, tmp_path, corpus):
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    d = FileDict(tmp_path / "locks.json")
    set_ = f"data.source={corpus}"
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(modal_app.prepare_body(
        "configs/tiny.yaml", set_, locks=d, log=lambda *a: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 2 and outs[0] == outs[1] and outs[0]["train_tokens"] > 0
    assert len(list((tmp_path / "datasets").iterdir())) == 1


# ----------------------------------------------------------------------------- A2: timeout margin


def test_the_margin_counts_from_the_start_of_the_call():
    t = 86400
    full = modal_app.attempt_seconds(t)
    assert full == t - modal_app.STOP_MARGIN_S
    # an hour spent preparing data before training: the attempt stops an hour earlier
    late = modal_app.attempt_seconds(t, started=time.monotonic() - 3600)
    assert late == pytest.approx(full - 3600, abs=5)


# ----------------------------------------------------------------------------- A4: where the run is


def test_the_start_message_names_the_app_and_its_dashboard_when_there_is_one():
    lines = modal_app.run_links(modal.App("offline"), "fc-123")  # no app id offline
    assert lines[0].startswith("started fc-123") and len(lines) == 1
    text = "\n".join(lines)
    assert "modal app logs slm-training" not in text  # the command that does not work


# ----------------------------------------------------------------------------- A6: cost


def test_launch_reserves_the_cpu_and_memory_the_estimate_counts():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml")
    opts = modal_app.launch_options(cfg.modal)
    from src.hardware import GPUS

    t4 = GPUS["T4"]
    assert (opts["cpu"], opts["memory"]) == (t4.cpu, t4.ram_gib * 1024)
    cfg = load_config(ROOT / "configs/gpt_124m.yaml", ["modal.cpu=2", "modal.memory=8192"])
    opts = modal_app.launch_options(cfg.modal)
    assert (opts["cpu"], opts["memory"]) == (2, 8192)


# ----------------------------------------------------------------------------- A7: clusters


@pytest.mark.parametrize("gpu", ["T4", "H100:4", "A100-80GB:8", "L40S:8"])
def test_nodes_need_whole_hosts_of_a_cluster_gpu(gpu):
    with pytest.raises(SLMError) as e:
        load_config(ROOT / "configs/gpt_124m.yaml", [f"modal.gpu={gpu}", "modal.nodes=2"])
    assert "modal.nodes: 2 containers need all GPUs of each host" in str(e.value)
    assert str(e.value).count("modal.nodes") == 1


def test_a_cluster_of_whole_hosts_validates_and_asks_for_rdma():
    for gpu in ("H100:8", "H200:8", "B200:8", "H100!:8"):
        load_config(ROOT / "configs/gpt_124m.yaml", [f"modal.gpu={gpu}", "modal.nodes=2"])
    code = "import modal, modal_app as m; print(isinstance(m.train_cluster, modal.Function))"
    # rdma lives in the function's definition sent to Modal (not readable offline): read the source
    src = (ROOT / "modal_app.py").read_text()
    assert "@modal.clustered(size=STATIC.nodes, rdma=True)" in src
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "SLM_CLUSTER_NODES": "2"}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


# ----------------------------------------------------------------------------- A8: no retry


def test_a_worker_error_is_returned_once_not_retried(monkeypatch, tmp_path, corpus):
    """torchrun's workers record an error a retry repeats; the launcher returns it (no raise)."""
    from test_modal import fast_set

    real = modal_app.torchrun_command

    def one_process(*a, **k):
        cmd = real(*a, **k)
        return [sys.executable, *cmd[cmd.index("-m"):]]

    monkeypatch.setattr(modal_app, "torchrun_command", one_process)
    monkeypatch.setattr(modal_app, "ensure_data", lambda *a, **k: None)
    monkeypatch.setenv("SLM_DATA_ROOT", str(tmp_path))
    out = modal_app.training_body("configs/tiny.yaml", "T4:2",
                                  fast_set(corpus, **{"data.source": str(tmp_path / "none")}),
                                  wandb=False)
    assert "no such file or folder" in out["error"] and "\n" not in out["error"]


# ----------------------------------------------------------------------------- A9: GPU names


def test_modals_gpu_names_and_caps():
    from src.hardware import parse_gpu

    for name in ("RTX-PRO-6000", "B200+", "H100!", "h100!:8", "A10:4", "A100"):
        parse_gpu(name)
    for bad in ("A10:8", "H100:9", "H101"):
        with pytest.raises(ValueError):
            parse_gpu(bad)
    cfg = load_config(ROOT / "configs/gpt_124m.yaml", ["modal.gpu=B200+:2"])
    assert modal_app.launch_options(cfg.modal)["gpu"] == "B200+:2"


def test_an_exhausted_or_unavailable_run_is_one_line():
    m = load_config(ROOT / "configs/gpt_124m.yaml").modal
    msgs = [modal_app.failure_message(e, m) for e in (
        modal.exception.FunctionTimeoutError("timed out\nremote traceback ..."),
        RuntimeError("torchrun stopped (exit status 1)\nTraceback ..."),
        modal.exception.InvalidError("GPU type 'B200' is not available\n..."),
    )]
    assert all("\n" not in s for s in msgs)
    assert "every attempt reached modal.timeout (43200 s)" in msgs[0]
    assert msgs[1].startswith("all 11 attempts failed; the last: RuntimeError: torchrun stopped")
    assert "InvalidError: GPU type 'B200' is not available" in msgs[2]


# ----------------------------------------------------------------------------- A10: the W&B secret


def test_the_wandb_secret_is_attached_only_when_wandb_is_on():
    cfg = load_config(ROOT / "configs/gpt_124m.yaml")
    assert modal_app.wants_wandb_secret(cfg, True)
    assert not modal_app.wants_wandb_secret(cfg, False)
    off = load_config(ROOT / "configs/gpt_124m.yaml", ["wandb.mode=offline"])
    assert not modal_app.wants_wandb_secret(off, True)
    assert "secrets" not in modal_app.launch_options(cfg.modal, wandb=False)
    on = modal_app.launch_options(cfg.modal, wandb=True)
    assert [repr(s) for s in on["secrets"]] == ["modal.Secret.from_name('wandb')"]
    modal_app.train.with_options(**on)  # a real variant with the secret
    argv = ["modal", "run", "modal_app.py::train", "--config-path", "configs/gpt_124m.yaml"]
    assert modal_app.static_wandb(argv)
    assert not modal_app.static_wandb([*argv, "--no-wandb"])
    assert not modal_app.static_wandb(["modal", "run", "modal_app.py::prepare_data"])
    assert not modal_app.static_wandb(["modal", "run", "modal_app.py", "--config", "x.yaml"])


@pytest.mark.parametrize("target", ["modal_app.py::prepare_data", "modal_app.py"])
def test_prepare_data_and_the_launcher_start_without_a_static_secret(tmp_path, target):
    """`modal run` imports the app with its argv: no function carries the secret then."""
    code = (f"import sys; sys.argv = ['modal', 'run', {target!r}, '--no-wandb']; "
            "import modal_app as m; "
            "print([repr(s) for f in (m.train, m.prepare_data) for s in f._spec_.secrets])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_a_multi_node_run_is_locked_by_rank_0_for_every_container(tmp_path):
    """Rank 0 holds the run for the cluster; the other ranks (same call) go on, and when another
    call holds the run every rank is refused, so none is left waiting for the others."""
    d = FileDict(tmp_path / "locks.json")
    with modal_app.cluster_lock(d, "big", rank=0, owner="fc-cluster"):
        with modal_app.cluster_lock(d, "big", rank=1, owner="fc-cluster"):
            pass  # a container of the same call
        with pytest.raises(SLMError, match="run 'big' is in use"):
            modal_app.cluster_lock(d, "big", rank=1, owner="fc-other")
        with pytest.raises(SLMError, match="run 'big' is in use"):
            with modal_app.cluster_lock(d, "big", rank=0, owner="fc-other"):
                pass
    assert LeaseLock(d, "run/big", "?", owner="x").holder() is None  # released by rank 0
