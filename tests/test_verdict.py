"""The verdict of the phase-change detector (train/core/phase.py) on synthetic runs, one per case:
"yes" needs a window that ends before the run does; a change still under way at the last
checkpoint is "still rising at the end"; a run that ends before anything could form is "too short
to tell"; and the number format of every message."""
from __future__ import annotations

import math

import numpy as np

from tests.helpers import checkpoint_tokens, sigmoid
from train.core import names as N
from train.core.phase import (STILL_RISING, TOO_SHORT, YES, PhaseParams, detect_phase_change, detect_run, fmt_tokens,
                              smooth)
from train.core.runs import Run


def synthetic(t, center: float, width: float = 0.08, late_head: tuple[float, float] | None = None, seed: int = 0):
    """(loss, icl, heads) of a run whose ICL jump, loss bump and head L1H0's rise share a sigmoid
    step at `center` tokens (width in ln tokens); `late_head` = (center, width) of a rise of L1H1."""
    rng = np.random.default_rng(seed)
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(center)) / width)
    loss = 1.2 + 3.2 / (1 + t / 1.3e5) - 0.6 * step + rng.normal(0, 0.01, len(t))
    icl = -0.6 - 0.1 * (x - x[1]) / (x[-1] - x[1]) - 0.8 * step + rng.normal(0, 0.04, len(t))
    heads = {"L0H0": 0.05 + rng.normal(0, 0.003, len(t)), "L1H0": 0.06 + 0.6 * step + rng.normal(0, 0.01, len(t))}
    if late_head:
        heads["L1H1"] = 0.06 + 0.6 * sigmoid((x - math.log(late_head[0])) / late_head[1]) + rng.normal(0, 0.01, len(t))
    return loss, icl, heads


def test_a_complete_window_is_yes_and_a_head_still_rising_does_not_stretch_it():
    t = checkpoint_tokens(4_000_000, 20_000, 70, 40)
    res = detect_phase_change(t, *synthetic(t, 1.5e6, late_head=(3.0e6, 0.3)))
    assert res["verdict"] == YES and res["phase_change"], res["message"]
    late = res["prefix_matching"]["L1H1"]
    assert late["detected"] and late["unfinished"] and late["end_tokens"] >= 0.999 * t[-1]  # rising to the end
    assert late["start_tokens"] < res["window"]["end_tokens"]  # ... and overlapping the window
    assert res["window"]["start_tokens"] < 1.5e6 < res["window"]["end_tokens"] < 2.5e6  # not stretched to 4M
    assert res["unfinished_window"] is None and "L1H1" in res["induction_heads"]


def test_a_change_under_way_at_the_last_checkpoint_is_still_rising_not_yes():
    t = checkpoint_tokens(4_000_000, 20_000, 70, 40)
    res = detect_phase_change(t, *synthetic(t, 3.6e6))
    assert res["verdict"] == STILL_RISING and not res["phase_change"] and res["window"] is None, res["message"]
    w = res["unfinished_window"]
    assert w["start_tokens"] < 3.6e6 and w["end_tokens"] >= 0.999 * t[-1]
    assert res["message"].startswith("still rising at the end: ") and "no complete window" in res["message"]
    assert not res["icl_jump"]["detected"] and res["icl_jump"]["unfinished"]  # passes all but the end
    # the same change, with the run trained on until the window closes: yes
    longer = checkpoint_tokens(12_000_000, 20_000, 80, 60)
    assert detect_phase_change(longer, *synthetic(longer, 3.6e6))["verdict"] == YES


def test_a_run_that_ends_during_the_initial_descent_is_too_short_to_tell():
    t = checkpoint_tokens(100_000, 5_000, 10, 5)
    res = detect_phase_change(t, *synthetic(t, 1.5e6))
    assert res["verdict"] == TOO_SHORT and not res["phase_change"], res["message"]
    assert res["message"].startswith("too short to tell: at the last checkpoint (100k tokens) the loss is still in")
    few = detect_phase_change(t[:4], *(a[:4] for a in synthetic(t, 1.5e6)[:2]))
    assert few["verdict"] == TOO_SHORT and few["message"].startswith("cannot tell: 3 usable checkpoints")


