"""Analysis of one or more runs: detection per run, figures, summary.json and a self-contained
HTML report (figures embedded as base64 PNG, no network resources); optionally the figures and
the detected window attached to each run's wandb run."""
from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from analysis import comparison, figures
from analysis.explain import VERDICT_WORDS, phase_lines, stage_lines, verdict
from analysis.definitions import for_report as definitions_for_report
from analysis.definitions_report import report_section as definitions_section
from analysis.patterns import CAPTIONS as PATTERN_CAPTIONS, attention_section
from analysis.plots import plt
from analysis.stages import AnalysisError, StageParams, detect_stages
from train.core import names as N
from train.core.phase import NO, STILL_RISING, TOO_SHORT, YES, PhaseParams, detect_run, fmt_tokens, summary_entries
from train.core.rundir import CONFIG_FILE, METRICS_FILE
from train.core.runs import Run, RunError


def analyze_run(run: Run, params: PhaseParams = PhaseParams()) -> dict[str, Any]:
    if not run.has(N.LOSS_HELDOUT) and not run.has(N.ICL_SCORE):
        raise AnalysisError(f"{run.path}: {METRICS_FILE} has neither {N.LOSS_HELDOUT} nor {N.ICL_SCORE}")
    return detect_run(run, params)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80] or "run"


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_figures(run: Run, result: dict[str, Any], out_dir: Path, params: PhaseParams,
                stage_params: StageParams | None = None) -> dict[str, Path]:
    makers = {"loss": lambda: figures.fig_loss(run, result, params),
              "icl": lambda: figures.fig_icl(run, result, params),
              "heads": lambda: figures.fig_heads(run, result),
              "per_position_loss": lambda: figures.fig_per_position(run, result),
              "labels": lambda: figures.fig_labels(run, result)}
    if "stages" in result:
        makers["stages"] = lambda: figures.fig_stages(run, result, result["stages"], params, stage_params)
    out = {}
    for name, make in makers.items():
        p = _save(make(), out_dir / f"{name}.png")
        if p is not None:
            out[name] = p
    return out


