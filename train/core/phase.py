"""Automatic detection of the induction-head phase change: pure functions on arrays.

Everything is done against x = ln(tokens) (checkpoints at 0 tokens are dropped), the axis on
which Olsson et al. (2022) show the phase change.

Smoothing
---------
`smooth` (train/core/smoothing.py): Gaussian-weighted local linear regression against ln tokens
with the params' `bandwidth`, `min_neighbors`, `grid_points`, `spacing_weights` (see `detect_run`).

Burn-in
-------
At the start of training the loss falls from ln(vocab) and the ICL score already drops (the
model learns position-dependent unigram/bigram statistics): a transient that looks like a jump
but is not the phase change. The analysed range starts at the end of this initial descent: the
first grid point at which the smoothed held-out loss has made `burn_in_drop_frac` of its total
descent (L_0 - L_min) and its slope has relaxed to `burn_in_relax` times the steepest slope seen
so far -- or, if the slope turns steeper again before relaxing that far (a second descent starts
while the first is still fading), the local maximum of the slope, counted once the slope has
fallen below it by `burn_in_turn` times the steepest slope. ICL jumps and the loss bump are only searched after it; prefix matching has no such
transient and is searched over the whole run.

Jumps (ICL score falls, prefix matching of a head rises)
-------------------------------------------------------
rate(x) = slope in the jump's direction. Steepest point = argmax rate. Window = the contiguous
stretch around it where rate >= `edge_frac` * peak rate (for a sigmoid step in ln tokens, 0.25
keeps about 87 % of the step). A jump counts only if
  * size (change of the smooth curve across the window) >= `icl_min_jump` nats
    (prefix matching: rise >= `pm_min_rise` and the head ends the window >= `pm_min_level`);
  * size >= `min_snr` * sigma (above the checkpoint-to-checkpoint noise);
  * concentration = (size / range of the smooth curve over the analysed span) divided by
    (window width / analysed width) >= `min_concentration`: the change is concentrated in a
    narrow window rather than a slow drift (a drift that is linear in ln tokens scores ~1);
  * the window is complete: the rate falls below the edge threshold on both sides within the
    analysed range (a change still under way at the end of the run is a drift or an unfinished
    jump: not detected). Prefix-matching rises are exempt (a head that has risen above
    `pm_min_level` and is still rising at the end is forming); they carry `complete: false`.

The bump
--------
After the burn-in a loss curve without a phase change is convex in ln tokens: its slope only
rises towards 0. Let x* be the steepest point after the burn-in and s_pre the largest slope
between the burn-in and x* (the onset, where the curve stops being convex). The excess slope
e(x) = s_pre - slope(x) > 0 marks the non-convex stretch; its integral from the onset until the
slope recovers to s_pre is the bump size in nats (how far the loss falls below the tangent
line at the onset, i.e. below its own earlier trend). Window = where e >= `edge_frac` * e(x*).
A bump counts if size >= `bump_min_nats`, size >= `min_snr` * sigma, and the dip in slope
e(x*) >= `bump_min_depth` * |s_pre| (the slope at least doubles by default).

Coincidence and verdict
-----------------------
Two windows coincide when their [start, end] intervals, each widened by `coincide_tol`
(ln tokens) on both sides, overlap. A window is finished when it ends before the run's last
checkpoint (rate or excess slope below the edge threshold there); one that passes every test
but that is unfinished (`unfinished: true`). The verdict:
  * "yes" (`phase_change: true`): among the finished windows, the ICL jump coincides with a
    prefix-matching rise or with the bump (Olsson et al.: in-context learning improves as
    induction heads form, with the bump in the loss). `window`: from the earliest start to the
    latest end of the ICL jump and the windows coinciding with it (the bump, and the rises that
    coincide with the jump or that bump); steepest = the ICL jump's;
  * "still rising at the end": no "yes", but the same rule holds once unfinished windows count:
    `unfinished_window` spans them up to the last checkpoint; `window` is null;
  * "too short to tell": nothing detected, and the run has fewer than MIN_POINTS usable
    checkpoints, or its loss is still in the initial descent at the last checkpoint (the smoothed
    slope there is at least `burn_in_relax` times the steepest slope: the burn-in never ended);
  * "no" otherwise (with what was found, not coinciding).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from train.core import names as N
from train.core.smoothing import MIN_POINTS, Smooth, clean_xy, local_linear, smooth_xy  # noqa: F401 (re-exported)


@dataclass
class PhaseParams:
    bandwidth: float = 0.12
    min_neighbors: int = 4
    grid_points: int = 400
    edge_frac: float = 0.25
    burn_in_drop_frac: float = 0.5
    burn_in_relax: float = 1 / 3
    burn_in_turn: float = 0.1
    icl_min_jump: float = 0.2
    pm_min_rise: float = 0.1
    pm_min_level: float = 0.15
    min_snr: float = 6.0
    min_concentration: float = 2.0
    bump_min_nats: float = 0.05
    bump_min_depth: float = 1.0
    coincide_tol: float = 0.1
    spacing_weights: bool = False

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Window:
    """A detected window in tokens; `size` in the signal's units (nats, or score for heads)."""
    start: float
    steepest: float
    end: float
    size: float
    detected: bool
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"start_tokens": self.start, "steepest_tokens": self.steepest, "end_tokens": self.end,
             "size": self.size, "detected": self.detected, "reason": self.reason}
        d.update(self.extra)
        return {k: (rounded(v) if isinstance(v, float) else v) for k, v in d.items()}

    def interval(self) -> tuple[float, float]:
        return math.log(self.start), math.log(self.end)


