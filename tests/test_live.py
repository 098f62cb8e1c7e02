import pytest
"""Live phase-change detection during training: the analysis detector on the rows so far, announced
once (console, wandb summary and alert) at a checkpoint after the window; never without a jump."""
import math

import numpy as np

from train.core.phase import detect_run, fmt_tokens
from train.core.runs import Run
from tests.helpers import checkpoint_tokens, sigmoid
from tests.wandb_files import read_offline_records, read_offline_summary
from train.core import names as N
from train.live import LiveDetection
from train.loggers import NullLogger, WandbLogger

CENTER = 1.5e6


def rows(jump: bool, seed: int = 0) -> list[dict]:
    """Checkpoint rows of a synthetic 2-layer run: with `jump`, the ICL score, the loss and head
    L1H0's prefix matching change together around CENTER tokens (a sigmoid in ln tokens)."""
    rng = np.random.default_rng(seed)
    t = checkpoint_tokens(4_000_000, 20_000, 50, 20)
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(CENTER)) / 0.08) if jump else np.zeros_like(x)
    loss = 1.2 + 3.2 / (1 + t / 1.3e5) - 0.6 * step + rng.normal(0, 0.01, len(t))
    icl = -0.6 - 0.1 * (x - x[1]) / (x[-1] - x[1]) - 0.8 * step + rng.normal(0, 0.04, len(t))
    pm = {(0, 0): 0.05 + rng.normal(0, 0.003, len(t)), (1, 0): 0.06 + 0.6 * step + rng.normal(0, 0.01, len(t))}
    out = []
    for i, tokens in enumerate(t):
        row = {N.STEP: i, N.TOKENS: int(tokens), N.LOSS_HELDOUT: float(loss[i]), N.ICL_SCORE: float(icl[i])}
        row |= {N.head_key(N.PREFIX_MATCHING, l, h): float(v[i]) for (l, h), v in pm.items()}
        out.append(row)
    return out


class Recorder(NullLogger):
    def __init__(self):
        self.calls = []

    def phase_change(self, summary, alert=None):
        self.calls.append((summary, alert))


def test_announced_once_after_the_window_with_the_analysis_window():
    said, logger, data = [], Recorder(), rows(jump=True)
    live = LiveDetection(3, logger, said.append)
    found = [i for i, row in enumerate(data) if live.update(row) is not None]
    assert len(found) == 1 and len(said) == 1
    i = found[0]
    assert (i + 1) % 3 == 0  # only every 3rd checkpoint runs the detector
    assert data[i][N.TOKENS] > CENTER  # found once the jump has happened, not before
    assert data[i][N.TOKENS] < 4_000_000 * 0.9  # ... and well before the end of training
    expected = detect_run(Run(None, data[: i + 1]))  # the analysis on the same rows
    summary, alert = logger.calls[0]
    assert summary["phase_change/start_tokens"] == expected["window"]["start_tokens"]
    assert summary["phase_change/detected_at_tokens"] == data[i][N.TOKENS]
    assert alert == said[0] and f"provisional, on the checkpoints up to {fmt_tokens(data[i][N.TOKENS])} tokens" in alert
    assert summary["phase_change/provisional"] is True and summary["phase_change/verdict"] == "yes"
    final = live.finish()
    assert final["phase_change"] and abs(math.log(final["window"]["steepest_tokens"] / CENTER)) < 0.2
    assert logger.calls[-1][1] is None and logger.calls[-1][0]["phase_change/induction_heads"] == "L1H0"


def test_never_announced_without_a_jump_or_when_off():
    said, logger = [], Recorder()
    live = LiveDetection(3, logger, said.append)
    assert all(live.update(row) is None for row in rows(jump=False, seed=1))
    assert said == [] and live.finish()["phase_change"] is False
    assert logger.calls[-1][0]["phase_change/detected"] is False
    off = LiveDetection(0, Recorder(), said.append)
    assert all(off.update(row) is None for row in rows(jump=True)) and off.finish() is None and said == []


@pytest.mark.slow
def test_wandb_summary_and_alert_in_the_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(mode="offline")
    logger.start(tmp_path, {"name": "synthetic"})
    live = LiveDetection(10, logger, lambda line: None)
    for row in rows(jump=True):
        logger.log(row)
        live.update(row)
    live.finish()
    logger.finish()
    summary = read_offline_summary(tmp_path / "wandb")
    assert summary["phase_change/detected"] is True
    assert summary["phase_change/start_tokens"] < CENTER < summary["phase_change/end_tokens"]
    assert summary["phase_change/detected_at_tokens"] > CENTER
    alerts = [r for kind, r in read_offline_records(tmp_path / "wandb") if kind == "alert"]
    assert len(alerts) == 1 and alerts[0].title == "phase change" and "L1H0" in alerts[0].text
