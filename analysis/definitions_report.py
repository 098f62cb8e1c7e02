"""What analysis/definitions.py writes: the markdown tables, the figure (AUC of every definition
over training, per OOD set, the phase-change windows shaded) and the section of `python -m
analysis`'s report (`report_section`)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from analysis.plots import plt
from matplotlib.ticker import FuncFormatter, NullFormatter


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tokens(v: float) -> str:
    return f"{v / 1e6:.2g}M" if v >= 1e5 else f"{v / 1e3:.3g}k"


def _window(w: dict | None) -> str:
    return f"window {_tokens(w['start_tokens'])}-{_tokens(w['end_tokens'])}" if w else "no phase change found"


def kinds_of(result: dict[str, Any]) -> dict[str, str]:
    """{definition key: "label" or "score"} as definitions.json lists them."""
    return {d["key"]: d["kind"] for d in result["definitions"]}


def auc_rows(group: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the AUC table: a definition per row, a set per column, each cell
    `before / during / after / all`; the first row counts the heads that matter (of all)."""
    sets, t = group["sets"], group["table"]
    head = ["definition", *sets]

    def counts(s: str) -> str:
        cells = []
        for part in t:
            res = next((r for r in t[part][s].values() if r), None)
            cells.append(f"{res['n_matter']}/{res['n']}" if res else "-")
        return " / ".join(cells)

    rows = [["heads that matter", *(counts(s) for s in sets)]]
    for key in group["definitions"]:
        rows.append([key, *(" / ".join(_f((t[p][s][key] or {}).get("auc")) for p in t) for s in sets)])
    return head, rows