def rounded(v: float) -> float | None:
    return float(f"{v:.6g}") if math.isfinite(v) else None


def smooth(tokens, values, params: PhaseParams = PhaseParams()) -> Smooth | None:
    """The series smoothed against ln(tokens) (train/core/smoothing.py) with the params' smoothing
    settings; None if fewer than MIN_POINTS usable checkpoints."""
    return smooth_xy(tokens, values, params.bandwidth, params.min_neighbors, params.grid_points, params.spacing_weights)


# --------------------------------------------------------------------------- burn-in

def burn_in_end(loss: Smooth, params: PhaseParams = PhaseParams()) -> float:
    """ln(tokens) at which the initial loss descent is over (see module docstring)."""
    v, s = loss.value, loss.slope
    total = v[0] - np.nanmin(v)
    if not np.isfinite(total) or total <= 0:
        return float(loss.grid[0])
    s = np.where(np.isfinite(s), s, 0.0)
    steepest = np.minimum.accumulate(s)
    half = np.flatnonzero(v[0] - v >= params.burn_in_drop_frac * total)
    if not len(half):
        return float(loss.grid[-1])
    j_max = half[0]
    for i in range(half[0], len(s)):
        if s[i] >= params.burn_in_relax * steepest[i]:
            return float(loss.grid[i])
        if s[i] > s[j_max]:
            j_max = i
        elif s[j_max] - s[i] >= params.burn_in_turn * abs(steepest[i]):
            return float(loss.grid[j_max])  # the slope steepens again before relaxing: a new descent
    return float(loss.grid[-1])


# --------------------------------------------------------------------------- jumps

def _window_around(rate: np.ndarray, i_peak: int, frac: float) -> tuple[int, int]:
    thr = frac * rate[i_peak]
    lo = i_peak
    while lo > 0 and rate[lo - 1] >= thr:
        lo -= 1
    hi = i_peak
    while hi < len(rate) - 1 and rate[hi + 1] >= thr:
        hi += 1
    return lo, hi


