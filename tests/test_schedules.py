"""The checkpoint schedules (train/core/schedules.py): the fixed schedule, and the decisions of
adaptive density on watched values with known answers (a flat noisy stretch, a sigmoid rise);
the watch of a run (train/watch.py) on hand-built weights; the thread setting's rule
(train/threads.py). No training here: the training runs under adaptive density are in
tests/test_reliability.py (resume) and tests/test_distributed.py (torchrun)."""
from __future__ import annotations

import math
import random

import pytest

from tests.helpers import compose_config
from train.core.config import ConfigError, validate
from train.core.schedules import (BASE, LEAD_IN, TAIL, ZOOM, AdaptiveConfig, DensityWatch, adaptive, checkpoint_steps,
                                  run_schedule, run_steps)
from train.threads import choose

BASE_STEPS = [0, 100, 200, 300, 400, 500, 600]


def settings(**changes) -> AdaptiveConfig:
    return AdaptiveConfig(enabled=True, **changes)


def watch(floors=None, **changes) -> DensityWatch:
    """The watch of two heads with floor min_change (the trainer's), or of `floors`."""
    s = settings(**changes)
    return DensityWatch(s, BASE_STEPS, 64, floors or {"L1H0": s.min_change, "L1H1": s.min_change})


def sigmoid_series(steps: int, centre: float, width: float, noise: float, seed: int = 0):
    """{step: {head: value}}: L1H0 rises from 0.05 to 0.75 around `centre`, L1H1 stays at 0.05,
    both with Gaussian noise of `noise`."""
    rng = random.Random(seed)
    return {t: {"L1H0": 0.05 + 0.7 / (1 + math.exp(min(50.0, -(t - centre) / width))) + rng.gauss(0, noise),
                "L1H1": 0.05 + rng.gauss(0, noise)} for t in range(steps + 1)}


def run_watch(w: DensityWatch, series, start: int = 0, stop: int | None = None):
    """[(step, Decision)] of the watch over `series` from `start` to `stop`."""
    out = []
    for t in range(start, (max(series) if stop is None else stop) + 1):
        if w.due(t):
            out += [(d.step, d) for d in w.decide(t, series[t])]
    return out


def reasons(taken, reason):
    return [t for t, d in taken if d.reason == reason]


def test_fixed_schedule_has_the_ends_and_is_sorted():
    steps = checkpoint_steps(976, 4096, 70, 40, 20000)
    assert steps[0] == 0 and steps[-1] == 976 and steps == sorted(set(steps)) and len(steps) == 101


def test_every_base_step_is_a_checkpoint_and_a_flat_stretch_gets_no_other():
    series = sigmoid_series(600, centre=10_000, width=10, noise=0.003)  # no rise within the run
    w = watch()
    taken = run_watch(w, series, stop=598)
    assert w.kept and all(500 < k <= 598 for k in w.kept)  # weights kept for a lead-in that never came
    taken += run_watch(w, series, start=599)
    assert [t for t, _ in taken] == BASE_STEPS
    assert all(d.reason == BASE for _, d in taken)
    assert taken[0][1].channel is None  # step 0: nothing to compare with
    assert all(d.threshold >= 0.02 for _, d in taken[1:])  # at least the floor