def label_rows(group: dict[str, Any], kinds: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """Precision / recall of each label on each set, over all checkpoints (`kinds`: {definition:
    "label" or "score"}, from `kinds_of`)."""
    t = group["table"]["all"]
    rows = [[k, *(f"{_f((t[s][k] or {}).get('precision'))} / {_f((t[s][k] or {}).get('recall'))}" for s in group["sets"])]
            for k in group["definitions"] if kinds[k] == "label"]
    return ["label", *group["sets"]], rows


def spearman_rows(group: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    t = group["table"]["all"]
    return ["definition", *group["sets"]], [[k, *(_f((t[s][k] or {}).get("spearman")) for s in group["sets"])]
                                           for k in group["definitions"]]


def disagreement_rows(group: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per ordered pair of labels: the head-checkpoints one marks and the other not, the heads, and
    per set the share of them that mattered (their mean effect, nats)."""
    rows = []
    for d in group["disagreements"]:
        heads = ", ".join(f"{h} ({n})" for h, n in list(d["heads"].items())[:6]) or "-"
        cells = [f"{_f(v['share_matter'])} ({_f(v['mean_effect'])})" for v in d["per_set"].values()]
        rows.append([d["labelled_by"], d["not_by"], str(d["n"]), heads, *cells])
    return ["labelled by", "not by", "head-checkpoints", "heads (checkpoints)", *group["sets"]], rows


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def settings_line(settings: dict[str, Any]) -> str:
    population = "all heads" if settings["all_layers"] else "the heads of layers >= 1 (all heads of 1-layer models)"
    return (f"A head *matters* on a set when its {settings['ablation']}-ablation effect there (ablated minus clean loss "
            f"of the set's scored predictions) is at least {settings['threshold']:g} nats. Population: {population}; "
            f"one observation per head and checkpoint with OOD rows. Definitions are measured on the training "
            f"distribution's probes only (docs/METRICS.md sections 5-8, 14-16).")


def markdown(result: dict[str, Any]) -> str:
    parts = ["# Which definition of an induction head predicts which heads matter out of distribution\n",
             settings_line(result["settings"]) + "\n"]
    for name, g in result["groups"].items():
        runs = ", ".join(f"{label} ({_window(w)})" for label, w in g["windows"].items())
        parts += [f"## {name}\n", f"Runs: {runs}. Observations: {g['n_observations']}.\n",
                  "ROC AUC against \"matters\", before / during / after the phase-change window / all checkpoints "
                  "(first row: heads that matter / observations):\n", _md(*auc_rows(g)),
                  "Labels, all checkpoints: precision / recall:\n", _md(*label_rows(g, kinds_of(result))),
                  "Spearman rank correlation with the ablation effect, all checkpoints:\n", _md(*spearman_rows(g))]
        if g["disagreements"]:
            parts += ["Disagreements, all checkpoints: per set, the share of the head-checkpoints that mattered "
                      "(their mean effect, nats):\n", _md(*disagreement_rows(g))]
    return "\n".join(parts)


# -- the figure ----------------------------------------------------------------------------------
def figure(result: dict[str, Any]):
    """Rows: groups; columns: OOD sets; per panel the AUC of each definition against "matters" at
    every OOD checkpoint (mean over the group's runs), labels solid, scores dashed; the runs'
    phase-change windows shaded. None when there is nothing to draw."""
    groups = result["groups"]
    sets = list(dict.fromkeys(s for g in groups.values() for s in g["sets"]))
    if not groups or not sets:
        return None
    fig, axes = plt.subplots(len(groups), len(sets), figsize=(2.6 * len(sets) + 1.5, 2.3 * len(groups) + 0.6),
                             squeeze=False, sharey=True, sharex=True)
    kinds = kinds_of(result)
    colours = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    for row, (name, g) in zip(axes, groups.items()):
        for ax, s in zip(row, sets):
            ax.set_title(s, fontsize=9)
            if s not in g["sets"]:
                ax.text(0.5, 0.5, "not in these runs", ha="center", va="center", fontsize=8, color="grey",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for w in g["windows"].values():
                if w:
                    ax.axvspan(w["start_tokens"], w["end_tokens"], color="orange", alpha=0.12, lw=0)
            for key in g["definitions"]:
                points: dict[float, list[float]] = {}
                for run_curves in g["curves"].values():
                    for tokens, auc in run_curves.get(s, {}).get(key, []):
                        if auc is not None and tokens > 0:
                            points.setdefault(tokens, []).append(auc)
                if points:
                    x = sorted(points)
                    ax.plot(x, [np.mean(points[t]) for t in x], color=colours[key], marker=".", ms=3,
                            ls="-" if kinds[key] == "label" else "--", lw=1.6 if kinds[key] == "label" else 1.0, label=key)
            ax.axhline(0.5, color="grey", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tokens(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(-0.02, 1.02)
            ax.tick_params(labelsize=7)
        first = next(ax for ax, s in zip(row, sets) if s in g["sets"])
        first.set_ylabel(name.replace(", ", "\n") + "\nROC AUC", fontsize=7)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=7)
    fig.supxlabel("tokens", fontsize=8, y=0.09 if len(groups) == 1 else 0.05)
    fig.tight_layout(rect=(0, 0.12 if len(groups) == 1 else 0.07, 1, 1))
    return fig


def save_figure(result: dict[str, Any], path: Path) -> Path | None:
    fig = figure(result)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the report's section ------------------------------------------------------------------------
def _html_table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{html.escape(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def report_section(result: dict[str, Any] | None) -> str:
    """The section of `python -m analysis`'s report (analysis/report.py): per group the AUC table
    and the figure of `result` (what analysis.definitions.analyse returns); "" when None."""
    if result is None:
        return ""
    parts = ["<h2>Which definition predicts which heads matter out of distribution</h2>",
             f"<p>{html.escape(settings_line(result['settings']))} ROC AUC before / during / after the window / all "
             "checkpoints; details: <code>python -m analysis.definitions</code>.</p>"]
    for name, g in result["groups"].items():
        parts += [f"<h3>{html.escape(name)}</h3>", _html_table(*auc_rows(g))]
    fig = figure(result)
    if fig is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        parts.append(f"<figure><img alt='AUC over training' src='data:image/png;base64,"
                     f"{base64.b64encode(buf.getvalue()).decode('ascii')}'><figcaption>ROC AUC of each definition "
                     "against the heads that matter per OOD set over training; phase-change windows shaded"
                     "</figcaption></figure>")
    return "\n".join(parts)