def detect_jump(sm: Smooth | None, direction: int, min_size: float, params: PhaseParams = PhaseParams(),
                x_from: float | None = None, min_level: float | None = None,
                require_complete: bool = True) -> Window:
    """The steepest jump of a smoothed series in `direction` (+1 rise, -1 fall) after x_from."""
    nan = float("nan")
    if sm is None:
        return Window(nan, nan, nan, 0.0, False, "too few checkpoints")
    sel = np.flatnonzero(sm.grid >= (sm.grid[0] if x_from is None else x_from))
    if len(sel) < 5:
        return Window(nan, nan, nan, 0.0, False, "too few checkpoints after the burn-in")
    g, v = sm.grid[sel], sm.value[sel]
    rate = direction * sm.slope[sel]
    rate = np.where(np.isfinite(rate), rate, 0.0)
    i_peak = int(np.argmax(rate))
    if rate[i_peak] <= 0:
        return Window(nan, nan, nan, 0.0, False, "no movement in that direction")
    lo, hi = _window_around(rate, i_peak, params.edge_frac)
    size = float(direction * (v[hi] - v[lo]))
    span = float(np.nanmax(v) - np.nanmin(v))
    width = float(g[hi] - g[lo])
    total_width = float(g[-1] - g[0])
    concentration = (size / span) / max(width / total_width, 1e-9) if span > 0 else 0.0
    snr = size / sm.sigma if sm.sigma > 0 else float("inf")
    win = Window(float(np.exp(g[lo])), float(np.exp(g[i_peak])), float(np.exp(g[hi])), size, False,
                 extra={"concentration": concentration, "snr": min(snr, 1e6), "noise": sm.sigma,
                        "value_before": float(v[lo]), "value_after": float(v[hi]),
                        "peak_rate_per_ln_tokens": float(rate[i_peak])})
    reasons = []
    if size < min_size:
        reasons.append(f"change {size:.3g} < {min_size:g}")
    if min_level is not None and max(v[lo], v[hi]) < min_level:
        reasons.append(f"level {max(v[lo], v[hi]):.3g} < {min_level:g}")
    if snr < params.min_snr:
        reasons.append(f"signal/noise {snr:.3g} < {params.min_snr:g}")
    if concentration < params.min_concentration:
        reasons.append(f"concentration {concentration:.3g} < {params.min_concentration:g} (slow drift)")
    at_end = hi == len(g) - 1
    win.extra["complete"] = 0 < lo and not at_end
    if require_complete and lo == 0:
        reasons.append("already changing at the start of the analysed range")
    win.extra["unfinished"] = bool(at_end and not reasons)  # passes every test, but has no end yet
    if require_complete and at_end:
        reasons.append("still changing at the end of the run (no end to the jump)")
    win.detected = not reasons
    win.reason = "; ".join(reasons) if reasons else "jump"
    return win


def detect_bump(loss: Smooth | None, params: PhaseParams = PhaseParams(), x_from: float | None = None) -> Window:
    """The non-convex stretch of loss vs ln(tokens) after x_from (see module docstring)."""
    nan = float("nan")
    if loss is None:
        return Window(nan, nan, nan, 0.0, False, "too few checkpoints")
    sel = np.flatnonzero(loss.grid >= (loss.grid[0] if x_from is None else x_from))
    if len(sel) < 5:
        return Window(nan, nan, nan, 0.0, False, "too few checkpoints after the burn-in")
    g = loss.grid[sel]
    s = np.where(np.isfinite(loss.slope[sel]), loss.slope[sel], 0.0)
    i_star = int(np.argmin(s))
    i_on = int(np.argmax(s[: i_star + 1]))
    s_pre = float(s[i_on])
    excess = s_pre - s
    depth = float(excess[i_star])
    if depth <= 0 or i_star == 0:
        return Window(nan, nan, nan, 0.0, False, "convex after the burn-in")
    i_rec = i_star
    while i_rec < len(g) - 1 and excess[i_rec + 1] > 0:
        i_rec += 1
    seg = slice(i_on, i_rec + 1)
    size = float(np.trapezoid(np.maximum(excess[seg], 0.0), g[seg]))
    lo, hi = _window_around(excess, i_star, params.edge_frac)
    snr = size / loss.sigma if loss.sigma > 0 else float("inf")
    win = Window(float(np.exp(g[lo])), float(np.exp(g[i_star])), float(np.exp(g[hi])), size, False,
                 extra={"onset_tokens": float(np.exp(g[i_on])), "recovered_tokens": float(np.exp(g[i_rec])),
                        "recovered": bool(i_rec < len(g) - 1), "slope_before": s_pre,
                        "slope_steepest": float(s[i_star]), "snr": min(snr, 1e6), "noise": loss.sigma})
    reasons = []
    if size < params.bump_min_nats:
        reasons.append(f"size {size:.3g} nats < {params.bump_min_nats:g}")
    if snr < params.min_snr:
        reasons.append(f"signal/noise {snr:.3g} < {params.min_snr:g}")
    if depth < params.bump_min_depth * abs(s_pre):
        reasons.append(f"slope dip {depth:.3g} < {params.bump_min_depth:g} x |{s_pre:.3g}|")
    win.detected = not reasons
    win.extra["unfinished"] = bool(hi == len(g) - 1 and not reasons)
    win.reason = "; ".join(reasons) if reasons else "non-convex"
    return win


