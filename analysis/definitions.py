"""Which definition of an induction head predicts which heads matter out of distribution?

    uv run python -m analysis.definitions RUN_DIR [RUN_DIR ...] [--out DIR] [--ablation mean]
                                          [--threshold 0.1] [--all-layers]

Reads runs (train/core/runs.py: run directories, sweep directories, `analysis.series` output)
that logged the out-of-distribution suite (callback `ood`, train/core/ood.py). At every checkpoint
with its rows, each head is one observation: the definitions of `DEFINITIONS` (labels and
continuous scores, all measured on the training distribution's probes) are the predictions, and
each OOD set's ablation effect is the outcome. A head *matters* on a set when its `--ablation`
effect there (ablated minus clean loss of the set's scored predictions, nats) is at least
`--threshold`. Per definition and set: ROC AUC against "matters", precision and recall of a label,
Spearman rank correlation with the effect; per checkpoint (curves) and pooled over the
checkpoints before, during and after the phase-change window (train/core/phase.py detect_run) and
over all of them, over the runs of a group (same layers, positions, keys, data). Disagreements:
heads that one label marks and another does not, with what they did out of distribution.
Population: the heads of layers >= 1 (unless --all-layers, or the model has one layer).
Writes definitions.md, definitions.json and definitions.png to --out (default: RUN_DIR/definitions,
or the runs' common parent/definitions). Exact definitions: docs/METRICS.md section 16."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.core import names as N
from train.core.phase import detect_run
from train.core.runs import Run, RunError, load_runs

LABEL, SCORE = "label", "score"
PARTS = ("before", "during", "after", "all")


@dataclass(frozen=True)
class Definition:
    """A per-head metric of the rows used as a definition: a 0/1 `label` or a continuous `score`
    (higher: more induction-like), and the callback that logs it."""

    key: str
    kind: str
    source: str


# The definitions tested, in the tables' order; a run without a definition's key has no row of it.
DEFINITIONS = (
    Definition(N.IS_BEHAVIORAL, LABEL, "induction"),
    Definition(N.IS_MECHANISTIC, LABEL, "induction"),
    Definition("is_causal", LABEL, "causal"),  # train/core/causal.py
    Definition(N.PREFIX_MATCHING, SCORE, "attention"),
    Definition(N.COPYING, SCORE, "copying"),
    Definition(N.K_COMPOSITION_PREV_TOKEN, SCORE, "induction"),
    Definition(N.OV_COPYING, SCORE, "circuits"),
    Definition(N.QK_PREFIX_MATCHING, SCORE, "circuits"),
    Definition("activation_patching", SCORE, "causal"),
    Definition("causal_k_share", SCORE, "causal"),
)
KINDS = {d.key: d.kind for d in DEFINITIONS}


@dataclass
class Settings:
    ablation: str = "mean"  # which ablation's effect decides "matters"
    threshold: float = 0.1  # nats
    all_layers: bool = False


class DefinitionsError(ValueError):
    """Runs that cannot be analysed (no OOD rows): one line, no traceback."""


# -- observations ---------------------------------------------------------------------------------
def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def ood_sets(row: dict[str, Any], kind: str) -> list[str]:
    """The OOD sets with `kind` ablation effects in a row, in the row's order."""
    found: dict[str, None] = {}
    for key in row:
        family = N.parse_family_key(key)
        parsed = N.parse_ood_ablation(family[0]) if family else None
        if parsed and parsed[0] == kind:
            found[parsed[1]] = None
    return list(found)


def part_of(tokens: float, window: dict | None) -> str:
    """before / during / after the phase-change window ([start, end] tokens), or "all" without one."""
    if not window:
        return "all"
    return "before" if tokens < window["start_tokens"] else "after" if tokens > window["end_tokens"] else "during"