def _summary_row(run: Run, result: dict[str, Any], group: str) -> dict[str, Any]:
    return {"path": str(run.path), "label": run.label, "group": group, "n_layers": run.n_layers, "seed": run.seed,
            "name": run.config.get("name"), "n_checkpoints": len(run.rows), **result}


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%}figure{margin:.5em 0}
figcaption{font-size:12px;color:#666}.yes{color:#060;font-weight:bold}.no{color:#888}.open{color:#a50}
ul.why{font-size:13px;color:#333;margin:.2em 0 .6em 0}pre{background:#f7f7f7;padding:.5em;font-size:12px;overflow-x:auto}"""


def build_report(runs: list[Run], out_dir: Path, params: PhaseParams = PhaseParams(),
                 attach_wandb: bool = True, log=print, stage_params: StageParams | None = None) -> dict[str, Any]:
    """Detect once per run, draw and write `summary.json` and `report.html` into out_dir; every
    figure, table and the wandb summary take that one result. Each run's result gets a "stages"
    entry (analysis/stages.py)."""
    stage_params = stage_params or StageParams()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {str(r.path): analyze_run(r, params) for r in runs}
    for r in runs:
        results[str(r.path)]["stages"] = detect_stages(r, results[str(r.path)], stage_params, params)
    groups = comparison.config_groups(runs)
    fig_dir = out_dir / "figures"
    per_run_figs: dict[str, dict[str, Path]] = {}
    views: dict[str, str] = {}  # interactive attention views (analysis/patterns.py)
    used = set()
    for r in runs:
        slug = _slug(r.label)
        while slug in used:
            slug += "_"
        used.add(slug)
        per_run_figs[str(r.path)] = run_figures(r, results[str(r.path)], fig_dir / slug, params, stage_params)
        try:
            pattern_figs, views[str(r.path)] = attention_section(r, results[str(r.path)], fig_dir / slug,
                                                                 f"patterns-{slug}")
        except RunError as e:  # the probes or weights cannot be read back: the rest of the report stands
            log(f"{r.label}: no attention patterns ({e})")
            pattern_figs, views[str(r.path)] = {}, ""
        per_run_figs[str(r.path)].update(pattern_figs)
    joint = {}
    p = _save(comparison.fig_pca(runs, results), fig_dir / "pca_per_token_loss.png")
    if p:
        joint["pca"] = p
    if len(runs) > 1:
        joint["compare"] = _save(comparison.fig_compare(runs, results, groups), fig_dir / "compare.png")

    summary = {"params": params.to_dict(), "stage_params": stage_params.to_dict(),
               "runs": [_summary_row(r, results[str(r.path)], groups[str(r.path)]) for r in runs]}
    by_group: dict[str, list] = {}
    for r in runs:
        by_group.setdefault(groups[str(r.path)], []).append(results[str(r.path)])
    summary["groups"] = {g: {"n_runs": len(v), "n_with_phase_change": sum(x["phase_change"] for x in v),
                             "verdicts": [verdict(x) for x in v],
                             "steepest_tokens": [x["window"]["steepest_tokens"] if x["window"] else None for x in v]}
                         for g, v in sorted(by_group.items())}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(runs, results, per_run_figs, joint, params, stage_params, views,
                                               groups), encoding="utf-8")
    if attach_wandb:
        for r in runs:
            attach_to_wandb(r, results[str(r.path)], per_run_figs[str(r.path)], log=log)
    return summary


def _why(lines: list[str]) -> str:
    return "<ul class='why'>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _stage_table(stages: dict[str, Any]) -> str:
    """The run's ordered developmental events as a small HTML table, after what was compared."""
    order = stages["previous_token_before_induction"]
    answer = {True: "<span class='yes'>yes</span>", False: "<span class='no'>no</span>",
              None: "<span class='no'>undetermined</span>"}[order]
    parts = [f"<p>Previous-token heads before induction: {answer}</p>",
             _why(stage_lines(stages) + [f"LLC: {stages['llc']['message']}"])]
    if stages["events"]:
        parts.append("<table><tr><th>tokens</th><th class='l'>event</th></tr>" + "".join(
            f"<tr><td>{fmt_tokens(e['tokens'])}</td><td class='l'>{html.escape(e['label'])}</td></tr>"
            for e in stages["events"]) + "</table>")
    return "".join(parts)


VERDICT_CLASS = {YES: "yes", NO: "no", STILL_RISING: "open", TOO_SHORT: "no"}
CAPTIONS = {"loss": "held-out loss with the bump (the non-convex stretch in ln tokens) and its slope d loss / d ln(tokens)",
            "icl": "in-context-learning score with the ICL jump",
            "heads": "prefix matching and copying per head, the phase-change window shaded",
            "per_position_loss": "per-position loss over training and its derivative w.r.t. ln(token index); "
                                 "dashed: the phase-change window",
            "labels": "behavioral / mechanistic induction-head labels per head; dashed: the phase-change window",
            "stages": "developmental stages: LLC, loss, ICL score, prefix matching and layer-0 previous-token score; "
                      "previous-token rise (purple), the phase-change window (orange), LLC stage boundaries "
                      "(vertical lines)"}


def _table_row(r: Run, res: dict[str, Any], group: str) -> str:
    w = res["window"] or res.get("unfinished_window") or {}
    icl, bump = res["icl_jump"], res["loss_bump"]
    v = verdict(res)
    cells = [f"<td class='l'>{html.escape(r.label)}</td><td class='l'>{html.escape(group)}</td>",
             f"<td class='{VERDICT_CLASS[v]}'>{html.escape(VERDICT_WORDS[v])}</td>"]
    cells += [f"<td>{fmt_tokens(w.get(k))}</td>" for k in ("start_tokens", "steepest_tokens", "end_tokens")]
    for part in (icl, bump):
        cells.append(f"<td>{part['size']:.2f}{'' if part['detected'] else ' (no)'}</td>"
                     f"<td>{fmt_tokens(part['steepest_tokens']) if part['detected'] else '-'}</td>")
    cells.append(f"<td class='l'>{html.escape(', '.join(res['induction_heads']) or '-')}</td>"
                 f"<td>{fmt_tokens(res['burn_in_end_tokens'])}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _html(runs, results, per_run_figs, joint, params: PhaseParams, stage_params: StageParams | None = None,
          views: dict[str, str] | None = None, groups: dict[str, str] | None = None) -> str:
    groups = groups or {str(r.path): r.group for r in runs}
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Induction-head phase change report</title>",
             f"<style>{CSS}</style></head><body><h1>Induction-head phase change</h1>",
             "<p>One window per run, found once by <code>python -m analysis</code> (train/core/phase.py) and used by "
             "every table, figure and the wandb summary; training's live line was provisional. Verdicts: "
             "<b>yes</b> (a complete window), <b>still rising at the end</b> (the changes coincide but run up "
             "to the last checkpoint), <b>too short to tell</b> (the run ends before anything could form), "
             "<b>no</b>. Token counts: k = thousand, M = million.</p>",
             "<h2>Verdicts</h2><table><tr><th>run</th><th class='l'>group: config values that differ</th><th>phase change</th>"
             "<th>start</th><th>steepest</th><th>end</th><th>ICL jump (nats)</th><th>ICL steepest</th>"
             "<th>bump (nats)</th><th>bump steepest</th><th>prefix-matching heads</th><th>burn-in end</th></tr>"]
    numbers = comparison.group_numbers(groups)
    parts += [_table_row(r, results[str(r.path)], f"{numbers[groups[str(r.path)]]}: {groups[str(r.path)]}")
              for r in runs]
    parts.append("</table>")
    if joint.get("compare"):
        parts.append("<h2>Comparison</h2>" + _img(joint["compare"], "runs overlaid, grouped by the config values "
                                                                   "that differ between them"))
    if "pca" in joint:
        parts.append("<h2>PCA of per-token losses</h2>"
                     + _img(joint["pca"], "joint PCA of per-position-loss vectors; the trajectory pivots in the "
                                          "phase-change window (orange circles)"))
    for r in runs:
        res = results[str(r.path)]
        v = verdict(res)
        parts.append(f"<h2>{html.escape(r.label)}</h2><p><code>{html.escape(str(r.path))}</code><br>"
                     f"Phase change: <span class='{VERDICT_CLASS[v]}'>{html.escape(VERDICT_WORDS[v])}</span> - "
                     f"<b>{html.escape(res['message'])}</b></p>" + _why(phase_lines(res)))
        if "stages" in res:
            parts.append(_stage_table(res["stages"]))
        for name, path in per_run_figs[str(r.path)].items():
            parts.append(_img(path, CAPTIONS.get(name, PATTERN_CAPTIONS.get(name, name))))
        parts.append((views or {}).get(str(r.path), ""))
    parts.append(definitions_section(definitions_for_report(runs, results)))  # runs with the OOD suite's rows only
    parts.append("<h2>Detection parameters</h2><p>See <code>train/core/phase.py</code> for the method.</p><pre>"
                 + html.escape(json.dumps(params.to_dict(), indent=1)) + "</pre>")
    if stage_params is not None:
        parts.append("<p>Stages: see <code>analysis/stages.py</code>.</p><pre>"
                     + html.escape(json.dumps(stage_params.to_dict(), indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- wandb

ANALYSIS_MARK = "induction_tracker_analysis"  # marks an offline wandb segment written by the analysis


def attach_to_wandb(run: Run, result: dict[str, Any], figs: dict[str, Path], log=print) -> bool:
    """Log the figures and the run's one phase-change result to its wandb run (same run id): the
    summary's phase_change/* entries (train/core/phase.py `summary_entries`, provisional false,
    over training's provisional ones), the ICL jump's and the bump's sizes, and the figures as
    analysis/*. Online when credentials are present; else offline, into one analysis segment
    RUN_DIR/wandb/offline-run-*-ID that replaces the previous analysis's segment, so repeated
    analyses leave one; `wandb sync RUN_DIR/wandb` uploads it with the training's segments.
    Never raises: on any failure prints a message and returns False."""
    wandb_dir = run.wandb_dir
    if wandb_dir is None:
        return False
    try:
        import wandb

        from train.core.wandb_env import wandb_credentials_present

        env = os.environ.get("WANDB_MODE")
        online = env not in ("offline", "disabled") and wandb_credentials_present() and \
            wandb_dir.name.startswith("run-")
        before = set(wandb_dir.parent.glob(f"*run-*-{run.wandb_run_id}"))
        earlier = [d for d in before if (d / ANALYSIS_MARK).exists()]
        logger_cfg = run.config.get("logger") or {}
        kwargs = dict(id=run.wandb_run_id, project=logger_cfg.get("project") or "induction-heads",
                      entity=logger_cfg.get("entity"), dir=str(run.path), resume="allow",
                      settings=wandb.Settings(silent=True, init_timeout=30))
        wrun = wandb.init(mode="online" if online else "offline", **kwargs)
        try:
            wrun.log({f"analysis/{k}": wandb.Image(str(p)) for k, p in figs.items()})
            for key, value in summary_entries(result, provisional=False).items():
                wrun.summary[key] = value
            for part in ("icl_jump", "loss_bump"):
                wrun.summary[f"analysis/{part}_size"] = result[part]["size"]
            new_dir = Path(wrun.dir).parent
        finally:
            wrun.finish()
        if online:
            log(f"wandb: attached the figures and the phase change to run {run.wandb_run_id}")
            return True
        if new_dir not in before:  # a segment of its own (not one that wandb reused within the same second)
            (new_dir / ANALYSIS_MARK).write_text("written by python -m analysis\n", encoding="utf-8")
            for old in earlier:  # superseded by this analysis
                shutil.rmtree(old, ignore_errors=True)
        log(f"wandb: offline; the figures and the phase change are in {new_dir} (upload the run's every "
            f"segment with: wandb sync {new_dir.parent})")
        return True
    except Exception as e:  # noqa: BLE001 - wandb must never fail the analysis
        log(f"wandb: skipped attaching to {run.label} ({type(e).__name__}: {e})")
        return False


def fetch_wandb_history(run_path: str, dest: Path) -> Path:
    """Read a run's history back from wandb (ENTITY/PROJECT/RUN_ID) into dest/metrics.jsonl.
    Needs network access and credentials; raises AnalysisError otherwise."""
    from train.core.wandb_env import wandb_credentials_present

    if run_path.count("/") != 2:
        raise AnalysisError(f"--wandb expects ENTITY/PROJECT/RUN_ID, got {run_path!r}")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_credentials_present():
        raise AnalysisError(f"--wandb {run_path}: wandb is offline (WANDB_MODE={os.environ.get('WANDB_MODE')}, "
                            f"credentials {'found' if wandb_credentials_present() else 'missing'}); "
                            f"analyse the local run directory instead")
    try:
        import wandb

        api_run = wandb.Api(timeout=30).run(run_path)
        rows = []
        for row in api_run.scan_history():
            row = {k: v for k, v in row.items() if not k.startswith("_") and (
                isinstance(v, (int, float, list)) and not isinstance(v, bool))}
            if N.TOKENS in row:
                rows.append(row)
        config = dict(api_run.config)
    except Exception as e:  # noqa: BLE001 - network / auth / missing run
        raise AnalysisError(f"--wandb {run_path}: cannot read the run ({type(e).__name__}: {e})") from None
    if not rows:
        raise AnalysisError(f"--wandb {run_path}: the run's history has no rows with '{N.TOKENS}'")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        import yaml

        (dest / CONFIG_FILE).write_text(yaml.safe_dump(config), encoding="utf-8")
    except Exception:  # noqa: BLE001
        pass
    print(f"wandb: read {len(rows)} rows of {run_path} into {dest}", file=sys.stderr)
    return dest
