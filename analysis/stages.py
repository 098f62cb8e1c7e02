"""Developmental stages around the phase change (after Hoogland et al. 2024, "The developmental
landscape of in-context learning"): pure functions on a run's series and on the phase-change
result of `train/core/phase.py`, whose smoothing (`smooth`, local linear in x = ln tokens) and
jump detector (`detect_jump`) they reuse. Nothing here is logged during training; the output is
the "stages" entry of `summary.json` (fields: docs/METRICS.md, "Stages (analysis only)").

Previous-token formation window
-------------------------------
Series: at each checkpoint, the max over the layer-0 heads of `previous_token/L0H{h}`
(checkpoints without any such key are skipped). Window: `detect_jump` in direction "up" on the
series smoothed with the PhaseParams of the run (bandwidth, min_neighbors, edge_frac, min_snr,
min_concentration), exactly as for a head's prefix-matching rise: the steepest point of the
smoothed rise, the contiguous stretch around it where the slope is >= edge_frac x its peak,
counted if the rise across the window is >= `pt_min_rise`, the window ends at a level
>= `pt_min_level`, size >= min_snr x noise and the rise is concentrated (>= min_concentration).
Searched over the whole run (no burn-in: previous-token heads may form during the initial loss
descent); a rise still under way at the end of the run counts and carries `complete: false`.

Induction window
----------------
Taken from the phase-change result, not recomputed: the prefix-matching rise of the head with
the largest detected rise (`prefix_matching[head]`, the head that anchors the phase change) and
the overall phase-change `window` (None when there is no phase change).

Order: previous-token before induction
--------------------------------------
Reference = the prefix-matching rise above, or, when no head rises, the phase-change window.
`previous_token_before_induction` is
  * True  when the previous-token window's steepest point is earlier than the reference's AND
    its start is no later than the reference's start;
  * False when both are detected and that does not hold (the previous-token rise comes after,
    or starts inside the induction rise);
  * None  when the previous-token rise or the reference is missing.
Gaps (positive = previous-token first): `steepest_gap_tokens` = reference steepest minus
previous-token steepest, `start_gap_tokens` likewise for the starts, `steepest_gap_ln_tokens`
= ln(reference steepest / previous-token steepest); `overlapping`: the two [start, end]
windows intersect (the message then says "together" unless the order is True).

LLC stage boundaries
--------------------
Series: `llc/mean` (the local learning coefficient), logged only at some checkpoints; rows
without a finite value are skipped; `llc/std` is only drawn. At least 5 checkpoints with tokens
> 0 are needed, else "too few LLC points" and no boundaries. The series is smoothed by
`phase.smooth` against ln tokens with bandwidth `llc_bandwidth`, widened where the points are
sparser to the distance of the `llc_min_neighbors`-th nearest LLC point (with the default 2 the
curve follows a sparse series closely; its noise is handled by the thresholds below). A sparse
series resolves only stages a few point spacings wide: at every 10th of the default 101
checkpoints the LLC points are about 0.5 ln tokens apart. On the smoothed curve v(x) with slope
s(x) = d v / d ln tokens, range R = max v - min v over the span [x_first, x_last] of width W,
noise sigma = `point_noise` of the LLC points (each point's deviation from the straight line
through its two neighbours, scaled to white noise, robust median; the smoother's residuals
would miss noise that a sparse series' smooth curve follows):
  * flat: if R <= `llc_min_snr` x sigma the LLC does not move beyond its noise: no boundaries.
  * turning points: points where s changes sign (local max / local min of v), kept only if v
    moves by at least delta = max(`llc_min_change` x R, `llc_min_snr` x sigma) away from them
    on both sides before the next kept turning point (a zigzag filter: a local max is kept once
    v has risen by delta to it from the previous kept minimum or the start, and falls by delta
    after it). Kinds `local_max`, `local_min`.
  * plateau edges: plateau = where |s| < thr, thr = `llc_plateau_frac` x R / W (that fraction
    of the mean slope of a curve covering its range monotonically over the span). Non-plateau
    gaps shorter than `llc_min_plateau` (ln tokens) between two plateau stretches are filled,
    then plateau stretches shorter than `llc_min_plateau` are dropped, and so are those that
    contain a kept turning point (the flat top or bottom of a reversal, marked by the turning
    point itself). A plateau's first grid point is a `plateau_start` boundary (where |s| falls
    below thr) and its last a `plateau_end` (where it rises above thr), except at the span's
    ends, and only if v moves by at least delta on the other side of the edge (between it and
    the neighbouring plateau or the span's end): a plateau edge marks where a real rise or fall
    stops or starts.
Boundaries are ordered by tokens; between consecutive boundaries (and the span's ends) each
stage gets a trend from its mean slope: `rising` (>= thr), `falling` (<= -thr), else `flat`.
Defaults (StageParams, overridable with `python -m analysis --set KEY=VALUE`): pt_min_rise 0.1,
pt_min_level 0.15, llc_bandwidth 0.25, llc_min_neighbors 2, llc_min_change 0.1, llc_min_snr 4,
llc_plateau_frac 0.3, llc_min_plateau 0.5. Measured on the synthetic curves of
tests/test_stages.py (15 points over 6.7 ln tokens, noise sd 0.3 on a range of ~45, 50 seeds):
plateau edges within 0.41 ln tokens and turning points within 0.27 of the noise-free curve's,
none missed or extra; pure noise (200 seeds) gave some boundary in 6 % of 15-point series and
0.5 % of 30-point ones.

Events
------
The ordered list (by tokens) of: previous-token rise start / steepest / end (end only when the
rise completed), prefix-matching rise start / steepest / end (likewise), ICL-jump and loss-bump
steepest points (when detected), phase-change window start / end, and the LLC boundaries.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from itertools import pairwise
from typing import Any

import numpy as np

from train.core import names as N
from train.core.phase import PhaseParams, Smooth, Window, detect_jump, fmt_tokens, rounded, smooth
from train.core.settings import check


class AnalysisError(ValueError):
    """Bad input to an analysis command (a --set pair, a wandb run): one line, no traceback."""


LLC_MEAN, LLC_STD = f"{N.LLC}/mean", f"{N.LLC}/std"  # the LLC's mean and std over SGLD chains (train/core/llc.py)

MIN_LLC_POINTS = 5  # what phase.smooth needs


@dataclass
class StageParams:
    pt_min_rise: float = 0.1
    pt_min_level: float = 0.15
    llc_bandwidth: float = 0.25
    llc_min_neighbors: int = 2
    llc_min_change: float = 0.1
    llc_min_snr: float = 4.0
    llc_plateau_frac: float = 0.3
    llc_min_plateau: float = 0.5

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# --------------------------------------------------------------------------- series

def layer0_previous_token(run) -> tuple[np.ndarray, list[str]]:
    """Max over layer-0 heads of the previous-token score per checkpoint (NaN where no layer-0
    head has one), and the heads it is taken over."""
    series = {k: v for k, v in run.head_series(N.PREVIOUS_TOKEN).items() if N.parse_head_name(k)[0] == 0}
    if not series:
        return np.full(len(run.rows), np.nan), []
    stack = np.vstack(list(series.values()))
    out = np.full(stack.shape[1], np.nan)
    ok = np.isfinite(stack).any(axis=0)
    out[ok] = np.nanmax(stack[:, ok], axis=0)
    return out, sorted(series, key=N.parse_head_name)


def smooth_llc(tokens, llc, params: StageParams = StageParams(),
               phase_params: PhaseParams = PhaseParams()) -> Smooth | None:
    """The LLC smoothed against ln tokens (None with fewer than 5 usable points)."""
    sp = replace(phase_params, bandwidth=params.llc_bandwidth, min_neighbors=params.llc_min_neighbors)
    return smooth(tokens, llc, sp)


def previous_token_window(tokens, series, params: StageParams = StageParams(),
                          phase_params: PhaseParams = PhaseParams()) -> Window:
    """The rise of the (max layer-0) previous-token score (see module docstring)."""
    return detect_jump(smooth(tokens, series, phase_params), +1, params.pt_min_rise, phase_params,
                       min_level=params.pt_min_level, require_complete=False)


# --------------------------------------------------------------------------- LLC boundaries

def _turning_points(v: np.ndarray, delta: float) -> list[tuple[int, str]]:
    """Zigzag filter: interior extrema of v with a move of >= delta on both sides."""
    out: list[tuple[int, str]] = []
    trend, hi, lo = 0, 0, 0
    for i in range(1, len(v)):
        if v[i] > v[hi]:
            hi = i
        if v[i] < v[lo]:
            lo = i
        if trend >= 0 and v[hi] - v[i] >= delta:
            if trend == 1:
                out.append((hi, "local_max"))
            trend, lo = -1, i
        elif trend <= 0 and v[i] - v[lo] >= delta:
            if trend == -1:
                out.append((lo, "local_min"))
            trend, hi = 1, i
    return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last)] index ranges where mask is True."""
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(mask) - 1))
    return out


