"""What the training rows say: the interval's mean loss, and throughput of training steps only."""

from __future__ import annotations

import statistics

import pytest

from src.training.metrics import read_metrics
from src.training.trainer import train


def _rows(fast_cfg, root, name, **kw):
    cfg = fast_cfg(name=name, **{"training__num_samples": 0, **kw})
    res = train(cfg, data_root=root, device="cpu", use_wandb=False)
    return [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "train/loss" in r]


def test_train_loss_is_the_mean_over_the_log_interval(fast_cfg, tmp_path):
    kw = dict(training__max_steps=8, training__eval_every=100, training__checkpoint_every=100)
    every = {r["step"]: r["train/loss"] for r in _rows(fast_cfg, tmp_path, "each", **kw,
                                                       training__log_every=1)}
    spaced = {r["step"]: r["train/loss"] for r in _rows(fast_cfg, tmp_path, "spaced", **kw,
                                                        training__log_every=4)}
    assert sorted(spaced) == [1, 4, 8]  # step 1 is always shown
    assert spaced[1] == pytest.approx(every[1], rel=1e-5)
    assert spaced[4] == pytest.approx(statistics.mean(every[s] for s in (2, 3, 4)), rel=1e-5)
    assert spaced[8] == pytest.approx(statistics.mean(every[s] for s in range(5, 9)), rel=1e-5)
    assert spaced[8] != pytest.approx(every[8], rel=1e-5), "one step's loss, not the mean"


def test_throughput_leaves_out_evaluation_and_checkpoints(fast_cfg, tmp_path):
    """Evaluation (with its samples) here costs far more than the steps of a log interval: the
    rows after it must still report the training steps' speed, and the time spent aside apart."""
    rows = _rows(fast_cfg, tmp_path, "tps", training__max_steps=24, training__eval_every=8,
                 training__checkpoint_every=8, training__log_every=4, training__batch_size=16,
                 training__num_samples=4, training__sample_tokens=300)  # samples: eval time
    by_step = {r["step"]: r for r in rows}
    plain = [r["tokens_per_sec"] for r in rows if r["step"] in (4, 8, 16)]
    for before, after in ((8, 12), (16, 20)):
        r, prev = by_step[after], by_step[before]
        assert prev["eval_seconds"] == 0 and r["eval_seconds"] > 0 and r["checkpoint_seconds"] > 0
        spent = r["time"] - prev["time"]
        assert spent > r["eval_seconds"] + r["checkpoint_seconds"]
        assert r["eval_seconds"] > 0.75 * spent, f"the evaluation must dominate: {r}"
        # Counting the evaluation would cut the rate to a quarter or less (the old rows after an
        # eval showed a quarter of the steady rate); the steps alone run at the usual speed.
        assert r["tokens_per_sec"] > 0.5 * statistics.median(plain), (r, plain)


def test_help_names_the_overrides_and_the_defaults():
    from conftest import run_cli

    train = run_cli("train", "--help", timeout=60).stdout
    assert "--section.key value" in train and "--wandb.mode offline" in train
    sample = run_cli("sample", "--help", timeout=60).stdout
    assert "(default: 200)" in sample and "(default: 0.8)" in sample
    assert "then cpu (as train) (default: auto)" in " ".join(sample.split())


@pytest.mark.parametrize("mode", ["continue", "rewarm", "restretch"])
def test_a_finished_run_resumed_with_a_larger_budget(fast_cfg, tmp_path, mode, capsys):
    """max_steps 8 -> 16 after the run ended: the user is told, and the default does not make the
    learning rate jump back up (it did, 5x, before)."""
    kw = dict(training__eval_every=100, training__checkpoint_every=100, training__log_every=1,
              training__min_lr_ratio=0.1)
    train(fast_cfg(name="grow", training__max_steps=8, **kw), data_root=tmp_path, device="cpu",
          use_wandb=False)
    capsys.readouterr()
    cfg = fast_cfg(name="grow", training__max_steps=16, training__budget_change=mode, **kw)
    res = train(cfg, data_root=tmp_path, device="cpu", use_wandb=False)
    out = capsys.readouterr().out
    assert "note: the budget changed since step 8 (training.max_steps 8 -> 16" in out
    assert f"training.budget_change: {mode}" in out
    lr = {r["step"]: r["lr"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "lr" in r}
    peak = cfg.training.learning_rate
    assert lr[8] < 0.2 * peak  # the first run ended decayed
    after = [lr[s] for s in range(9, 17)]
    if mode == "continue":  # the default: the decayed rate goes on, no jump
        assert max(after) <= lr[8]
        assert after[0] == pytest.approx(0.1 * peak)  # where the old schedule ended
    elif mode == "rewarm":  # up to the peak over warmup_steps (2), then down again
        assert lr[8] < after[0] < after[1] == pytest.approx(peak, rel=0.05)
        assert after == [after[0], after[1], *sorted(after[2:], reverse=True)]
        assert after[-1] < 0.2 * peak
    else:
        assert after[0] > 3 * lr[8]  # the old behaviour, on request
