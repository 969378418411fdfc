"""`slm plot`: a run's curves as a PNG, from its metrics.jsonl (no W&B needed).

    slm plot data/checkpoints/tiny -o tiny.png
    slm plot data/checkpoints/lr3e-4 data/checkpoints/lr1e-3 -o compare.png --smooth 0.9 --logy

Four panels: training and validation loss, validation bits per byte, the learning-rate schedule
and throughput (tokens/s). Several runs share the axes, one colour per run; the x axis is tokens
seen by default, so runs with different batch sizes line up. Smoothing is centred (no lag), with
the raw curve drawn faintly behind it.
"""

from __future__ import annotations

from pathlib import Path

from src import paths, validate
from src.errors import SLMError
from src.training.metrics import read_metrics

X_AXES = {"tokens": "tokens seen", "step": "step", "time": "training time (s)"}


def find_metrics(arg: str | Path, data_root: str | Path = "data") -> Path:
    """A run folder, its metrics.jsonl, or a run name under <data_root>/checkpoints/."""
    p = Path(arg)
    for cand in (p, p / "metrics.jsonl", Path(data_root) / "checkpoints" / str(arg) / "metrics.jsonl"):
        if cand.is_file():
            return cand
    runs = sorted(x.parent.name for x in (Path(data_root) / "checkpoints").glob("*/metrics.jsonl"))
    hint = f"; runs under {data_root}/checkpoints: {', '.join(runs)}" if runs else ""
    raise SLMError(f"no metrics.jsonl in {arg}: pass a run folder such as "
                   f"{data_root}/checkpoints/<name> (or --data-root DIR and a run name){hint}")


def _series(rows: list[dict], x: str, key: str) -> tuple[list, list]:
    """(x, y) of rows that have `key`; a row without x (an older evaluation row has no `time`)
    takes the x of the latest row at or before its step."""
    pts, known = [], None
    for r in rows:
        if r.get(x) is not None:
            known = r[x]
        if r.get(key) is not None:
            xv = r[x] if r.get(x) is not None else known
            if xv is not None:
                pts.append((xv, r[key]))
    return [a for a, _ in pts], [b for _, b in pts]


def smooth_centred(ys: list[float], beta: float) -> list[float]:
    """A centred moving average as strong as an EMA of factor beta, without its lag.

    An EMA averages about (1 + beta) / (1 - beta) points, all in the past, so on a falling loss
    it draws above the raw curve. This averages the same number of points on both sides (fewer
    near the ends, where there are fewer neighbours), and never more than a tenth of the curve:
    a short run's few points keep their bends.
    """
    if not beta or len(ys) < 3:
        return list(ys)
    half = max(1, min(round(beta / (1 - beta)), len(ys) // 20))
    out = []
    for i in range(len(ys)):
        h = min(half, i, len(ys) - 1 - i)  # symmetric window: no shift at the ends either
        window = ys[i - h:i + h + 1]
        out.append(sum(window) / len(window))
    return out


def _labels(paths: list[Path]) -> list[str]:
    """Run folder names, made unique with their parents when two runs share a name."""
    names = [p.parent.name for p in paths]
    return [f"{p.parent.parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(paths, names, strict=True)]


def plot_runs(metric_files: list[Path], out: str | Path, x: str = "tokens", smooth: float = 0.0,
              title: str | None = None, logy: bool = False):
    """Draw the runs' curves into `out` (PNG, or any format matplotlib knows by extension)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import EngFormatter, FuncFormatter

    if x not in X_AXES:
        raise SLMError(f"--x {x}: use one of {', '.join(X_AXES)}")
    runs = [(label, read_metrics(p)) for label, p in zip(_labels(metric_files), metric_files,
                                                           strict=True)]
    for (_, rows), p in zip(runs, metric_files, strict=True):
        if not any("train/loss" in r or "val/loss" in r for r in rows):
            raise SLMError(f"{p} has no loss rows yet; train for at least one log interval "
                           "(training.log_every steps)")

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    (ax_loss, ax_bpb), (ax_lr, ax_tps) = axes
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, rows), c in zip(runs, colors, strict=True):
        xs, ys = _series(rows, x, "train/loss")
        if xs and smooth:
            ax_loss.plot(xs, ys, color=c, lw=0.8, alpha=0.25, label="_raw")  # not in the legend
        if xs:
            ax_loss.plot(xs, smooth_centred(ys, smooth), color=c, lw=1.4, alpha=0.9,
                         label=f"{label} train")
        xs, ys = _series(rows, x, "val/loss")
        if xs:
            ax_loss.plot(xs, ys, color=c, ls="--", marker="o", ms=4, label=f"{label} val",
                         zorder=3)
        xs, ys = _series(rows, x, "val/bpb")
        if xs:
            ax_bpb.plot(xs, ys, color=c, marker="o", ms=4, label=label)
        xs, ys = _series(rows, x, "lr")
        if xs:
            ax_lr.plot(xs, ys, color=c, label=label)
        xs, ys = _series(rows, x, "tokens_per_sec")
        if xs:
            ax_tps.plot(xs, ys, color=c, alpha=0.85, label=label)

    panels = [(ax_loss, "loss (nats/token)", "training and validation loss"),
              (ax_bpb, "bits per byte", "validation bits per byte"),
              (ax_lr, "learning rate", "learning-rate schedule"),
              (ax_tps, "tokens/s", "throughput")]
    for ax, ylabel, name in panels:
        ax.set_title(name)
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    ax_tps.yaxis.set_major_formatter(EngFormatter())
    if logy:
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 4, 5, 6 rather than 4x10^0
        for ax in (ax_loss, ax_bpb):
            if ax.lines:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
    fig.suptitle(title or ", ".join(label for label, _ in runs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return fig


def tokens_per_step(rows: list[dict]) -> int | None:
    """Tokens per optimizer step of a run, from its first training row."""
    for r in rows:
        if r.get("tokens") and r.get("step"):
            return r["tokens"] // r["step"]
    return None


def _check_output(out: Path, force: bool) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in kinds and not out.is_dir():
        raise SLMError(f"-o {out}: give an image file name ending in .png, .svg or .pdf "
                       f"(or another of: {', '.join(sorted(kinds))})")
    validate.new_file(out, "-o", force)


def plot(runs: list[str], output: str | Path | None = None, x: str = "tokens",
         smooth: float = 0.0, title: str | None = None, data_root=None, logy: bool = False,
         log=print, force: bool = False) -> Path:
    """`slm plot`: draw runs (folders, metrics.jsonl files or run names) into one image.

    An existing `output` is replaced only with force (the default <run>/metrics.png always is)."""
    validate.number("--smooth", smooth, 0, 1, hi_open=True)
    if output is not None:
        _check_output(Path(output), force)
    root = paths.data_root(data_root)
    files = [find_metrics(r, root) for r in runs]
    if x == "step" and len(files) > 1:
        sizes = {tokens_per_step(read_metrics(f)) for f in files} - {None}
        if len(sizes) > 1:
            shown = ", ".join(f"{n:,}" for n in sorted(sizes))
            log(f"note: these runs train on different tokens per step ({shown}), so their steps "
                "do not line up; --x tokens compares them at equal data")
    out = Path(output) if output else files[0].parent / "metrics.png"
    plot_runs(files, out, x=x, smooth=smooth, title=title, logy=logy)
    return out
