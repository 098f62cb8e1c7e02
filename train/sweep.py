"""Sweeps (`python -m train -m ...`): the end-of-sweep job summary and one device per job.

`SweepSummary` is a Hydra callback (conf/config.yaml `hydra.callbacks`). In the process that
launches the sweep it prints, when the sweep ends (also when a job failed, which makes Hydra stop
with the first error, or when the sweep is stopped by Ctrl-C), one line per job:

    job 3  failed       multirun/2026-11-23/17-40-00/3_model.n_layers=2,seed=1  error: ...

The outcome is the job's `status.json` state (train/core/rundir.py): finished, failed (with the
status's one-line error), interrupted; a job that left no status (refused before training) is
failed, with the one-line reason that the job's own `on_job_end` wrote to its Hydra log; a job
whose status still says running was stopped without a last word (killed), so it is interrupted.
Works with every launcher: it reads only the job directories, not the launcher's results."""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from train.core import rundir

REFUSED_PREFIX = "job failed: "  # the job log line that carries a refused job's reason
log = logging.getLogger(__name__)


def job_device(device: str, job_num: int, n_gpus: int) -> str:
    """The device of sweep job `job_num`: with device=auto and several GPUs, GPU job_num mod n_gpus
    (jobs of a parallel launcher then share the GPUs evenly); otherwise `device` unchanged."""
    if device != "auto" or n_gpus < 2:
        return device
    return f"cuda:{job_num % n_gpus}"


def requeued_job() -> bool:
    """True in a SLURM job that was requeued (preemption or time limit; SLURM counts restarts)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def sweep_group_and_tags() -> tuple[str | None, list[str]]:
    """In a sweep job: (the sweep directory, the job's overrides as `key=value` tags), so that a
    sweep's runs share one wandb group; outside a sweep (None, [])."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None, []
        hc = HydraConfig.get()
        tags = [o.lstrip("+~") for o in hc.overrides.task]
        return str(hc.sweep.dir), [t for t in tags if len(t) <= 64]  # wandb's limit on a tag
    except Exception:  # noqa: BLE001
        return None, []


def _job_num(path: Path) -> int | None:
    m = re.match(r"(\d+)(_|$)", path.name)
    return int(m.group(1)) if m else None


def _refusal(job_dir: Path) -> str | None:
    """The reason logged by a job that failed before it wrote a status (last matching log line)."""
    reason = None
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
                if REFUSED_PREFIX in line:
                    reason = line.split(REFUSED_PREFIX, 1)[1].strip()
        except OSError:
            continue
    return reason


def job_outcome(job_dir: Path) -> tuple[str, str]:
    """(outcome, reason) of one sweep job: finished / failed / interrupted (module docstring)."""
    status = rundir.read_status(job_dir)
    if status is None:
        return rundir.FAILED, _refusal(job_dir) or "no status.json: the job stopped before training"
    state = status.get("state")
    if state == rundir.FINISHED:
        return rundir.FINISHED, ""
    if state == rundir.INTERRUPTED:
        return rundir.INTERRUPTED, f"stopped at step {status.get('step')}; continue with resume={job_dir}"
    if state == rundir.RUNNING:
        return rundir.INTERRUPTED, f"killed while running (step {status.get('step')}); continue with resume={job_dir}"
    return rundir.FAILED, status.get("error") or (_refusal(job_dir) or "unknown error")


def sweep_jobs(sweep_dir: Path) -> list[tuple[int, Path]]:
    """(job number, directory) of every job that started in a sweep directory, by job number."""
    if not sweep_dir.is_dir():
        return []
    jobs = [(_job_num(d), d) for d in sweep_dir.iterdir() if d.is_dir() and _job_num(d) is not None]
    return sorted(jobs, key=lambda j: j[0])


def summary_lines(sweep_dir: Path) -> list[str]:
    """The job summary of a sweep directory (module docstring), headed by the counts."""
    rows = [(num, path, *job_outcome(path)) for num, path in sweep_jobs(sweep_dir)]
    counts = {s: sum(r[2] == s for r in rows) for s in (rundir.FINISHED, rundir.FAILED, rundir.INTERRUPTED)}
    lines = [f"sweep summary: {len(rows)} jobs in {sweep_dir}: "
             + ", ".join(f"{n} {state}" for state, n in counts.items())]
    for num, path, outcome, reason in rows:
        lines.append(f"  job {num:<3d} {outcome:<12s} {path}" + (f"  {reason}" if reason else ""))
    return lines


class SweepSummary(Callback):
    """Hydra callback: the job summary at the end of a sweep, and each failed job's reason in its log."""

    def __init__(self, **_: Any):
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config, **_: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        # Hydra stops at the first failed job without calling on_multirun_end: report at exit then.
        atexit.register(self.report)

    def on_multirun_end(self, config, **_: Any) -> None:
        self.report()

    def on_job_end(self, config, job_return, **_: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.FAILED:
            reason = " ".join(str(job_return._return_value).split()) or type(job_return._return_value).__name__
            log.error(REFUSED_PREFIX + reason)

    def report(self) -> None:
        if self.sweep_dir is None:
            return
        atexit.unregister(self.report)
        sweep_dir, self.sweep_dir = self.sweep_dir, None
        print("\n".join(summary_lines(sweep_dir)), file=sys.stderr, flush=True)