def test_a_rise_gets_zoomed_checkpoints_inside_it_a_lead_in_before_and_a_tail_after():
    series = sigmoid_series(600, centre=360, width=12, noise=0.003)
    w = watch(min_gap=0.01)
    taken = run_watch(w, series)
    zoomed, lead, tail = reasons(taken, ZOOM), reasons(taken, LEAD_IN), reasons(taken, TAIL)
    # the rise: 10% to 90% of it between centre -+ 2.2 widths (334..386)
    assert len(zoomed) >= 8 and all(310 <= t <= 420 for t in zoomed), zoomed
    for t, d in taken:
        if d.reason == ZOOM:
            assert d.channel == "L1H0" and abs(d.change) > d.threshold >= 0.02
    # lead-ins before the first zoom and after the base checkpoint before it, the nearest two
    # within a kept bin (ln(1 + min_gap)) of their targets x_zoom - u g and x_zoom - u (g + g^2):
    # gaps growing away from the zoomed stretch
    assert 2 <= len(lead) <= 4 and 300 < lead[0] and lead == sorted(lead) and lead[-1] < zoomed[0], (lead, zoomed)
    for k, t in ((1, lead[-1]), (2, lead[-2])):
        assert abs(math.log(t) - (math.log(zoomed[0]) - w._lead_distance(k))) <= math.log1p(0.01), (k, lead, zoomed)
    # the tail: the k-th tail checkpoint at the first watched step (every 2) at or after its
    # target (tail_targets), or d_k after the checkpoint before it if that is later (a base
    # checkpoint on the way: 400), that is min_gap (1%) after that checkpoint: gaps growing back
    # to the base schedule's
    assert_tail_follows_its_targets(w, taken)
    z = [t for t, _ in taken].index(zoomed[-1])
    assert len(tail) >= 3 and BASE_STEPS[4] in [t for t, _ in taken[z:]], taken[z:]
    # min_gap: no two checkpoints closer than 1% in tokens (steps: tokens per step is constant)
    steps = sorted(t for t, _ in taken)
    assert steps == [t for t, _ in taken] and all((b - a) / max(a, 1) >= 0.01 for a, b in zip(steps, steps[1:]))


def tail_targets(s: AdaptiveConfig, last_zoom: int, u: float, before: list[int]) -> list[tuple[float, float]]:
    """(x_z + d_1 + ... + d_k, d_k) in ln tokens for the tail checkpoints after `last_zoom`, whose
    gap to the checkpoint before it is u, `before[k - 1]` the step of the checkpoint before the
    k-th: d_k = growth x d_(k-1) (d_0 = u), at most tail_gap while that checkpoint lies less than
    tail_span past the zoom."""
    out, x, d = [], 0.0, u
    for b in before:
        d *= s.growth
        d = min(d, s.tail_gap) if math.log(b / last_zoom) < s.tail_span else d
        x += d
        out.append((math.log(last_zoom) + x, d))
    return out


def assert_tail_follows_its_targets(w: DensityWatch, taken) -> None:
    """Each tail checkpoint after the last zoom is the first watched step at or after its target
    (tail_targets), or d_k after the checkpoint before it if that is later, and at least min_gap
    after that checkpoint."""
    s, steps, z = w.s, [t for t, _ in taken], reasons(taken, ZOOM)[-1]
    tail = [t for t in reasons(taken, TAIL) if t > z]
    before = [steps[steps.index(t) - 1] for t in tail]
    for t, b, (x, d) in zip(tail, before, tail_targets(s, z, math.log(z / steps[steps.index(z) - 1]), before)):
        x = max(x, math.log(b) + d)
        assert math.log(t) >= x and t >= (1 + s.min_gap) * b, (t, math.exp(x), b)
        earlier = t - w.interval(t)  # the watched step before
        assert math.log(earlier) < x or earlier < (1 + s.min_gap) * b, (t, math.exp(x), b)  # the first such step


def test_the_tail_keeps_its_gaps_within_tail_gap_over_tail_span():
    """Past a rise's last zoom the gaps between checkpoints stay within tail_gap (plus the watch
    interval's rounding) for tail_span in ln tokens; without the cap (tail_span 0) they grow past
    it there, with fewer tail checkpoints."""
    series = sigmoid_series(600, centre=200, width=8, noise=0.003)
    tails, widest = {}, {}
    for span in (0.5, 0.0):
        w = watch(min_gap=0.01, tail_span=span)
        taken = run_watch(w, series)
        steps, z = [t for t, _ in taken], reasons(taken, ZOOM)[-1]
        after = [t for t in steps if z <= t <= z * math.exp(0.5)]
        widest[span] = max(math.log(b / (a + 2)) for a, b in zip(after, after[1:]))
        tails[span] = len(reasons(taken, TAIL))
    assert widest[0.5] <= 0.08 < widest[0.0], widest
    assert tails[0.5] > tails[0.0], tails