def test_token_counts_read_the_same_everywhere():
    assert [fmt_tokens(v) for v in (512, 99_582, 100_000, 1_249_230, 16_000_000, 999_700, None)] == [
        "512", "99.6k", "100k", "1.25M", "16.0M", "1.00M", "-"]


def test_no_yes_without_an_icl_jump_and_the_mixture_score_where_logged():
    """Induction heads and a loss bump without an ICL jump are "no"; a run with the repetition
    knob is read through icl_score_mixture (held-out text with the training repetition)."""
    t = checkpoint_tokens(4_000_000, 20_000, 70, 40)
    loss, icl, heads = synthetic(t, 1.5e6)
    flat = -0.6 + np.random.default_rng(3).normal(0, 0.02, len(t))
    res = detect_phase_change(t, loss, flat, heads)
    assert res["verdict"] == "no" and res["coincide"]["bump_prefix_matching"], res["message"]
    assert "no ICL jump coinciding" in res["message"]
    rows = [{N.TOKENS: int(t[i]), N.LOSS_HELDOUT: float(loss[i]), N.ICL_SCORE: float(flat[i]),
             N.ICL_SCORE_MIXTURE: float(icl[i])} | {N.head_key(N.PREFIX_MATCHING, *N.parse_head_name(k)): float(v[i])
                                                     for k, v in heads.items()} for i in range(len(t))]
    mixed = detect_run(Run(rows=rows))
    assert mixed["icl_key"] == N.ICL_SCORE_MIXTURE and mixed["verdict"] == YES, mixed["message"]
    plain = detect_run(Run(rows=[{k: v for k, v in r.items() if k != N.ICL_SCORE_MIXTURE} for r in rows]))
    assert plain["icl_key"] == N.ICL_SCORE and plain["verdict"] == "no"


def test_an_adaptive_schedule_finds_the_dense_schedules_window_bump_and_noise():
    """Checkpoints like adaptive density's (a sparse base schedule; two lead-ins, then 2% steps
    from where the heads start to move, gaps growing after them) give the window of a dense
    schedule on the same curves, with the loss bump, when the initial descent is as sharp as a
    real run's (4.4 -> 1.6 nats within about 1 in ln tokens): the noise is measured where the
    checkpoints resolve the curve (train/core/smoothing.py), not at the sparse points across
    that descent, whose residuals are the curve's bend (they made the noise 7x the dense one's)."""
    def curves(t, seed):
        _, icl, heads = synthetic(t, 1.5e6, seed=seed)
        x = np.log(np.maximum(t, 1))
        step = sigmoid((x - math.log(1.5e6)) / 0.08)
        loss = 1.6 + 2.8 * sigmoid(-(x - math.log(1.6e5)) / 0.3) - 0.5 * step
        return loss + np.random.default_rng(seed + 10).normal(0, 0.01, len(t)), icl, heads

    dense = checkpoint_tokens(4_000_000, 20_000, 300, 40)
    zoom = 1.13e6 * 1.02 ** np.arange(40)  # prefix matching has moved 0.02 of its 0.6 at 1.13M
    lead = zoom[0] * np.exp(-0.04 * np.array([1.5, 1.5 + 1.5 ** 2]))
    tail = zoom[-1] * np.exp(0.04 * np.cumsum(1.5 ** np.arange(1, 5)))
    adaptive = np.unique(np.round(np.concatenate([checkpoint_tokens(4_000_000, 20_000, 10, 4), lead, zoom, tail])))
    adaptive = adaptive[adaptive <= 4_000_000]
    irregular = PhaseParams(spacing_weights=True)
    for seed in range(3):
        ref = detect_phase_change(dense, *curves(dense, seed))
        res = detect_phase_change(adaptive, *curves(adaptive, seed), params=irregular)
        assert ref["verdict"] == res["verdict"] == YES and res["loss_bump"]["detected"], (seed, res["loss_bump"])
        for edge in ("start_tokens", "end_tokens"):  # within 6%: the grid is 1.3% apart, the zoom 2%
            assert abs(res["window"][edge] / ref["window"][edge] - 1) < 0.06, (seed, res["window"], ref["window"])
        noise = smooth(adaptive, curves(adaptive, seed)[0], irregular).sigma
        assert 0.5 < noise / smooth(dense, curves(dense, seed)[0]).sigma < 2
