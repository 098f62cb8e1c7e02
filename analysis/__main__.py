"""python -m analysis RUN_DIR [RUN_DIR ...] [--out DIR]: detect the induction-head phase change
in runs (run directories, or sweep directories searched recursively for metrics.jsonl) and write
Olsson-style figures, summary.json and a self-contained report.html."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from analysis.stages import AnalysisError, detection_params
from train.core.runs import RunError, default_out_dir, load_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <dir>/report)")
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
        for i, run_path in enumerate(args.wandb):
            paths.append(fetch_wandb_history(run_path, out / "wandb_history" / run_path.replace("/", "_")))
        runs = load_runs(paths, exclude=None if args.wandb else out)
        # Written aside and moved into `out` only when complete: an error leaves no partial report.
        staged = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            summary = build_report(runs, staged, params, attach_wandb=not args.no_wandb,
                                   log=lambda m: print(m, file=sys.stderr), stage_params=stage_params)
            out.mkdir(parents=True, exist_ok=True)
            for item in staged.iterdir():
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    except (AnalysisError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in summary["runs"]:
        print(f"{row['label']}: {row['message']}")
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
