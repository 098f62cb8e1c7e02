"""Automatic detection of the induction-head phase change: pure functions on arrays.

Everything is done against x = ln(tokens) (checkpoints at 0 tokens are dropped), the axis on
which Olsson et al. (2022) show the phase change.

Smoothing
---------
`local_linear` fits, around every point of a uniform grid in x, a straight line by weighted
least squares with Gaussian weights exp(-d^2 / 2h^2) (d = distance in ln tokens). Its intercept
is the smoothed value and its slope the derivative d y / d ln(tokens). The bandwidth h is
`PhaseParams.bandwidth` (default 0.12, i.e. about +-12 % in tokens), widened locally to the
distance of the `min_neighbors`-th nearest checkpoint where checkpoints are sparse. Noise level
sigma = standard deviation of the residuals of the raw points around the smooth curve. With
`spacing_weights` (on for runs under adaptive checkpoint density, whose rows say why each
checkpoint was taken) each checkpoint's weight is also multiplied by the stretch of x it stands
for (half the distance to each neighbour), so that a cluster of checkpoints counts for the
stretch it covers, not for its number.

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
    jump, and is not reported). Prefix-matching rises are exempt (a head that has risen above
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

Coincidence
-----------
Two windows coincide when their [start, end] intervals, each widened by `coincide_tol`
(ln tokens) on both sides, overlap. A phase change is reported when the ICL jump is found and
coincides with a prefix-matching rise or with the bump, or when a prefix-matching rise and the
bump coincide; otherwise "no phase change" (with what was and was not found).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from train.core import names as N


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
    return None if not math.isfinite(v) else float(f"{v:.6g}")


# --------------------------------------------------------------------------- smoothing

def clean_xy(tokens, values) -> tuple[np.ndarray, np.ndarray]:
    """ln(tokens) and values, keeping finite values at tokens > 0, sorted by tokens."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0)
    order = np.argsort(t[keep], kind="stable")
    return np.log(t[keep][order]), y[keep][order]


