"""slm status: where a run stands, read from its folder (step, losses, checkpoints, state)."""

from __future__ import annotations

import fcntl

from src.checkpoint import step_files
from src.cli import main
from src.paths import RunLayout
from src.training.trainer import train


def test_status_of_a_finished_a_stopped_and_a_running_run(fast_cfg, tmp_path, capsys, one_thread):
    cfg = fast_cfg(name="st")
    train(cfg, data_root=tmp_path, device="cpu", use_wandb=False)
    assert main(["status", "st", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run st: finished at step 12" in out
    assert "train loss" in out and "val loss (best)" in out and "bits/byte" in out
    run = RunLayout(tmp_path, "st")
    assert str(run.final) in out and str(run.model_final) in out

    run.final.unlink()  # as if it had been killed after its last step checkpoint
    assert main(["status", "st", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    newest = step_files(run.run_dir)[-1][1]
    assert "stopped" in out and f"newest checkpoint {newest}" in out and "slm train --name st" in out

    with open(run.lock, "a+") as f:  # a trainer holds the run's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["status", "--data-root", str(tmp_path)]) == 0
        assert "training" in capsys.readouterr().out.split("\n")[0]


def test_status_of_a_run_without_metrics_and_an_unknown_run(tmp_path, capsys):
    (tmp_path / "checkpoints" / "empty").mkdir(parents=True)
    assert main(["status", "empty", "--data-root", str(tmp_path)]) == 0
    assert "step 0" in capsys.readouterr().out
    assert main(["status", "nosuch", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "'nosuch'" in err[0]
    assert "empty" in err[0]  # names the runs that exist