def test_the_tail_gap_cap_ends_tail_span_past_the_last_zoom_with_base_checkpoints_between():
    """The cap is a stretch of ln tokens, not a number of tail checkpoints: with base checkpoints
    inside the tail (every 20 steps from 420 to 540), the tail follows its targets, its gaps stay
    within tail_gap while the checkpoint before lies within tail_span (0.3) of the rise's last
    zoom, and past that they grow beyond it from one tail checkpoint to the next."""
    series = sigmoid_series(1200, centre=360, width=12, noise=0.003)
    s = settings(min_gap=0.01, tail_span=0.3)
    base = sorted({*BASE_STEPS, *range(420, 560, 20), 1200})
    w = DensityWatch(s, base, 64, {"L1H0": s.min_change, "L1H1": s.min_change})
    taken = run_watch(w, series)
    steps, z = [t for t, _ in taken], reasons(taken, ZOOM)[-1]
    gaps = {t: math.log(t / steps[steps.index(t) - 1]) for t in reasons(taken, TAIL)}
    within = [t for t in gaps if math.log(steps[steps.index(t) - 1] / z) < s.tail_span]
    past = [t for t in gaps if t not in within]
    assert_tail_follows_its_targets(w, taken)
    assert within and all(gaps[t] <= s.tail_gap + math.log1p(2 / t) for t in within), (gaps, z)
    assert len(past) >= 4 and all(gaps[b] > gaps[a] for a, b in zip(past, past[1:])), (gaps, z)
    assert gaps[past[-1]] > s.tail_gap * s.growth ** 2, (gaps, z)


def test_the_gap_and_the_floor_limit_the_zoom():
    series = sigmoid_series(600, centre=330, width=12, noise=0.003)
    dense = [t for t, d in run_watch(watch(), series) if d.reason == ZOOM]
    wide_gap = [t for t, d in run_watch(watch(min_gap=0.05), series) if d.reason == ZOOM]
    high_floor = [t for t, d in run_watch(watch(min_change=0.1), series) if d.reason == ZOOM]
    assert len(wide_gap) < len(dense) and len(high_floor) < len(dense)


def test_noise_above_the_floor_raises_the_threshold():
    """A noisy head that wanders with no trend is not a change: sigma of its increments x 3 x
    sqrt(watches) keeps it below the threshold (a floor alone would not)."""
    noisy = sigmoid_series(600, centre=10_000, width=10, noise=0.03)
    assert not [t for t, d in run_watch(watch(), noisy) if d.reason == ZOOM]
    assert [t for t, d in run_watch(watch(noise_multiple=1e-9), noisy) if d.reason == ZOOM]


def test_a_channel_without_a_floor_is_watched_but_never_a_trigger():
    series = {t: {**v, "loss/train": 4.0 - t / 100} for t, v in sigmoid_series(600, 10_000, 10, 0.003).items()}
    with_loss = run_watch(watch({"L1H0": 0.02, "L1H1": 0.02, "loss/train": 0.1}), series)
    without = run_watch(watch({"L1H0": 0.02, "L1H1": 0.02, "loss/train": None}), series)
    assert [d.reason for _, d in without] == [BASE] * len(BASE_STEPS)
    assert any(d.reason == ZOOM and d.channel == "loss/train" for _, d in with_loss)


def test_the_watch_interval_doubles_with_the_run():
    w = watch()  # watch_every 2, watch_gap 0.005
    assert [w.interval(s) for s in (0, 100, 799, 800, 1600, 3200, 50_000)] == [2, 2, 2, 4, 8, 16, 128]
    assert w.due(6) and not w.due(7) and w.due(100) and w.due(804) and not w.due(802) and w.due(500)  # 500: base


