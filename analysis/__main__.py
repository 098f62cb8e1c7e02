"""python -m analysis RUN_DIR [RUN_DIR ...] [--out DIR]: detect the induction-head phase change
in runs (run directories, or sweep directories searched recursively for metrics.jsonl) and write
Olsson-style figures, summary.json and a self-contained report.html into --out (default
<dir>/report), built aside and moved in when complete (train/core/outputs.py: --out is new, empty
or an earlier report, or --force)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.stages import AnalysisError, detection_params
from train.core import edge, outputs
from train.core.runs import RunError, default_out_dir, load_runs


@edge.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <dir>/report): new, empty or an earlier report")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing --out that is not a report (files of the same names are replaced, "
                             "nothing else is touched)")
    parser.add_argument("--wandb", action="append", default=[], metavar="ENTITY/PROJECT/RUN_ID",
                        help="also analyse a run's history read back from wandb (needs network)")
    parser.add_argument("--no-wandb", action="store_true", help="do not attach figures to the runs' wandb runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="detection parameter (train/core/phase.py PhaseParams, analysis/stages.py StageParams), "
                             "e.g. --set bandwidth=0.15 --set llc_plateau_frac=0.2")
    args = parser.parse_args(argv)
    try:
        if not args.runs and not args.wandb:
            raise AnalysisError("give at least one RUN_DIR (or --wandb ENTITY/PROJECT/RUN_ID)")
        params, stage_params = detection_params(args.set)
        from analysis.report import build_report, fetch_wandb_history

        paths = list(args.runs)
        out = args.out
        if out is None:
            out = default_out_dir(paths) if paths else Path("wandb_report")
        outputs.check_output_dir(out, "report", args.force)  # before anything is read or written
        for i, run_path in enumerate(args.wandb):
            paths.append(fetch_wandb_history(run_path, outputs.claim(out, "report", args.force) / "wandb_history"
                                             / run_path.replace("/", "_")))
        runs = load_runs(paths, exclude=None if args.wandb else out)
        print(f"analysing {len(runs)} run{'s' if len(runs) != 1 else ''}", file=sys.stderr)
        # Built aside and moved into `out` only when complete: an error leaves no partial report.
        with outputs.staged(out, "report", args.force) as staged:
            summary = build_report(runs, staged, params, attach_wandb=not args.no_wandb,
                                   log=lambda m: print(m, file=sys.stderr), stage_params=stage_params)
    except (AnalysisError, RunError, outputs.OutputError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for row in summary["runs"]:
        print(f"{row['label']}: {row['message']}")
    found = sum(bool(row["phase_change"]) for row in summary["runs"])
    print(f"{len(summary['runs'])} run{'s' if len(summary['runs']) != 1 else ''} analysed, {found} with a phase change")
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