def point_noise(x: np.ndarray, y: np.ndarray) -> float:
    """Noise of sparse points: 1.4826 x median |r_i| / sqrt(1 + a_i^2 + b_i^2), r_i = y_i minus the
    straight line through its two neighbours (a_i, b_i its interpolation weights). Exact for
    white noise on a straight line, and, through the median, little affected by a few points
    on sharp bends of the curve."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return 0.0
    a = (x[2:] - x[1:-1]) / (x[2:] - x[:-2])
    b = 1 - a
    r = (y[1:-1] - (a * y[:-2] + b * y[2:])) / np.sqrt(1 + a * a + b * b)
    return float(1.4826 * np.median(np.abs(r)))


def _plateaus(grid: np.ndarray, slope: np.ndarray, thr: float, min_width: float) -> list[tuple[int, int]]:
    mask = np.abs(slope) < thr
    segs = _runs(mask)
    for (_, a1), (b0, _) in pairwise(segs):  # fill short gaps between plateaus
        if grid[b0] - grid[a1] < min_width:
            mask[a1:b0] = True
    return [(a, b) for a, b in _runs(mask) if grid[b] - grid[a] >= min_width]


def llc_boundaries(tokens, llc, params: StageParams = StageParams(),
                   phase_params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    """Stage boundaries of the LLC curve (see module docstring). JSON-ready dict."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(llc, dtype=float)
    n = int((np.isfinite(t) & np.isfinite(y) & (t > 0)).sum())
    out: dict[str, Any] = {"logged": bool(np.isfinite(y).any()), "n_points": n, "boundaries": [], "stages": []}
    if not out["logged"]:
        out["message"] = "LLC not logged"
        return out
    sm = smooth_llc(t, y, params, phase_params) if n >= MIN_LLC_POINTS else None
    if sm is None:
        out["message"] = f"too few LLC points ({n} < {MIN_LLC_POINTS})"
        return out
    g, v, s = sm.grid, sm.value, sm.slope
    ok = np.isfinite(v) & np.isfinite(s)
    g, v, s = g[ok], v[ok], s[ok]
    noise = point_noise(sm.x, sm.y)
    value_range = float(v.max() - v.min())
    width = float(g[-1] - g[0])
    thr = params.llc_plateau_frac * value_range / width
    delta = max(params.llc_min_change * value_range, params.llc_min_snr * noise)
    out.update({"range": rounded(value_range), "noise": rounded(noise), "plateau_slope": rounded(thr),
                "min_move": rounded(delta), "first_tokens": rounded(float(math.exp(g[0]))),
                "last_tokens": rounded(float(math.exp(g[-1])))})
    if value_range <= params.llc_min_snr * noise or value_range <= 0:
        out["message"] = (f"LLC flat within noise (range {value_range:.3g} <= {params.llc_min_snr:g} x noise "
                          f"{noise:.3g}) from {n} points")
        return out
    found = list(_turning_points(v, delta))
    plateaus = [(a, b) for a, b in _plateaus(g, s, thr, params.llc_min_plateau)
                if not any(a <= i <= b for i, _ in found)]  # a reversal's flat top is marked by its turning point
    for k, (a, b) in enumerate(plateaus):
        before = plateaus[k - 1][1] if k > 0 else 0
        after = plateaus[k + 1][0] if k + 1 < len(plateaus) else len(g) - 1
        if a > 0 and np.max(np.abs(v[before:a + 1] - v[a])) >= delta:
            found.append((a, "plateau_start"))
        if b < len(g) - 1 and np.max(np.abs(v[b:after + 1] - v[b])) >= delta:
            found.append((b, "plateau_end"))
    found.sort(key=lambda p: p[0])
    out["boundaries"] = [{"tokens": rounded(float(math.exp(g[i]))), "kind": kind, "llc": rounded(float(v[i])),
                          "slope": rounded(float(s[i]))} for i, kind in found]
    cuts = [0] + [i for i, _ in found] + [len(g) - 1]
    for a, b in pairwise(cuts):
        if b <= a:
            continue
        mean_slope = float((v[b] - v[a]) / (g[b] - g[a]))
        trend = "rising" if mean_slope >= thr else "falling" if mean_slope <= -thr else "flat"
        out["stages"].append({"start_tokens": rounded(float(math.exp(g[a]))),
                              "end_tokens": rounded(float(math.exp(g[b]))),
                              "trend": trend, "llc_change": rounded(float(v[b] - v[a]))})
    kinds = [k for _, k in found]
    out["message"] = (f"{len(found)} LLC stage boundar{'y' if len(found) == 1 else 'ies'}"
                      + (f" ({', '.join(kinds)})" if found else "") + f" from {n} points")
    return out


