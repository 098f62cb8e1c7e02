"""Figures across runs (matplotlib Agg, log-x in tokens): the joint PCA of per-token losses and
the runs overlaid, grouped by number of layers. Per-run figures: analysis/figures.py. Every
function returns a matplotlib Figure; the caller saves and closes it."""
from __future__ import annotations

from typing import Any

import numpy as np

from analysis.figures import WINDOW_COLOR, max_prefix, positive
from analysis.plots import plt
from train.core import names as N
from train.core.runs import Run


def pca_trajectories(runs: list[Run]) -> tuple[list[tuple[Run, np.ndarray, np.ndarray]], np.ndarray] | None:
    """Joint PCA of per-position-loss vectors of all checkpoints of all runs (same length).
    Returns [(run, tokens, coords [C, 2])] and the explained-variance ratios."""
    data = []
    for r in runs:
        ppl = r.per_position_loss()
        if ppl is not None:
            data.append((r, *ppl))
    if not data:
        return None
    n = max(m.shape[1] for _, _, m in data)
    data = [(r, t, m) for r, t, m in data if m.shape[1] == n]
    allm = np.concatenate([m for _, _, m in data])
    ok = np.isfinite(allm).all(1)
    if ok.sum() < 3:
        return None
    mean = allm[ok].mean(0)
    _, sv, vt = np.linalg.svd(allm[ok] - mean, full_matrices=False)
    ratio = sv ** 2 / max((sv ** 2).sum(), 1e-30)
    out = []
    for r, t, m in data:
        good = np.isfinite(m).all(1)
        out.append((r, t[good], (m[good] - mean) @ vt[:2].T))
    return out, ratio[:2]


def fig_pca(runs: list[Run], results: dict[str, dict[str, Any]]):
    pca = pca_trajectories(runs)
    if pca is None:
        return None
    traj, ratio = pca
    pos = np.concatenate([t[t > 0] for _, t, _ in traj]) if traj else np.array([1.0])
    t_min, t_max = (pos.min(), pos.max()) if len(pos) else (1.0, 10.0)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (r, t, xy) in enumerate(traj):
        ax.plot(xy[:, 0], xy[:, 1], "-", color=cmap(i % 10), lw=0.8, alpha=0.7,
                label=r.label if len(traj) <= 12 else None)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.log10(np.maximum(t, t_min)), cmap="viridis", s=8, zorder=3,
                        vmin=np.log10(t_min), vmax=np.log10(t_max))
        win = results.get(str(r.path), {}).get("window")
        if win:
            inside = (t >= win["start_tokens"]) & (t <= win["end_tokens"])
            ax.scatter(xy[inside, 0], xy[inside, 1], s=40, facecolors="none", edgecolors=WINDOW_COLOR, zorder=4,
                       label="in phase-change window" if i == 0 else None)
        ax.annotate("start", xy[0], fontsize=6)
    fig.colorbar(sc, ax=ax, label="log10 tokens")
    ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.1%} of variance)" if len(ratio) > 1 else "PC2")
    ax.set_title("PCA of per-token-loss vectors across checkpoints (all runs jointly)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def group_curves(runs: list[Run], getter, n_grid: int = 200) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per group (n_layers): a common log-token grid and mean / min / max over the runs."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    out = {}
    for g, members in sorted(groups.items()):
        curves = []
        for r in members:
            t, y = positive(r.tokens, getter(r))
            ok = np.isfinite(y)
            if ok.sum() >= 2:
                curves.append((np.log(t[ok]), y[ok]))
        if not curves:
            continue
        lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
        if hi <= lo:
            continue
        grid = np.linspace(lo, hi, n_grid)
        ys = np.vstack([np.interp(grid, x, y) for x, y in curves])
        out[g] = (np.exp(grid), ys.mean(0), ys.min(0), ys.max(0), len(curves))
    return out


def fig_compare(runs: list[Run], results: dict[str, dict[str, Any]]):
    """Loss, ICL score and max prefix matching of all runs, grouped by n_layers (mean and
    min-max spread over seeds), phase-change steepest points as ticks."""
    panels = [("held-out loss", lambda r: r.series(N.LOSS_HELDOUT)), ("ICL score", lambda r: r.series(N.ICL_SCORE)),
              ("max prefix matching (layers >= 1)", max_prefix)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    cmap = plt.get_cmap("tab10")
    groups = sorted({r.group for r in runs})
    for ax, (title, getter) in zip(axes, panels):
        curves = group_curves(runs, getter)
        for i, g in enumerate(groups):
            if g not in curves:
                continue
            t, mean, lo, hi, n = curves[g]
            ax.plot(t, mean, color=cmap(i % 10), label=f"{g} (n={n})")
            if n > 1:
                ax.fill_between(t, lo, hi, color=cmap(i % 10), alpha=0.2, lw=0)
            for r in runs:
                win = results.get(str(r.path), {}).get("window")
                if r.group == g and win:
                    ax.axvline(win["steepest_tokens"], color=cmap(i % 10), lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("runs grouped by number of layers: mean, min-max over seeds; dotted = detected steepest point",
                 fontsize=9)
    fig.tight_layout()
    return fig