def coincide(a: Window, b: Window, tol: float, counts=lambda w: w.detected) -> bool:
    """Both windows count (by default: detected) and their widened intervals overlap."""
    if not (counts(a) and counts(b)):
        return False
    (a0, a1), (b0, b1) = a.interval(), b.interval()
    return a0 - tol <= b1 + tol and b0 - tol <= a1 + tol


def finished(w: Window) -> bool:
    """Detected, with an end before the run's last checkpoint."""
    return w.detected and not w.extra.get("unfinished")


def found_or_unfinished(w: Window) -> bool:
    """Detected, or passing every test but that of an end (still changing at the run's end)."""
    return w.detected or bool(w.extra.get("unfinished"))


def _combine(icl: Window, bump: Window, heads: dict[str, Window], tol: float, counts):
    """(coinciding pairs, the window or None) among the windows that `counts` (docstring: verdict)."""
    rising = {k: w for k, w in heads.items() if counts(w)}
    co = lambda a, b: coincide(a, b, tol, counts)  # noqa: E731
    pairs = {"icl_bump": co(icl, bump), "icl_prefix_matching": any(co(icl, w) for w in rising.values()),
             "bump_prefix_matching": any(co(bump, w) for w in rising.values())}
    if not (pairs["icl_bump"] or pairs["icl_prefix_matching"]):  # the ICL jump is required
        return pairs, None
    members = [icl] + ([bump] if pairs["icl_bump"] else [])
    members += [w for w in rising.values() if co(w, icl) or (pairs["icl_bump"] and co(w, bump))]
    return pairs, {"start_tokens": rounded(min(w.start for w in members)), "steepest_tokens": rounded(icl.steepest),
                   "end_tokens": rounded(max(w.end for w in members))}


YES, NO, STILL_RISING, TOO_SHORT = "yes", "no", "still rising at the end", "too short to tell"  # the verdicts


def fmt_tokens(v) -> str:
    """A token count for people, three significant digits: 512, 99.6k, 1.25M ("-" for None)."""
    if v is None or not math.isfinite(v):
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale * 0.9995:
            x = v / scale
            return f"{x:.{2 if abs(x) < 9.995 else 1 if abs(x) < 99.95 else 0}f}{unit}"
    return f"{v:.0f}"


def _names(icl: Window, bump: Window, heads: dict[str, Window], counts) -> str:
    found = [n for n, w in (("ICL jump", icl), ("loss bump", bump)) if counts(w)]
    rising = sorted(k for k, w in heads.items() if counts(w))
    return ", ".join(found + ([f"prefix-matching rise ({', '.join(rising)})"] if rising else []))


def _too_short(tokens, loss, icl, loss_sm, icl_sm, params: PhaseParams) -> str | None:
    """Why the run ends before anything could form (module docstring, Verdict), or None."""
    if loss_sm is None and icl_sm is None:
        n = max(len(clean_xy(tokens, loss)[0]), len(clean_xy(tokens, icl)[0]))
        return (f"cannot tell: {n} usable checkpoint{'' if n == 1 else 's'} after step 0, and detection needs "
                f"{MIN_POINTS}; the figures show the points there are")
    if loss_sm is None:
        return None
    slope = np.where(np.isfinite(loss_sm.slope), loss_sm.slope, 0.0)
    steepest = float(slope.min())
    if steepest < 0 and slope[-1] <= params.burn_in_relax * steepest:
        return (f"too short to tell: at the last checkpoint ({fmt_tokens(math.exp(loss_sm.x[-1]))} tokens) the loss "
                f"is still in its initial descent, falling at {slope[-1] / steepest:.0%} of its fastest rate "
                f"(the descent is over below {params.burn_in_relax:.0%}); train longer")
    return None


# --------------------------------------------------------------------------- whole run