# --------------------------------------------------------------------------- whole run

def _main_prefix_rise(phase_result: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    rising = [(k, w) for k, w in (phase_result.get("prefix_matching") or {}).items() if w.get("detected")]
    return max(rising, key=lambda kw: kw[1]["size"]) if rising else None


def _order(pt: dict[str, Any], ref: dict[str, Any] | None, ref_key: str | None, ref_name: str) -> dict[str, Any]:
    res: dict[str, Any] = {"previous_token_before_induction": None, "reference": ref_key if ref else None,
                           "steepest_gap_tokens": None, "start_gap_tokens": None, "steepest_gap_ln_tokens": None,
                           "overlapping": None}
    if not pt.get("detected"):
        res["message"] = f"no previous-token rise in layer 0 ({pt.get('reason', '')})"
        return res
    if ref is None:
        res["message"] = (f"previous-token rise steepest at {fmt_tokens(pt['steepest_tokens'])} tokens; "
                          "no prefix-matching rise or phase change to compare with")
        return res
    gap = ref["steepest_tokens"] - pt["steepest_tokens"]
    start_gap = ref["start_tokens"] - pt["start_tokens"]
    before = bool(gap > 0 and start_gap >= 0)
    overlapping = bool(pt["start_tokens"] <= ref["end_tokens"] and ref["start_tokens"] <= pt["end_tokens"])
    res.update({"previous_token_before_induction": before, "overlapping": overlapping,
                "steepest_gap_tokens": rounded(float(gap)),
                "start_gap_tokens": rounded(float(start_gap)),
                "steepest_gap_ln_tokens": rounded(math.log(ref["steepest_tokens"] / pt["steepest_tokens"]))})
    where = f"{ref_name} steepest {fmt_tokens(ref['steepest_tokens'])}"
    steep = f"steepest at {fmt_tokens(pt['steepest_tokens'])} tokens"
    if before:
        res["message"] = (f"previous-token heads form first: {steep}, {fmt_tokens(gap)} tokens before the {where}"
                          + (" (the windows overlap)" if overlapping else ""))
    elif overlapping:
        res["message"] = (f"previous-token heads form together with the induction rise: {steep} "
                          f"({fmt_tokens(abs(gap))} tokens {'before' if gap > 0 else 'after'} the {where}), starting "
                          f"{fmt_tokens(abs(start_gap))} tokens {'before' if start_gap >= 0 else 'after'} it")
    else:
        res["message"] = (f"previous-token heads form after the induction rise: {steep}, "
                          f"{fmt_tokens(-gap)} tokens after the {where}")
    return res


def _events(pt, pm_name, pm, phase_result, llc) -> list[dict[str, Any]]:
    ev: list[dict[str, Any]] = []

    def add(tokens, source, kind, label):
        if tokens is not None and math.isfinite(tokens):
            ev.append({"tokens": tokens, "source": source, "kind": kind, "label": label})

    for src, win, what in (("previous_token", pt, "previous-token rise (layer 0)"),
                           ("prefix_matching", pm, f"prefix-matching rise ({pm_name})")):
        if win and win.get("detected"):
            add(win["start_tokens"], src, "start", f"{what} starts")
            add(win["steepest_tokens"], src, "steepest", f"{what} steepest")
            if win.get("complete", True):
                add(win["end_tokens"], src, "end", f"{what} ends")
    for key, src, label in (("icl_jump", "icl", "ICL jump steepest"), ("loss_bump", "loss", "loss bump steepest")):
        w = phase_result.get(key) or {}
        if w.get("detected"):
            add(w["steepest_tokens"], src, "steepest", label)
    w = phase_result.get("window")
    if w:
        add(w["start_tokens"], "phase_change", "start", "phase-change window starts")
        add(w["end_tokens"], "phase_change", "end", "phase-change window ends")
    llc_labels = {"local_max": "LLC local maximum", "local_min": "LLC local minimum",
                  "plateau_start": "LLC plateau starts", "plateau_end": "LLC plateau ends"}
    for b in llc.get("boundaries", []):
        add(b["tokens"], "llc", b["kind"], llc_labels[b["kind"]])
    ev.sort(key=lambda e: e["tokens"])
    return ev


def detect_stages(run, phase_result: dict[str, Any], params: StageParams = StageParams(),
                  phase_params: PhaseParams | None = None) -> dict[str, Any]:
    """Previous-token window, induction window, LLC boundaries, ordered events and the order of
    previous-token and induction formation of one run (train.core.runs.Run). `phase_result` is
    `detect_phase_change`'s output; its smoothing parameters are used unless `phase_params` is
    given. JSON-ready dict (fields: docs/METRICS.md)."""
    if phase_params is None:
        known = {f.name for f in fields(PhaseParams)}
        phase_params = PhaseParams(**{k: v for k, v in (phase_result.get("params") or {}).items() if k in known})
    tokens = run.tokens
    pt_series, pt_heads = layer0_previous_token(run)
    if pt_heads:
        pt = previous_token_window(tokens, pt_series, params, phase_params).to_dict()
    else:
        pt = Window(math.nan, math.nan, math.nan, 0.0, False, f"no layer-0 {N.PREVIOUS_TOKEN} scores").to_dict()
    pt["heads"] = pt_heads
    main = _main_prefix_rise(phase_result)
    pm_name, pm = main if main else (None, None)
    window = phase_result.get("window")
    if pm is not None:
        ref, ref_key, ref_name = pm, "prefix_matching", f"prefix-matching ({pm_name})"
    elif window:
        ref, ref_key, ref_name = window, "phase_change", "phase-change"
    else:
        ref, ref_key, ref_name = None, None, ""
    llc = llc_boundaries(tokens, run.series(LLC_MEAN), params, phase_params)
    order = _order(pt, ref, ref_key, ref_name)
    return {
        "previous_token": pt,
        "induction": {"prefix_matching_head": pm_name, "prefix_matching": pm, "phase_change": window},
        "llc": llc,
        "events": _events(pt, pm_name, pm, phase_result, llc),
        "previous_token_before_induction": order.pop("previous_token_before_induction"),
        "order": order,
        "message": order["message"] + "; " + llc["message"],
        "params": params.to_dict(),
    }


def detection_params(pairs: list[str]) -> tuple[PhaseParams, StageParams]:
    """--set KEY=VALUE pairs: keys of PhaseParams (train/core/phase.py) or StageParams (analysis/stages.py);
    int fields take ints > 0, the others floats >= 0 (bandwidths > 0; `*_frac`, `burn_in_*` <= 1)."""
    phase_fields = {f.name: type(f.default) for f in fields(PhaseParams)}
    stage_fields = {f.name: type(f.default) for f in fields(StageParams)}
    known = phase_fields | stage_fields
    phase_values, stage_values = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise AnalysisError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            number = int(value) if known[key] is int else float(value)
            fraction = key.endswith("_frac") or key.startswith("burn_in_")  # shares of a range or a drop
            check(key, number, 0, 1 if fraction else None, above=key.endswith("bandwidth") or known[key] is int)
        except ValueError as e:
            raise AnalysisError(f"--set {pair!r}: {e if 'must be' in str(e) else f'{value!r} is not a number'}") from None
        (phase_values if key in phase_fields else stage_values)[key] = number
    return PhaseParams(**phase_values), StageParams(**stage_values)