def local_linear(x, y, grid, bandwidth: float, min_neighbors: int = 4,
                 weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted local linear regression: (smoothed value, slope) at each grid point;
    `weights`: each point's weight besides the kernel's (None: all 1)."""
    x, y, grid = (np.asarray(a, dtype=float) for a in (x, y, grid))
    d = x[None, :] - grid[:, None]  # [G, N]
    k = min(max(min_neighbors, 2), len(x)) - 1
    h = np.maximum(bandwidth, np.sort(np.abs(d), axis=1)[:, k])
    w = np.exp(-0.5 * (d / h[:, None]) ** 2)
    if weights is not None:
        w = w * np.asarray(weights, dtype=float)[None, :]
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    t0, t1 = (w * y).sum(1), (w * d * y).sum(1)
    det = s0 * s2 - s1 * s1
    det = np.where(np.abs(det) < 1e-300, np.nan, det)
    return (s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det


@dataclass
class Smooth:
    x: np.ndarray       # raw ln tokens
    y: np.ndarray       # raw values
    grid: np.ndarray    # uniform grid in ln tokens
    value: np.ndarray   # smoothed value on the grid
    slope: np.ndarray   # d value / d ln tokens on the grid
    sigma: float        # residual noise of the raw points


MIN_POINTS = 5  # usable checkpoints (tokens > 0, finite value) a series needs to be smoothed


def smooth(tokens, values, params: PhaseParams = PhaseParams()) -> Smooth | None:
    """Smooth a series against ln(tokens); None if fewer than MIN_POINTS usable checkpoints."""
    x, y = clean_xy(tokens, values)
    if len(x) < MIN_POINTS or x[-1] - x[0] <= 0:
        return None
    grid = np.linspace(x[0], x[-1], params.grid_points)
    weights = np.diff(np.concatenate([[x[0]], (x[1:] + x[:-1]) / 2, [x[-1]]])) if params.spacing_weights else None
    value, slope = local_linear(x, y, grid, params.bandwidth, params.min_neighbors, weights)
    at_points, _ = local_linear(x, y, x, params.bandwidth, params.min_neighbors, weights)
    resid = y - at_points
    sigma = float(np.sqrt(np.nanmean(resid ** 2))) if len(resid) else 0.0
    return Smooth(x, y, grid, value, slope, sigma)


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
    complete = 0 < lo and hi < len(g) - 1
    win.extra["complete"] = complete
    if require_complete and lo == 0:
        reasons.append("already changing at the start of the analysed range")
    if require_complete and hi == len(g) - 1:
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
    win.reason = "; ".join(reasons) if reasons else "non-convex"
    return win


def coincide(a: Window, b: Window, tol: float) -> bool:
    if not (a.detected and b.detected):
        return False
    (a0, a1), (b0, b1) = a.interval(), b.interval()
    return a0 - tol <= b1 + tol and b0 - tol <= a1 + tol


# --------------------------------------------------------------------------- whole run

def detect_phase_change(tokens, loss, icl, heads: dict[str, Any] | None = None,
                        params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    """Detect the ICL jump, per-head prefix-matching rises and the loss bump of one run.

    tokens, loss (held-out), icl: 1-D arrays over checkpoints; heads: {"L1H0": prefix-matching
    array, ...}. Returns a JSON-ready dict (see `summary.json`)."""
    loss_sm = smooth(tokens, loss, params)
    icl_sm = smooth(tokens, icl, params)
    x0 = burn_in_end(loss_sm, params) if loss_sm is not None else None
    icl_win = detect_jump(icl_sm, -1, params.icl_min_jump, params, x_from=x0)
    bump = detect_bump(loss_sm, params, x_from=x0)
    head_wins = {}
    for name, series in (heads or {}).items():
        head_wins[name] = detect_jump(smooth(tokens, series, params), +1, params.pm_min_rise, params,
                                      min_level=params.pm_min_level, require_complete=False)
    rising = {k: w for k, w in head_wins.items() if w.detected}
    tol = params.coincide_tol
    pm_main = max(rising.values(), key=lambda w: w.size) if rising else None
    pairs = {
        "icl_bump": coincide(icl_win, bump, tol),
        "icl_prefix_matching": any(coincide(icl_win, w, tol) for w in rising.values()),
        "bump_prefix_matching": any(coincide(bump, w, tol) for w in rising.values()),
    }
    found = pairs["icl_bump"] or pairs["icl_prefix_matching"] or pairs["bump_prefix_matching"]
    window = None
    if found:
        members = [w for w, ok in ((icl_win, pairs["icl_bump"] or pairs["icl_prefix_matching"]),
                                   (bump, pairs["icl_bump"] or pairs["bump_prefix_matching"])) if ok]
        members += [w for w in rising.values() if coincide(w, icl_win, tol) or coincide(w, bump, tol)]
        steepest = icl_win.steepest if icl_win.detected else (pm_main.steepest if pm_main else bump.steepest)
        window = {"start_tokens": rounded(min(w.start for w in members)), "steepest_tokens": rounded(steepest),
                  "end_tokens": rounded(max(w.end for w in members))}
    found_names = [n for n, w in (("ICL jump", icl_win), ("loss bump", bump)) if w.detected]
    if rising:
        found_names.append("prefix-matching rise (" + ", ".join(sorted(rising)) + ")")
    if found:
        message = (f"phase change between {window['start_tokens']:,.0f} and {window['end_tokens']:,.0f} tokens "
                   f"(steepest {window['steepest_tokens']:,.0f}): " + ", ".join(found_names))
    elif loss_sm is None and icl_sm is None:
        n = max(len(clean_xy(tokens, loss)[0]), len(clean_xy(tokens, icl)[0]))
        message = (f"cannot tell: {n} usable checkpoint{'' if n == 1 else 's'} after step 0, and detection needs "
                   f"{MIN_POINTS}; the figures show the points there are")
    else:
        message = "no phase change" + (f" (only {', '.join(found_names)}, not coinciding)" if found_names else "")
    return {
        "phase_change": bool(found),
        "message": message,
        "window": window,
        "burn_in_end_tokens": rounded(float(np.exp(x0))) if x0 is not None else None,
        "icl_jump": icl_win.to_dict(),
        "loss_bump": bump.to_dict(),
        "prefix_matching": {k: w.to_dict() for k, w in head_wins.items()},
        "induction_heads": sorted(rising),
        "coincide": pairs,
        "params": params.to_dict(),
    }


def detect_run(run, params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    """`detect_phase_change` on a run's rows (an train.core.runs.Run): held-out loss, ICL score and
    every head's prefix-matching score against tokens. The analysis and live detection during
    training (train/live.py) both call this. A run under adaptive checkpoint density (its rows
    say why each checkpoint was taken) is smoothed with `spacing_weights`."""
    if not params.spacing_weights and run.has(N.CHECKPOINT_REASON):
        params = replace(params, spacing_weights=True)
    return detect_phase_change(run.tokens, run.series(N.LOSS_HELDOUT), run.series(N.ICL_SCORE),
                               run.head_series(N.PREFIX_MATCHING), params)
