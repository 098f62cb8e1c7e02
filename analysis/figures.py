"""Olsson-style figures of one run (matplotlib Agg, log-x in tokens, detected windows shaded);
figures across runs: analysis/comparison.py. Every function returns a matplotlib Figure; the
caller saves and closes it."""
from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np

from analysis.plots import plt
from train.core import names as N
from train.core.phase import PhaseParams, fmt_tokens, local_linear, smooth
from train.core.runs import Run

WINDOW_COLOR = "tab:orange"  # the phase-change window; no line takes this colour
PREVIOUS_TOKEN_COLOR = "tab:purple"
# Line colours (heads, run groups): tab10 without the window's orange and the previous-token purple.
COLORS = ["tab:blue", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan", "black"]


def positive(tokens, *arrays):
    """(tokens, *arrays) at the finite, positive token counts (a log axis shows only those)."""
    t = np.asarray(tokens, dtype=float)
    keep = np.isfinite(t) & (t > 0)
    return (t[keep],) + tuple(np.asarray(a)[keep] for a in arrays)


def shade(ax, win: dict[str, Any] | None, label: str | None = "detected window", color=WINDOW_COLOR):
    """A window shaded, its steepest point dashed (legend entries when `label`)."""
    if not win or not win.get("detected", True) or win.get("start_tokens") is None:
        return
    ax.axvspan(win["start_tokens"], win["end_tokens"], color=color, alpha=0.18, lw=0, label=label)
    if win.get("steepest_tokens"):
        ax.axvline(win["steepest_tokens"], color=color, lw=1, ls="--",
                   label=f"{label.split(' (')[0]}: steepest point" if label else None)


def mark_window(ax, result: dict[str, Any], label: bool = True) -> None:
    """The run's one phase-change window (train/core/phase.py `window`), shaded orange with its
    steepest point dashed; a window still open at the last checkpoint (`unfinished_window`)
    hatched instead."""
    if result.get("window"):
        shade(ax, result["window"], label=f"phase-change window ({_span(result['window'])})" if label else None)
    elif result.get("unfinished_window"):
        w = result["unfinished_window"]
        ax.axvspan(w["start_tokens"], w["end_tokens"], facecolor="none", edgecolor=WINDOW_COLOR, hatch="//",
                   lw=0, alpha=0.6, label=f"still rising at the end (from {fmt_tokens(w['start_tokens'])})"
                   if label else None)


def _span(w: dict[str, Any]) -> str:
    return f"{fmt_tokens(w['start_tokens'])}-{fmt_tokens(w['end_tokens'])}"


def _burn_in(ax, result):
    b = result.get("burn_in_end_tokens")
    if b:
        ax.axvline(b, color="0.5", lw=0.8, ls=":", label="end of burn-in")


def _grid_tokens(sm):
    return np.exp(sm.grid)


def fig_loss(run: Run, result: dict[str, Any], params: PhaseParams = PhaseParams()):
    """Held-out loss with the bump marked, and d loss / d ln(tokens)."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, dpi=100)
    t, loss = positive(run.tokens, run.series(N.LOSS_HELDOUT))
    ax.plot(t, loss, ".", ms=3, color="tab:blue", label="held-out loss")
    if run.has(N.LOSS_TRAIN):
        tt, lt = positive(run.tokens, run.series(N.LOSS_TRAIN))
        ax.plot(tt, lt, "-", lw=0.6, color="0.6", alpha=0.7, label="train loss")
    sm = smooth(run.tokens, run.series(N.LOSS_HELDOUT), params)
    bump = result.get("loss_bump", {})
    if sm is not None:
        ax.plot(_grid_tokens(sm), sm.value, "-", color="tab:blue", lw=1.2, label="smoothed")
        ax2.plot(_grid_tokens(sm), sm.slope, "-", color="tab:blue", label="slope of the smoothed loss")
        if bump.get("detected") and bump.get("onset_tokens"):
            # the earlier trend: tangent line at the onset of non-convexity
            x_on = math.log(bump["onset_tokens"])
            i = int(np.argmin(np.abs(sm.grid - x_on)))
            xs = sm.grid[i:]
            ax.plot(np.exp(xs), sm.value[i] + bump["slope_before"] * (xs - sm.grid[i]), "--", color="0.3", lw=0.8,
                    label=f"earlier trend (bump {bump['size']:.2f} nats)")
            ax2.axhline(bump["slope_before"], color="0.3", ls="--", lw=0.8, label="slope at the onset (earlier trend)")
    for a in (ax, ax2):
        shade(a, bump if bump.get("detected") else None, label="loss bump")
        _burn_in(a, result)
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{run.label}: loss " + (f"- bump of {bump['size']:.2f} nats, {_span(bump)} tokens"
                                          if bump.get("detected") else "- no bump"), fontsize=9)
    ax.legend(fontsize=7)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    ax2.set_ylabel("d loss / d ln(tokens)")
    ax2.set_xlabel("tokens")
    ax2.set_xscale("log")
    fig.tight_layout()
    return fig


def fig_icl(run: Run, result: dict[str, Any], params: PhaseParams = PhaseParams()):
    """The ICL score the detector read (`icl_key`: icl_score_mixture where logged) with the jump."""
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    key = result.get("icl_key", N.ICL_SCORE)
    t, icl = positive(run.tokens, run.series(key))
    ax.plot(t, icl, ".", ms=3, color="tab:green", label=key)
    sm = smooth(run.tokens, run.series(key), params)
    if sm is not None:
        ax.plot(_grid_tokens(sm), sm.value, "-", color="tab:green", lw=1.2, label="smoothed")
    win = result.get("icl_jump", {})
    shade(ax, win if win.get("detected") else None, label="ICL jump")
    _burn_in(ax, result)
    late, early = _last(run, N.ICL_LATE), _last(run, N.ICL_EARLY)
    ax.set_ylabel(f"{key}: loss[{late}] - loss[{early}]" if late is not None else f"{key} (nats)")
    ax.set_xlabel("tokens")
    ax.set_xscale("log")
    ax.axhline(0, color="0.7", lw=0.5, label="0: the context does not help")
    state = (f"jump of {win['size']:.2f} nats, {_span(win)} tokens" if win.get("detected")
             else f"no jump ({win.get('reason', '')})")
    ax.set_title(f"{run.label}: in-context learning score - {state}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _last(run: Run, key: str):
    for r in reversed(run.rows):
        if key in r:
            return r[key]
    return None


def fig_heads(run: Run, result: dict[str, Any]):
    """Prefix matching (and copying) per head over training, induction heads highlighted."""
    metrics = [m for m in (N.PREFIX_MATCHING, N.COPYING) if run.head_names(m)]
    if not metrics:
        return None
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 3.2 * len(metrics)), sharex=True, dpi=100, squeeze=False)
    induction = set(result.get("induction_heads", []))
    names = run.head_names(metrics[0])
    n_layers = 1 + max(N.parse_head_name(n)[0] for n in names)
    for ax, metric in zip(axes[:, 0], metrics):
        for name, series in run.head_series(metric).items():
            layer, head = N.parse_head_name(name)
            t, y = positive(run.tokens, series)
            hot = name in induction
            ax.plot(t, y, ["-", "--", ":", "-."][layer % 4], lw=2.2 if hot else 0.9, alpha=1.0 if hot else 0.6,
                    color=COLORS[head % len(COLORS)],
                    label=f"{name}{' (induction)' if hot else ''}" if hot or n_layers * 4 <= 16 else None)
        mark_window(ax, result)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_xscale("log")
        ax.legend(fontsize=6, ncol=2)
    axes[0, 0].set_title(f"{run.label}: per-head scores (colour = head, line style = layer, thick = induction head)", fontsize=9)
    axes[-1, 0].set_xlabel("tokens")
    fig.tight_layout()
    return fig


def fig_per_position(run: Run, result: dict[str, Any]):
    """Per-position loss over training (token index x tokens) and its derivative w.r.t.
    ln(token index)."""
    ppl = run.per_position_loss()
    if ppl is None:
        return None
    tokens, mat = ppl
    keep = np.isfinite(tokens) & (tokens > 0)
    tokens, mat = tokens[keep], mat[keep]
    if len(tokens) < 2 or mat.shape[1] < 3:
        return None
    index = np.arange(1, mat.shape[1] + 1)  # element i predicts token i + 1 after i + 1 tokens
    # slope by Gaussian local linear regression in ln(index) (raw differences are noisy at
    # large indices, where ln(index) steps are tiny)
    li = np.log(index)
    deriv = np.vstack([local_linear(li, row, li, bandwidth=0.3, min_neighbors=4)[1] if np.isfinite(row).all()
                       else np.full(len(li), np.nan) for row in mat])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for a, data, title, cmap in ((ax, mat, "loss per token index (nats)", "viridis"),
                                 (ax2, deriv, "d loss / d ln(token index)", "RdBu_r")):
        if cmap == "RdBu_r":
            lim = np.nanpercentile(np.abs(data), 99) or 1.0
            im = a.pcolormesh(tokens, index, data.T, shading="nearest", cmap=cmap, vmin=-lim, vmax=lim)
        else:
            im = a.pcolormesh(tokens, index, data.T, shading="nearest", cmap=cmap)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("tokens")
        a.set_ylabel("token index")
        a.set_title(title, fontsize=9)
        fig.colorbar(im, ax=a)
        win = result.get("window") or result.get("unfinished_window")
        if win:
            for x in (win["start_tokens"], win["end_tokens"]):
                a.axvline(x, color="white" if cmap == "viridis" else "black", lw=1, ls="--")
    fig.suptitle(f"{run.label}" + (f"; dashed: the phase-change window, {_span(result['window'])} tokens"
                                   if result.get("window") else ""), fontsize=9)
    fig.tight_layout()
    return fig


def fig_labels(run: Run, result: dict[str, Any] | None = None):
    """is_behavioral / is_mechanistic per head over time (only when those keys exist)."""
    beh, mech = run.head_series(N.IS_BEHAVIORAL), run.head_series(N.IS_MECHANISTIC)
    names = sorted(set(beh) | set(mech), key=N.parse_head_name)
    if not names:
        return None
    t = run.tokens
    keep = np.isfinite(t) & (t > 0)
    if not keep.any():  # only step 0: no point on a log axis
        return None
    code = np.zeros((len(names), int(keep.sum())))
    for i, n in enumerate(names):
        b = np.nan_to_num(beh.get(n, np.zeros(len(t))))[keep] > 0.5
        m = np.nan_to_num(mech.get(n, np.zeros(len(t))))[keep] > 0.5
        code[i] = b * 1 + m * 2
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#eeeeee", "tab:blue", "tab:red", "tab:purple"])
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.28 * len(names)), dpi=100)
    ax.pcolormesh(t[keep], np.arange(len(names)), code, cmap=cmap, vmin=-0.5, vmax=3.5, shading="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=l) for c, l in zip(cmap.colors, ["neither", "behavioral only",
                                                                     "mechanistic only", "both"])]
    win = (result or {}).get("window") or (result or {}).get("unfinished_window")
    if win:
        for x in (win["start_tokens"], win["end_tokens"]):
            ax.axvline(x, color="black", lw=1.2, ls="--")
        handles.append(Line2D([], [], color="black", lw=1.2, ls="--",
                              label=("phase-change window " if result.get("window") else "still rising from ")
                              + _span(win)))
    ax.legend(handles=handles, fontsize=7, ncol=len(handles), loc="upper center", bbox_to_anchor=(0.5, -0.35),
              frameon=False)
    ax.set_title(f"{run.label}: induction-head labels per head", fontsize=9)
    fig.tight_layout()
    return fig


def max_prefix(run: Run) -> np.ndarray:
    """Max prefix matching over heads of layers >= 1 (over all heads for 1-layer models)."""
    hs = run.head_series(N.PREFIX_MATCHING)
    later = {k: v for k, v in hs.items() if N.parse_head_name(k)[0] > 0} or hs
    if not later:
        return np.full(len(run.rows), np.nan)
    return np.nanmax(np.vstack(list(later.values())), axis=0)


# --------------------------------------------------------------------------- developmental stages

STAGE_COLORS = {"local_max": "tab:red", "local_min": "tab:blue", "plateau_start": "0.35", "plateau_end": "0.35"}
STAGE_STYLES = {"local_max": "-", "local_min": "-", "plateau_start": ":", "plateau_end": "--"}


def fig_stages(run: Run, result: dict[str, Any], stages: dict[str, Any], params: PhaseParams = PhaseParams(),
               stage_params=None):
    """Developmental stages on one log-token axis (analysis/stages.py): the LLC (error bars =
    its std where logged), held-out loss, ICL score, max prefix matching over layers >= 1 and
    max layer-0 previous-token score, stacked; previous-token window (purple) and the run's
    phase-change window (orange; hatched while still rising at the end) shaded, LLC stage boundaries as vertical lines on every panel. Without LLC
    the other panels are drawn and the title says so."""
    from analysis import stages as S

    has_llc = bool(np.isfinite(run.series(S.LLC_MEAN)).any())
    pt_series, _ = S.layer0_previous_token(run)
    panels = (["llc"] if has_llc else []) + ["loss", "icl", "prefix", "previous"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 0.6), sharex=True, dpi=100,
                             squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    if has_llc:
        _llc_panel(axes["llc"], run, stage_params or S.StageParams(), params)
    for name, y, color, ylabel in (("loss", run.series(N.LOSS_HELDOUT), "tab:blue", "held-out loss"),
                                   ("icl", run.series(result.get("icl_key", N.ICL_SCORE)), "tab:green",
                                    result.get("icl_key", N.ICL_SCORE).replace("_", " ")),
                                   ("prefix", max_prefix(run), "tab:red", "max prefix matching\n(layers >= 1)"),
                                   ("previous", pt_series, PREVIOUS_TOKEN_COLOR, "max previous-token\n(layer 0)")):
        _series_panel(axes[name], run.tokens, y, color, ylabel, params)
    _stage_marks(list(axes.values()), stages, result)
    top = axes[panels[0]]
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=6, ncol=2, loc="best")
    axes[panels[-1]].set_xlabel("tokens")
    llc_state = stages.get("llc", {}).get("message", "") if has_llc else "LLC not logged"
    order = textwrap.fill(stages.get("order", {}).get("message", ""), 110)
    fig.suptitle(f"{run.label}: developmental stages - {llc_state}\n{order}",
                 fontsize=8)
    fig.tight_layout()
    return fig


def _series_panel(ax, tokens, y, color, ylabel, params: PhaseParams):
    """The points of `y` and their smoothed curve (train/core/phase.py smooth)."""
    t, v = positive(tokens, y)
    ok = np.isfinite(v)
    ax.plot(t[ok], v[ok], ".", ms=3, color=color)
    sm = smooth(tokens, y, params)
    if sm is not None:
        ax.plot(_grid_tokens(sm), sm.value, "-", color=color, lw=1.2)
    ax.set_ylabel(ylabel, fontsize=8)


def _llc_panel(ax, run: Run, stage_params, params: PhaseParams):
    """The LLC with its std over chains as error bars (where logged) and its smoothed curve."""
    from analysis import stages as S

    tokens, llc = run.tokens, run.series(S.LLC_MEAN)
    t, v, sd = positive(tokens, llc, run.series(S.LLC_STD))
    ok = np.isfinite(v)
    with_sd = ok & np.isfinite(sd)
    if with_sd.any():
        ax.errorbar(t[with_sd], v[with_sd], yerr=sd[with_sd], fmt="o", ms=3, color="k", ecolor="0.5",
                    capsize=2, lw=0.8, label="LLC (mean +- std)")
    if (ok & ~with_sd).any():
        ax.plot(t[ok & ~with_sd], v[ok & ~with_sd], "o", ms=3, color="k", label="LLC")
    sm = S.smooth_llc(tokens, llc, stage_params, params)
    if sm is not None:
        ax.plot(_grid_tokens(sm), sm.value, "-", color="k", lw=1.0, alpha=0.7, label="smoothed")
    ax.set_ylabel("LLC", fontsize=8)


def _stage_marks(axes: list, stages: dict[str, Any], result: dict[str, Any]) -> None:
    """On every panel: the previous-token rise and the run's phase-change window shaded (the one
    window of the report), the LLC stage boundaries as vertical lines, a log token axis; labels
    on the first panel only."""
    pt_win = stages.get("previous_token") or {}
    seen = set()
    for i, ax in enumerate(axes):
        first = i == 0
        shade(ax, pt_win if pt_win.get("detected") else None, label="previous-token rise (layer 0)" if first else None,
              color=PREVIOUS_TOKEN_COLOR)
        mark_window(ax, result, label=first)
        for b in stages.get("llc", {}).get("boundaries", []):
            kind = b["kind"]
            label = f"LLC {kind.replace('_', ' ')}" if first and kind not in seen else None
            if first:
                seen.add(kind)
            ax.axvline(b["tokens"], color=STAGE_COLORS.get(kind, "0.3"), ls=STAGE_STYLES.get(kind, "-"), lw=1.1,
                       label=label)
        ax.set_xscale("log")
        ax.tick_params(labelsize=7)