def test_no_lead_in_without_kept_weights():
    series = sigmoid_series(600, centre=330, width=12, noise=0.003)
    w = watch(lead_in=0)
    taken = run_watch(w, series)
    assert reasons(taken, ZOOM) and not reasons(taken, LEAD_IN) and not w.kept


def test_decisions_resume_from_the_state_exactly():
    """The state after any watched step, loaded into a fresh watch, gives the same decisions as
    the uninterrupted watch: what a resumed run relies on."""
    series = sigmoid_series(600, centre=330, width=12, noise=0.003)
    whole = run_watch(watch(), series)
    for cut in (97, 300, 321, 331, 347, 420):
        first = watch()
        head = run_watch(first, series, stop=cut)
        resumed = watch()
        resumed.load_state_dict(first.state_dict())
        assert head + run_watch(resumed, series, start=cut + 1) == whole
        assert resumed.taken == [t for t, _ in whole] and resumed.kept == w_kept(whole, series)
    with pytest.raises(ValueError, match="channels"):
        DensityWatch(settings(), BASE_STEPS, 64, {"L0H0": 0.02}).load_state_dict(watch().state_dict())


def w_kept(whole, series):
    w = watch()
    run_watch(w, series)
    return w.kept


@pytest.fixture(scope="module")
def smoke_configs():
    """The smoke preset's config on the fixed schedule and under adaptive density (composed once)."""
    return compose_config(["experiment=smoke"]), compose_config(["experiment=smoke", "checkpoint=adaptive"])


def test_adaptive_base_schedule_and_the_run_schedule(smoke_configs):
    fixed, on = smoke_configs
    assert not adaptive(fixed) and adaptive(on)
    tps, total, base = run_steps(on)
    # the base takes the smaller of the adaptive (10 log, 4 linear) and the fixed (smoke: 10 log, 5
    # linear) point counts
    assert base == checkpoint_steps(total, tps, 10, 4, on.checkpoint.first_tokens) != run_steps(fixed)[2]
    assert run_schedule(fixed, [0, 3]) == run_steps(fixed)[2]
    assert run_schedule(on, [7, 0, 3]) == [0, 3, 7]


@pytest.mark.parametrize("key,value,message", [
    ("checkpoint.adaptive.watch_every", 0, "watch_every=0"),
    ("checkpoint.adaptive.noise_window", 2, "noise_window=2"),
    ("checkpoint.adaptive.min_gap", -1.0, "min_gap=-1"),
    ("checkpoint.adaptive.loss_change", 0.0, "loss_change=0"),
    ("checkpoint.adaptive.growth", 1.0, "growth=1"),
    ("checkpoint.adaptive.watch_probes", 99, "exceeds probes.n_probes"),
    ("threads", "0", "threads must be auto or a positive number"),
    ("threads", "many", "threads must be auto or a positive number"),
])
def test_bad_adaptive_and_thread_settings_are_one_line_errors(smoke_configs, key, value, message):
    from omegaconf import OmegaConf

    cfg = smoke_configs[1].copy()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_thread_rule():
    no_env: dict[str, str] = {}
    assert choose("3", None, 2, no_env, free=lambda: 0.0) == (3, "set")
    assert choose("auto", None, 2, {"OMP_NUM_THREADS": "1"}, free=lambda: 2.0)[0] is None
    assert choose("auto", 2, 4, no_env, free=lambda: 0.0) == (2, "auto: as the run started")
    assert choose("auto", None, 2, no_env, free=lambda: 1.9)[0] == 2  # idle: torch's default
    assert choose("auto", None, 2, no_env, free=lambda: 1.1)[0] == 1  # one core busy elsewhere
    assert choose("auto", None, 2, no_env, free=lambda: 0.2)[0] == 1  # never fewer than one
    assert choose("auto", None, 4, no_env, free=lambda: 16.0)[0] == 4  # never more than torch's default


def test_free_cores_reads_this_machine():
    from train.threads import free_cores, usable_cores

    free = free_cores(0.05)
    assert 0 <= free <= len(usable_cores()) + 1e-9