def detect_phase_change(tokens, loss, icl, heads: dict[str, Any] | None = None,
                        params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    """Detect the ICL jump, per-head prefix-matching rises and the loss bump of one run, and the
    verdict (module docstring). tokens, loss (held-out), icl: 1-D arrays over checkpoints; heads:
    {"L1H0": prefix-matching array, ...}. Returns a JSON-ready dict (see `summary.json`)."""
    loss_sm = smooth(tokens, loss, params)
    icl_sm = smooth(tokens, icl, params)
    x0 = burn_in_end(loss_sm, params) if loss_sm is not None else None
    icl_win = detect_jump(icl_sm, -1, params.icl_min_jump, params, x_from=x0)
    bump = detect_bump(loss_sm, params, x_from=x0)
    head_wins = {name: detect_jump(smooth(tokens, series, params), +1, params.pm_min_rise, params,
                                   min_level=params.pm_min_level, require_complete=False)
                 for name, series in (heads or {}).items()}
    tol = params.coincide_tol
    pairs, window = _combine(icl_win, bump, head_wins, tol, finished)
    open_pairs, unfinished = (pairs, None) if window else _combine(icl_win, bump, head_wins, tol, found_or_unfinished)
    found = _names(icl_win, bump, head_wins, lambda w: w.detected)
    short = None if window or unfinished or any(w.detected for w in head_wins.values()) else \
        _too_short(tokens, loss, icl, loss_sm, icl_sm, params)
    if window:
        verdict = YES
        message = (f"phase change between {fmt_tokens(window['start_tokens'])} and {fmt_tokens(window['end_tokens'])}"
                   f" tokens (steepest {fmt_tokens(window['steepest_tokens'])}): {found}")
    elif unfinished:
        verdict = STILL_RISING
        message = (f"still rising at the end: {_names(icl_win, bump, head_wins, found_or_unfinished)} from "
                   f"{fmt_tokens(unfinished['start_tokens'])} tokens to the run's last checkpoint "
                   f"({fmt_tokens(unfinished['end_tokens'])}); no complete window")
    elif short:
        verdict, message = TOO_SHORT, short
    else:
        verdict = NO
        message = "no phase change" + (f" (only {found}: no ICL jump coinciding with a rise or the bump)"
                                       if found else "")
    return {
        "phase_change": verdict == YES, "verdict": verdict, "message": message,
        "window": window, "unfinished_window": unfinished,
        "burn_in_end_tokens": rounded(float(np.exp(x0))) if x0 is not None else None,
        "icl_jump": icl_win.to_dict(),
        "loss_bump": bump.to_dict(),
        "prefix_matching": {k: w.to_dict() for k, w in head_wins.items()},
        "induction_heads": sorted(k for k, w in head_wins.items() if w.detected),
        "coincide": open_pairs if unfinished else pairs, "params": params.to_dict(),
    }


def summary_entries(result: dict[str, Any], provisional: bool) -> dict[str, Any]:
    """The wandb run-summary entries of a detection (names: train/core/names.py phase_change_key):
    phase_change/{detected, verdict, start_tokens, steepest_tokens, end_tokens, induction_heads,
    message, provisional}. `provisional`: found by training on the rows so far (train/live.py);
    `python -m analysis` writes the final ones."""
    out: dict[str, Any] = {"detected": bool(result["phase_change"]), "verdict": result.get("verdict", ""),
                           "message": result["message"], "induction_heads": ",".join(result["induction_heads"]),
                           "provisional": provisional, **(result.get("window") or {})}
    return {N.phase_change_key(k): v for k, v in out.items()}


def icl_key(run) -> str:
    """The ICL score the detector reads: `icl_score_mixture` (held-out text with the training
    repetition) where the run logs it, else `icl_score`."""
    return N.ICL_SCORE_MIXTURE if run.has(N.ICL_SCORE_MIXTURE) else N.ICL_SCORE


def detect_run(run, params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    """`detect_phase_change` on a run's rows (a train.core.runs.Run; called by the analysis and by
    train/live.py): held-out loss, the ICL score of `icl_key` (named in the result) and every head's
    prefix-matching score, with `spacing_weights` if the rows say why each checkpoint was taken."""
    key, params = icl_key(run), replace(params, spacing_weights=params.spacing_weights or run.has(N.CHECKPOINT_REASON))
    return {**detect_phase_change(run.tokens, run.series(N.LOSS_HELDOUT), run.series(key),
                                  run.head_series(N.PREFIX_MATCHING), params), "icl_key": key}