def observations(run: Run, window: dict | None, settings: Settings) -> list[dict[str, Any]]:
    """One per head of the population at every checkpoint with OOD rows: run, tokens, head, part of
    the window, `defs` {definition key: value (NaN: undefined for this head)} for the definitions
    whose callback ran at this checkpoint (it logged the key for some head of some definition of
    the same source), `effects` {set: ablation effect}."""
    out = []
    one_layer = (run.n_layers or 1) == 1
    for row in run.rows:
        sets = ood_sets(row, settings.ablation)
        if not sets:
            continue
        ran = {d.source for d in DEFINITIONS if N.heads_in(row, d.key)}  # a callback that ran leaves no head out
        present = [d.key for d in DEFINITIONS if d.source in ran]
        for l, h in N.heads_in(row, N.ood_ablation(settings.ablation, sets[0])):
            if l == 0 and not (one_layer or settings.all_layers):
                continue
            out.append({"run": run.label, "tokens": _num(row.get(N.TOKENS)), "head": N.head_name(l, h),
                        "part": part_of(_num(row.get(N.TOKENS)), window),
                        "defs": {k: _num(row.get(N.head_key(k, l, h))) for k in present},
                        "effects": {s: _num(row.get(N.head_key(N.ood_ablation(settings.ablation, s), l, h)))
                                    for s in sets}})
    return out


# -- the measures -----------------------------------------------------------------------------------
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, r) / np.bincount(inverse))[inverse]


def roc_auc(x: np.ndarray, positive: np.ndarray) -> float | None:
    """P(x of a positive > x of a negative) + P(tie) / 2 (Mann-Whitney); None without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    return float((ranks(x)[positive].sum() - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of the ranks; None when either is constant."""
    rx, ry = ranks(x), ranks(y)
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def evaluate(obs: list[dict[str, Any]], key: str, ood_set: str, threshold: float) -> dict[str, Any] | None:
    """The measures of one definition on one set over `obs` (None when no observation has both):
    n, n_matter, auc, spearman and, for labels, n_labelled, precision, recall. An undefined score
    (NaN) ranks below every defined one."""
    pairs = [(o["defs"][key], o["effects"][ood_set]) for o in obs
             if key in o["defs"] and math.isfinite(o["effects"].get(ood_set, math.nan))]
    if not pairs:
        return None
    x, effect = np.array(pairs, dtype=float).T
    x = np.where(np.isfinite(x), x, -np.inf)
    matters = effect >= threshold
    res: dict[str, Any] = {"n": len(x), "n_matter": int(matters.sum()), "auc": roc_auc(x, matters),
                           "spearman": spearman(x, effect)}
    if KINDS[key] == LABEL:
        labelled = x >= 0.5
        hits = int((labelled & matters).sum())
        res |= {"n_labelled": int(labelled.sum()), "precision": hits / labelled.sum() if labelled.any() else None,
                "recall": hits / matters.sum() if matters.any() else None}
    return res


def table(obs: list[dict[str, Any]], sets: list[str], keys: list[str], threshold: float) -> dict[str, Any]:
    """{part: {set: {definition: measures}}} over `obs` (parts: before, during, after, all)."""
    out: dict[str, Any] = {}
    for part in PARTS:
        chosen = obs if part == "all" else [o for o in obs if o["part"] == part]
        out[part] = {s: {k: evaluate(chosen, k, s, threshold) for k in keys} for s in sets}
    return out


def curves(obs: list[dict[str, Any]], sets: list[str], keys: list[str], threshold: float) -> dict[str, Any]:
    """{set: {definition: [[tokens, auc], ...]}} per checkpoint (AUC None where one class is missing)."""
    by_tokens: dict[float, list] = {}
    for o in obs:
        by_tokens.setdefault(o["tokens"], []).append(o)
    out: dict[str, Any] = {s: {k: [] for k in keys} for s in sets}
    for tokens, group in sorted(by_tokens.items()):
        for s, k in itertools.product(sets, keys):
            res = evaluate(group, k, s, threshold)
            out[s][k].append([tokens, res["auc"] if res else None])
    return out


def disagreements(obs: list[dict[str, Any]], sets: list[str], threshold: float) -> list[dict[str, Any]]:
    """For each ordered pair of labels (a, b) both present: the observations labelled by a and not
    by b: how many, which heads (run, head: checkpoints), and per set the share that mattered and
    the mean effect."""
    labels = [d.key for d in DEFINITIONS if d.kind == LABEL and any(d.key in o["defs"] for o in obs)]
    out = []
    for a, b in itertools.permutations(labels, 2):
        hits = [o for o in obs if o["defs"].get(a) == 1 and o["defs"].get(b) == 0]
        per_set = {}
        for s in sets:
            effects = np.array([o["effects"][s] for o in hits if math.isfinite(o["effects"].get(s, math.nan))])
            per_set[s] = {"share_matter": float((effects >= threshold).mean()) if len(effects) else None,
                          "mean_effect": float(effects.mean()) if len(effects) else None}
        heads = Counter(f"{o['run']}: {o['head']}" for o in hits)
        out.append({"labelled_by": a, "not_by": b, "n": len(hits), "heads": dict(heads.most_common()),
                    "per_set": per_set})
    return out


