"""Runs compared: grouped by the config values that differ between them, and figures across runs
(matplotlib Agg, log-x in tokens): the joint PCA of per-token losses and the runs overlaid, group
by group. Per-run figures: analysis/figures.py. Every figure function returns a matplotlib
Figure; the caller saves and closes it.

Groups: every run's config (the validated saved config, else its config.yaml) flattened to dotted
keys; the keys whose values differ between the runs, leaving out seeds (`seed`, `data.seed`,
`probes.seed`: runs that differ only there are one group, drawn as mean and spread), what does
not change training (`name`, `resume`, `device`, `logger`, `callbacks`, `live_detection_every`,
`data.cache_dir`, `checkpoint.save_weights`, `checkpoint.keep_resume_states`) and the copies of
data keys (`model.d_vocab`, `model.n_ctx`). A group's label is its values of those keys, the data
source as `data=OPTION` (its own keys then follow from it and are not repeated)."""
from __future__ import annotations

from typing import Any

import numpy as np

from analysis.figures import COLORS, WINDOW_COLOR, max_prefix, positive
from analysis.plots import plt
from train.core import names as N
from train.core.runs import Run, RunError

NOT_COMPARED = ("seed", "data.seed", "probes.seed", "name", "resume", "device", "logger", "callbacks",
                "live_detection_every", "data.cache_dir", "checkpoint.save_weights", "checkpoint.keep_resume_states",
                "model.d_vocab", "model.n_ctx")
MISSING = "-"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def run_config(run: Run) -> dict[str, Any]:
    """The run's config as a plain dict: validated and upgraded (Run.saved_config) where it can be
    read so, else config.yaml as it is ({} without one)."""
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(run.saved_config(), resolve=True)
    except (RunError, ValueError, OSError):
        return run.config


def _compared(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_COMPARED)


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The compared keys (module docstring) whose values differ between the flattened configs."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if _compared(k) and len({repr(c.get(k, MISSING)) for c in configs}) > 1]


def config_groups(runs: list[Run]) -> dict[str, str]:
    """{run path: group label}: the run's values of the keys that differ between the runs (module
    docstring); "same config" when only seeds differ."""
    flats = {str(r.path): _flat(run_config(r)) for r in runs}
    keys = differing_keys(list(flats.values()))
    by_source = "data._target_" in keys
    shared = {k for k in keys if all(k in f for f in flats.values())}
    out = {}
    for path, flat in flats.items():
        parts = [f"data={_option_name(flat.get('data._target_'))}"] if by_source else []
        parts += [f"{k}={flat.get(k, MISSING)}" for k in keys
                  if k != "data._target_" and not (by_source and k.startswith("data.") and k not in shared)]
        out[path] = ", ".join(parts) or "same config"
    return out


def group_numbers(groups: dict[str, str]) -> dict[str, int]:
    """{group label: its number, 1, 2, ...}: the legends name groups by number, the report's table
    gives each number its label."""
    return {label: i + 1 for i, label in enumerate(sorted(set(groups.values())))}


def _option_name(target: Any) -> str:
    from train.core.config import data_option

    return data_option(target, MISSING)


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
    for i, (r, t, xy) in enumerate(traj):
        ax.plot(xy[:, 0], xy[:, 1], "-", color=COLORS[i % len(COLORS)], lw=0.8, alpha=0.7,
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


def group_curves(runs: list[Run], getter, groups: dict[str, str],
                 n_grid: int = 200) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per group ({run path: label}): a common log-token grid and mean / min / max over the runs."""
    members_of: dict[str, list[Run]] = {}
    for r in runs:
        members_of.setdefault(groups[str(r.path)], []).append(r)
    out = {}
    for g, members in sorted(members_of.items()):
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


def fig_compare(runs: list[Run], results: dict[str, dict[str, Any]], groups: dict[str, str]):
    """Loss, ICL score and max prefix matching of all runs, grouped by the config values that differ
    ({run path: label}, `config_groups`): mean and min-max spread over the runs of a group (seeds),
    each run's steepest point of the phase change as a dotted line."""
    def icl(r: Run):
        return r.series(results.get(str(r.path), {}).get("icl_key", N.ICL_SCORE))

    panels = [("held-out loss", lambda r: r.series(N.LOSS_HELDOUT)),
              ("ICL score (icl_score_mixture where logged, as detected)", icl),
              ("max prefix matching, layers >= 1 (1-layer runs: layer 0)", max_prefix)]
    numbers = group_numbers(groups)
    labels = sorted(numbers, key=numbers.get)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100)
    for ax, (title, getter) in zip(axes, panels):
        curves = group_curves(runs, getter, groups)
        for i, g in enumerate(labels):
            if g not in curves:
                continue
            color = COLORS[i % len(COLORS)]
            t, mean, lo, hi, n = curves[g]
            ax.plot(t, mean, color=color, label=f"group {numbers[g]} (n={n})")
            if n > 1:
                ax.fill_between(t, lo, hi, color=color, alpha=0.2, lw=0)
            for r in runs:
                win = results.get(str(r.path), {}).get("window")
                if groups[str(r.path)] == g and win:
                    ax.axvline(win["steepest_tokens"], color=color, lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(title, fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", lw=0.8, ls=":"))
    names.append("a run's steepest point (phase change)")
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(len(names), 6), frameon=False)
    fig.suptitle("runs grouped by the config values that differ between them (the groups: the report's table): "
                 "mean, min-max over the runs of a group (seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(names) // 6), 1, 1))
    return fig
