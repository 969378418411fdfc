"""slm status: where a run stands, read from its folder (step, losses, checkpoints, state)."""

from __future__ import annotations

import fcntl

import pytest

from src.checkpoint import step_files
from src.cli import main
from src.errors import SLMError
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


class StandInVolume:
    """What `modal.Volume` offers a reader outside a container (`listdir`, `read_file`, with the
    client's real FileEntry records and errors), serving a local folder: the volume's files."""

    def __init__(self, root):
        self.root = root

    def listdir(self, path: str, *, recursive: bool = False):
        from modal.exception import NotFoundError
        from modal.volume import FileEntry, FileEntryType

        assert not recursive and not path.startswith("/data")
        p = self.root / path.lstrip("/")
        if not p.exists():
            raise NotFoundError(f"No such file or directory: {path}")
        kids = [p] if p.is_file() else sorted(p.iterdir())
        return [FileEntry(str(k.relative_to(self.root)),
                          FileEntryType.DIRECTORY if k.is_dir() else FileEntryType.FILE,
                          int(k.stat().st_mtime), k.stat().st_size) for k in kids]

    def read_file(self, path: str):
        p = self.root / path.lstrip("/")
        if not p.is_file():
            raise FileNotFoundError(path)
        data = p.read_bytes()
        for i in range(0, max(1, len(data)), 1 << 16):  # in blocks, as the client yields them
            yield data[i:i + (1 << 16)]


def test_status_reads_the_modal_volume_through_its_api(fast_cfg, tmp_path, capsys, one_thread):
    from modal_standin import FileDict

    from src.tools.status import VolumeTree, status

    train(fast_cfg(name="vol"), data_root=tmp_path, device="cpu", use_wandb=False)
    local = status(tmp_path, "vol")
    remote = status(None, "vol", VolumeTree(StandInVolume(tmp_path), None))
    assert "on the Modal volume: finished at step 12" in remote
    # the same figures, the same files (named as they are under /data in the containers)
    assert remote.replace(" on the Modal volume", "").replace(
        "/checkpoints", str(tmp_path / "checkpoints")).replace(
        "/models", str(tmp_path / "models")) == local
    assert "vol " in status(None, None, VolumeTree(StandInVolume(tmp_path)))
    RunLayout(tmp_path, "vol").final.unlink()
    locks = FileDict(tmp_path / "locks.json")  # a container holds the run's lease
    from src.training.lock import LeaseLock

    LeaseLock(locks, "run/vol", "run 'vol'", owner="a-call").try_acquire()
    assert "vol on the Modal volume: training" in status(
        None, "vol", VolumeTree(StandInVolume(tmp_path), locks))
    with pytest.raises(SLMError, match="no folder"):
        status(None, "nosuch", VolumeTree(StandInVolume(tmp_path)))