# -- runs and groups ----------------------------------------------------------------------------------
def group_of(run: Run) -> str:
    """Runs that differ only in seed share a group: layers, positions, smeared keys, width, data."""
    m, d = run.config.get("model") or {}, run.config.get("data") or {}
    if not m:
        return run.group
    parts = [f"{m.get('n_layers')} layer{'' if m.get('n_layers') == 1 else 's'}"]
    parts += [f"d_model {m['d_model']}"] if m.get("d_model", 64) != 64 else []
    parts += [f"{m['positional']} positions"] if m.get("positional", "learned") != "learned" else []
    parts += ["smeared keys"] if m.get("smeared_keys") else []
    target = str(d.get("_target_", ""))
    parts.append("text" if target.endswith("build_text") else "token file" if target.endswith("build_tokens")
                 else "embedded data")
    return ", ".join(parts)


def analyse(runs: list[Run], settings: Settings, windows: dict[str, dict | None] | None = None) -> dict[str, Any]:
    """Everything definitions.json holds. `windows`: {run path: phase-change window} when already
    detected (else detect_run)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_of(run), []).append(run)
    out: dict[str, Any] = {"settings": asdict(settings), "definitions": [asdict(d) for d in DEFINITIONS], "groups": {}}
    for name, members in groups.items():
        obs, per_run, found = [], {}, {}
        for run in members:
            window = windows[str(run.path)] if windows is not None else detect_run(run)["window"]
            run_obs = observations(run, window, settings)
            if run_obs:
                obs += run_obs
                found[run.label] = window
                per_run[run.label] = run_obs
        if not obs:
            continue
        sets = list(dict.fromkeys(s for o in obs for s in o["effects"]))
        keys = [d.key for d in DEFINITIONS if any(d.key in o["defs"] for o in obs)]
        out["groups"][name] = {
            "runs": list(found), "windows": found, "sets": sets, "definitions": keys,
            "n_observations": len(obs), "table": table(obs, sets, keys, settings.threshold),
            "curves": {label: curves(o, sets, keys, settings.threshold) for label, o in per_run.items()},
            "disagreements": disagreements(obs, sets, settings.threshold)}
    if not out["groups"]:
        raise DefinitionsError("no run has rows of the out-of-distribution suite (callback `ood`: train with "
                               "callbacks=with_definitions, or add them with analysis.recompute --callbacks ood)")
    return out


def for_report(runs: list[Run], results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """`analyse` with the default settings and the windows `python -m analysis` detected
    ({run path: {"window": ...}}); None when no run has rows of the suite."""
    try:
        return analyse(runs, Settings(), {path: r["window"] for path, r in results.items()})
    except DefinitionsError:
        return None


def main(argv: list[str] | None = None) -> int:
    from analysis.definitions_report import markdown, save_figure

    parser = argparse.ArgumentParser(prog="python -m analysis.definitions", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run, sweep or analysis.series output directories")
    parser.add_argument("--out", type=Path, help="output directory (default: <dir>/definitions)")
    parser.add_argument("--ablation", choices=("mean", "zero"), default=Settings.ablation,
                        help="the ablation whose effect decides 'matters' (default: mean)")
    parser.add_argument("--threshold", type=float, default=Settings.threshold,
                        help="a head matters on a set when its effect is at least this many nats (default: 0.1)")
    parser.add_argument("--all-layers", action="store_true", help="include the heads of layer 0")
    args = parser.parse_args(argv)
    settings = Settings(args.ablation, args.threshold, args.all_layers)
    try:
        out = args.out
        if out is None:
            from train.core.runs import default_out_dir

            out = default_out_dir(args.runs).with_name("definitions")
        runs = load_runs(args.runs, exclude=out)
        result = analyse(runs, settings)
    except (RunError, DefinitionsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "definitions.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "definitions.md").write_text(markdown(result), encoding="utf-8")
    figure = save_figure(result, out / "definitions.png")
    print(f"{sum(len(g['runs']) for g in result['groups'].values())} runs in {len(result['groups'])} group(s) -> "
          f"{out / 'definitions.md'}, {out / 'definitions.json'}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
