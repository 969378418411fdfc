"""`slm plot`: PNG curves from real runs' metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from src.cli import main
from src.errors import SLMError
from src.tools.plot import find_metrics, plot_runs, read_metrics
from src.training.trainer import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus):
    """Two tiny real runs (different learning rates) under one data root, without W&B."""
    from conftest import FAST, ROOT

    from src.training.config import load_config

    root = tmp_path_factory.mktemp("plotroot")
    dirs = []
    for name, lr in (("lr-hi", 3e-3), ("lr-lo", 1e-3)):
        o = {**FAST, "data.source": str(corpus), "name": name, "training.learning_rate": lr,
             "training.eval_every": 4}
        res = train(load_config(ROOT / "configs" / "tiny.yaml", o), data_root=root, device="cpu",
                    use_wandb=False)
        dirs.append(res.run_dir)
    return root, dirs


def test_plot_writes_a_png_from_a_real_run(two_runs, tmp_path):
    root, (run, _) = two_runs
    out = tmp_path / "p.png"
    r = run_cli("plot", run, "-o", out, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000  # four panels of curves, not an empty canvas
    assert f"wrote {out}" in r.stdout


def test_several_runs_share_the_axes(two_runs, tmp_path):
    root, dirs = two_runs
    fig = plot_runs([d / "metrics.jsonl" for d in dirs], tmp_path / "both.png")
    loss, bpb, lr, tps = fig.axes
    labels = [line.get_label() for line in loss.lines]
    assert labels == ["lr-hi train", "lr-hi val", "lr-lo train", "lr-lo val"]
    rows = read_metrics(dirs[0] / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    xs, ys = loss.lines[0].get_data()
    assert list(xs) == [r["tokens"] for r in train_rows]  # loss against tokens seen
    assert list(ys) == [r["train/loss"] for r in train_rows]
    assert [len(ax.lines) for ax in (bpb, lr, tps)] == [2, 2, 2]
    hi, lo = (max(line.get_data()[1]) for line in lr.lines)
    assert 2e-3 < hi <= 3e-3 and 0.5e-3 < lo <= 1e-3  # the two schedules' peaks
    assert (tmp_path / "both.png").stat().st_size > 20_000


def test_run_names_and_step_axis(two_runs, tmp_path, capsys):
    root, _ = two_runs
    out = tmp_path / "names.png"
    rc = main(["plot", "lr-hi", "lr-lo", "--data-root", str(root), "-o", str(out), "--x", "step",
               "--smooth", "0.5"])
    assert rc == 0 and out.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out}" in capsys.readouterr().out


def test_missing_or_empty_runs_are_named(two_runs, tmp_path, capsys):
    root, _ = two_runs
    assert main(["plot", str(tmp_path / "nope"), "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl in" in err and "lr-hi, lr-lo" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 1, "skipped_nonfinite": 1}\n{"step": 2, "tr')
    with pytest.raises(SLMError, match="no loss rows"):
        plot_runs([find_metrics(empty)], tmp_path / "x.png")


def test_read_metrics_skips_a_line_cut_by_a_kill(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n" + '{"step": 2, "train/lo')
    assert read_metrics(p) == [{"step": 1, "train/loss": 2.0}]


def test_smoothing_is_centred_and_the_raw_curve_stays_faint(tmp_path):
    """On a falling loss an EMA draws above the curve (it lags); centred smoothing does not."""
    from src.tools.plot import smooth_centred

    trend = [5.0 - 0.01 * i for i in range(200)]
    noisy = [y + (0.2 if i % 2 else -0.2) for i, y in enumerate(trend)]
    smooth = smooth_centred(noisy, 0.9)
    inner = range(20, 180)
    assert max(abs(smooth[i] - trend[i]) for i in inner) < 0.03
    ema, avg = [], noisy[0]
    for y in noisy:
        avg = 0.9 * avg + 0.1 * y
        ema.append(avg)
    assert min(ema[i] - trend[i] for i in inner) > 0.03  # the old smoothing: lagging above

    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": i + 1, "tokens": 100 * (i + 1), "train/loss": y})
                         + "\n" for i, y in enumerate(noisy)))
    loss = plot_runs([p], tmp_path / "s.png", smooth=0.9, logy=True).axes[0]
    raw, line = loss.lines
    assert raw.get_alpha() < 0.5 and raw.get_label().startswith("_")  # faint, not in the legend
    assert list(raw.get_data()[1]) == noisy and list(line.get_data()[1]) == smooth
    assert loss.get_yscale() == "log"


def test_time_axis_and_runs_with_different_batch_sizes(two_runs, tmp_path, corpus):
    from conftest import FAST, ROOT

    from src.training.config import load_config

    root, (hi, _) = two_runs
    o = {**FAST, "data.source": str(corpus), "name": "big-batch", "training.batch_size": 8,
         "training.eval_every": 4}
    big = train(load_config(ROOT / "configs" / "tiny.yaml", o), data_root=root, device="cpu",
                use_wandb=False).run_dir
    fig = plot_runs([hi / "metrics.jsonl", big / "metrics.jsonl"], tmp_path / "t.png")
    val_hi, val_big = (line for line in fig.axes[0].lines if line.get_label().endswith(" val"))
    # Against tokens seen: the bigger batch's evaluations sit at twice the tokens.
    assert list(val_big.get_data()[0]) == [2 * x for x in val_hi.get_data()[0]]

    fig = plot_runs([hi / "metrics.jsonl"], tmp_path / "time.png", x="time")
    rows = read_metrics(hi / "metrics.jsonl")
    val = [line for line in fig.axes[0].lines if line.get_label().endswith(" val")][0]
    assert list(val.get_data()[0]) == [r["time"] for r in rows if "val/loss" in r]

    notes = []
    from src.tools.plot import plot

    plot([str(hi), str(big)], tmp_path / "steps.png", x="step", log=notes.append)
    assert notes and "different tokens per step (256, 512)" in notes[0]


def test_logy_on_the_command_line(two_runs, tmp_path, capsys):
    root, (run, _) = two_runs
    out = tmp_path / "logy.png"
    assert main(["plot", str(run), "-o", str(out), "--logy", "--x", "time"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = run_cli("plot", "--help", timeout=60)
    assert "--logy" in r.stdout and "tokens seen" in r.stdout