def test_the_watch_measures_prefix_matching_and_keeps_weights_apart(smoke_configs):
    """train/watch.py on the hand-built induction circuit: the watched values are every head's
    prefix matching on the first `watch_probes` probes (the induction head near 1, the
    previous-token head near 0); the weights of a step the decisions keep are a copy that a later
    change of the model leaves alone, and they go through the resume state."""
    import torch

    from tests.handbuilt import induction_circuit, repeated_probes
    from train.core import metrics as M
    from train.watch import Watch

    model, probes = induction_circuit(), repeated_probes(24, period=10, repeats=3, n=8)
    cfg = smoke_configs[1]
    w = Watch(cfg, model, probes, BASE_STEPS, 64)
    values = w.values(model, 0)
    first = probes.repeated[: cfg.checkpoint.adaptive.watch_probes]
    expected = M.prefix_matching_score(M.attention_patterns(model, first), first)
    assert values == pytest.approx({f"L{l}H{h}": float(expected[l, h]) for l in range(2) for h in range(2)})
    assert values["L1H0"] > 0.95 and values["L0H0"] < 0.05
    assert [d.reason for d in w.decide.decide(0, values)] == [BASE]
    assert w.decide.decide(2, values) == [] and w.decide.kept == [2]  # nothing moved: step 2 is kept
    w.keep(2, model, torch.tensor(1.5), 3, 0.01)
    before = model.blocks[1].attn.W_Q.detach().clone()
    with torch.no_grad():
        model.blocks[1].attn.W_Q.zero_()
    assert torch.equal(w.kept[2].weights["blocks.1.attn.W_Q"], before)
    again = Watch(cfg, model, probes, BASE_STEPS, 64)
    again.load_state_dict(w.state_dict(), torch.device("cpu"))
    assert torch.equal(again.kept[2].weights["blocks.1.attn.W_Q"], before) and again.kept[2].loss_count == 3


def test_a_zoom_in_the_tail_does_not_start_the_tail_again_and_no_tail_just_before_a_base_step():
    """A blip of L1H1 (+0.1 at step 420) while the tail of L1H0's rise runs: the watch zooms on
    it, and the tail goes on with the gaps it had reached since the rise's last zoom; no tail
    checkpoint is taken within min_gap before a base checkpoint (that one serves)."""
    series = sigmoid_series(600, centre=360, width=12, noise=0.003)
    plain = run_watch(watch(min_gap=0.01), series)
    for t in range(420, 601):
        series[t] = series[t] | {"L1H1": series[t]["L1H1"] + 0.1}
    taken = run_watch(watch(min_gap=0.01), series)
    blip = [t for t, d in taken if d.reason == ZOOM and t >= 420]
    assert blip and blip[0] in (420, 422), taken
    before_blip = [t for t, d in taken if d.reason == TAIL and t < blip[0]]
    assert before_blip and reasons(taken, TAIL)[:len(before_blip)] == before_blip
    # the tail after the blip: its next gap d_k (k: tail checkpoints since the rise's last zoom
    # + 1) after the blip, not a new tail growing from 1% gaps, and no more tail checkpoints
    # than the rise's own tail had there
    steps, plain_tail = [t for t, _ in taken], reasons(plain, TAIL)
    z = [t for t in reasons(taken, ZOOM) if t < blip[0]][-1]
    before = [steps[steps.index(t) - 1] for t in before_blip] + [blip[-1]]
    d_k = tail_targets(settings(min_gap=0.01), z, math.log(z / steps[steps.index(z) - 1]), before)[-1][1]
    after = [t for t in reasons(taken, TAIL) if t > blip[-1]]
    assert after and math.log(after[0] / blip[-1]) >= d_k > 0.02, (after, blip, d_k)
    assert len(after) <= len([t for t in plain_tail if t > blip[-1]]), (after, plain_tail)
    assert all((b - t) / t >= 0.01 for t, d in taken if d.reason == TAIL for b in BASE_STEPS if b > t)
