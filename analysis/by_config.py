"""python -m analysis.by_config SWEEP_DIR --key data.repeat.p [--key data.repeat.form] [--out DIR]:
when does the phase change come, as a function of swept config values?

Runs the same detection as `python -m analysis` (train/core/phase.py, default parameters or
`--set`) on every run under SWEEP_DIR, groups the runs by the values of the given config keys
(read from each run's config.yaml), and writes:

* `by_config.md`: one row per group: the keys' values, the runs with a phase change out of all, the
  tokens at the steepest point of each run's window (sorted; "none" for a run without one), their
  median, the last-layer max prefix-matching score at each run's last checkpoint (sorted: how far
  the induction heads got, window or not), and the tokens the runs trained for;
* `by_config.png`: left, the steepest-point tokens against the first key (log scale), one marker
  per run, one colour per value of the second key, runs without a phase change at the top, marked
  "none"; right, the last-layer max prefix matching at the end against the first key (its values
  in order on the axis when they are not all numbers).

Both are written together or not at all (train/core/outputs.py: --out is new, empty or an
earlier by_config, or --force).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from analysis.stages import AnalysisError, detection_params
from train.core import edge, outputs
from train.core.phase import detect_run
from train.core.runs import Run, RunError, load_runs
from train.core import names as N


def final_prefix_matching(run: Run) -> float | None:
    """The largest last-layer prefix-matching score at the run's last checkpoint that has one."""
    heads = run.head_series(N.PREFIX_MATCHING)
    last = max((N.parse_head_name(h)[0] for h in heads), default=None)
    if last is None:
        return None
    series = np.array([v for h, v in heads.items() if N.parse_head_name(h)[0] == last])  # [heads, checkpoints]
    finite = np.isfinite(series).all(0)
    return float(series[:, finite][:, -1].max()) if finite.any() else None


def config_value(run: Run, key: str) -> Any:
    """The value of a dotted key in the run's saved config (None when absent)."""
    node: Any = run.config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def group_runs(runs: list[Run], keys: list[str], results: dict[str, dict]) -> list[dict[str, Any]]:
    """One entry per combination of the keys' values (sorted): values, steepest tokens per run
    (None: no phase change) and the runs' total tokens."""
    groups: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        values = tuple(config_value(run, k) for k in keys)
        g = groups.setdefault(values, {"values": values, "steepest": [], "final": [], "trained": []})
        window = results[str(run.path)]["window"]
        g["steepest"].append(window["steepest_tokens"] if window else None)
        g["final"].append(final_prefix_matching(run))
        g["trained"].append(float(run.tokens[-1]))
    return [groups[k] for k in sorted(groups, key=lambda v: tuple((x is None, str(type(x)), x) for x in v))]


def _tokens(t: float | None) -> str:
    return "none" if t is None else f"{t / 1e6:.2f}M"


def table(keys: list[str], groups: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(keys) + " | phase change | steepest (tokens) | median | prefix matching at the end | trained |",
             "|" + " --- |" * (len(keys) + 5)]
    for g in groups:
        found = sorted(t for t in g["steepest"] if t is not None)
        cells = [str(v) for v in g["values"]]
        runs = ", ".join([_tokens(t) for t in found] + ["none"] * (len(g["steepest"]) - len(found)))
        median = _tokens(float(np.median(found))) if len(found) * 2 > len(g["steepest"]) else "none"
        trained = _tokens(max(g["trained"]))
        final = ", ".join("n/a" if v is None else f"{v:.2f}" for v in sorted(g["final"], key=lambda v: (v is None, v)))
        lines.append("| " + " | ".join(cells + [f"{len(found)}/{len(g['steepest'])}", runs, median, final, trained]) + " |")
    return "\n".join(lines) + "\n"


def figure(keys: list[str], groups: list[dict[str, Any]], path: Path) -> None:
    from analysis.plots import plt

    top = max(max(g["trained"]) for g in groups)
    fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 4))
    firsts = sorted({g["values"][0] for g in groups}, key=lambda v: (v is None, str(type(v)), v))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in firsts)
    place = (lambda v: float(v)) if numeric else firsts.index  # noqa: E731 - names and None: one place each
    second = sorted({g["values"][1] for g in groups}, key=str) if len(keys) > 1 else [None]
    for i, value in enumerate(second):
        members = [g for g in groups if len(keys) == 1 or g["values"][1] == value]
        xs, ys, none_x = [], [], []
        for g in members:
            x = place(g["values"][0])
            for t in g["steepest"]:
                (xs if t is not None else none_x).append(x)
                if t is not None:
                    ys.append(t)
        label = f"{keys[1]}={value}" if len(keys) > 1 else None
        offset = (i - (len(second) - 1) / 2) * 0.004
        ax.scatter(np.array(xs) + offset, ys, color=f"C{i}", label=label, zorder=3)
        ax.scatter(np.array(none_x) + offset, [top * 1.4] * len(none_x), color=f"C{i}", marker="x", zorder=3)
        finals = [(place(g["values"][0]), v) for g in members for v in g["final"] if v is not None]
        if finals:
            fx, fy = zip(*finals)
            right.scatter(np.array(fx) + offset, fy, color=f"C{i}", label=label, zorder=3)
    ax.axhline(top, color="#999", lw=0.8, ls="--")
    ax.text(ax.get_xlim()[0], top * 1.5, f" none within {top / 1e6:.1f}M tokens (x)", fontsize=8, va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel(keys[0])
    ax.set_ylabel("tokens at the steepest point of the phase change")
    if not numeric:
        for axis in (ax, right):
            axis.set_xticks(range(len(firsts)), [str(v) for v in firsts])
    right.set_ylim(0, 1)
    right.set_xlabel(keys[0])
    right.set_ylabel("last-layer max prefix matching at the end")
    if label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_keys(runs: list[Run], keys: list[str]) -> None:
    """Every key is one setting, set in at least one run's config; AnalysisError otherwise."""
    for key in keys:
        values = [config_value(run, key) for run in runs]
        if all(v is None for v in values):
            raise AnalysisError(f"--key {key}: no run's config.yaml has it (e.g. data.repeat.p, seed, model.n_layers)")
        if any(isinstance(v, (dict, list)) for v in values):
            raise AnalysisError(f"--key {key}: a section or a list, not one setting; give a key inside it")


@edge.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.by_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="+", metavar="SWEEP_DIR")
    parser.add_argument("--key", action="append", required=True, help="config key to group by (dotted)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: SWEEP_DIR/by_config): new, empty or an earlier one")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing --out of other files (files of the same names are replaced)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detection parameter")
    args = parser.parse_args(argv)
    out = args.out or Path(args.sweep[0]) / "by_config"
    try:
        params, _ = detection_params(args.set)
        outputs.check_output_dir(out, "by_config", args.force)
        runs = load_runs(args.sweep, exclude=out)
        check_keys(runs, args.key)
        print(f"detecting the phase change in {len(runs)} run{'s' if len(runs) != 1 else ''}", file=sys.stderr)
        results = {str(r.path): detect_run(r, params) for r in runs}
        groups = group_runs(runs, args.key, results)
        text = table(args.key, groups)
        with outputs.staged(out, "by_config", args.force) as staged:  # the table and the figure together, or neither
            (staged / "by_config.md").write_text(text, encoding="utf-8")
            figure(args.key, groups, staged / "by_config.png")
    except (AnalysisError, RunError, outputs.OutputError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    found = sum(t is not None for g in groups for t in g["steepest"])
    print(text + f"\n{len(runs)} runs in {len(groups)} groups, {found} with a phase change\n"
                 f"{out / 'by_config.md'}\n{out / 'by_config.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
