"""Whole-run measurements (scripts/bench.py --runs): what a checkpoint schedule costs and resolves,
and what the thread setting does beside a busy process.

7. schedules: the default run (and the cases of `Runs.cases`: its 1-layer control, `text_cpu`
   on --corpus, a 10x longer run) trained in this process through `train.loop.Trainer`, once on
   a dense reference schedule (`DENSE`: 300 log-spaced points, only the callbacks the phase
   detector reads, no weights saved), once on the fixed schedule and once under adaptive density
   (`checkpoint=adaptive`), for each seed (`text_cpu` and the longer run, 4 and 10 times the
   default run's tokens: the first seed only). The training is the same in the three runs (the
   checkpoints draw no random numbers), so they differ only in where the rows are measured.
   Per run: the wall time of `Trainer.run`, the seconds in `Trainer.evaluate` (the callbacks) and
   in the watch of adaptive density (train/watch.py Watch.values and Watch.keep: the probe and the
   kept weights), each as a share of that wall; the checkpoints
   (zoomed ones apart); the phase-change window of `python -m analysis` (train/core/phase.py
   detect_run on the run's rows), the checkpoints inside it, and each edge's distance in tokens
   from the fixed schedule's edge of the same case and seed (relative: |a - f| / f) and from the
   dense reference's (signed: (a - d) / d, the error of the window a schedule resolves).
8. threads: `python -m train` of the default config as a subprocess (logger=none, its own run
   directory, OMP_NUM_THREADS and MKL_NUM_THREADS removed from its environment), wall seconds from
   start to exit, for each thread setting (`threads=1`, `threads=2`, `threads=auto`, and 2 threads
   with OMP_WAIT_POLICY=PASSIVE), idle and beside one competing busy process (`python -c 'while
   True: pass'`, started by the benchmark before the run and stopped after it); the settings
   interleaved, repeated `repeats` times, the median reported; the ratio busy / idle per setting
   (--quick: threads=auto only, idle, once, on a smoke run of two steps).
   The run's own first lines say which thread count `auto` chose.

No timing targets here: this prints numbers."""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scripts.bench_trainer import default_trainer, time_inside
from scripts.bench_timing import timed

ROOT = Path(__file__).resolve().parents[1]
DENSE = ["checkpoint.n_log=300", "checkpoint.n_linear=0", "checkpoint.save_weights=false",
         *(f"callbacks.{c}=null" for c in ("circuits", "robustness", "induction", "ablation"))]
SCHEDULES = {"dense": DENSE, "fixed": [], "adaptive": ["checkpoint=adaptive"]}
THREAD_SETTINGS = {"1": (["threads=1"], {}), "2": (["threads=2"], {}), "auto": (["threads=auto"], {}),
                   "2, OMP_WAIT_POLICY=PASSIVE": (["threads=2"], {"OMP_WAIT_POLICY": "PASSIVE"})}


@dataclass(frozen=True)
class Runs:
    cases: dict[str, list[str]]  # case name -> overrides of the default config
    seeds: tuple[int, ...]
    thread_overrides: tuple[str, ...]  # the thread runs' config (the default one: none)
    repeats: int  # thread runs per setting and condition
    thread_settings: tuple[str, ...] = tuple(THREAD_SETTINGS)
    thread_timeout: float = 1800.0  # seconds one thread run may take
    busy: bool = True  # also beside a busy process
    first_seed_only: tuple[str, ...] = ()  # cases too costly for every seed: the first seed only


def runs_for(quick: bool, corpus: Path | None = None, long: bool = True, repeats: int = 3) -> Runs:
    if quick:  # a 32-wide model, 15 steps, the basic callbacks; one thread run
        tiny = ["model.d_model=32", "train.total_tokens=61440", "checkpoint.n_log=10", "checkpoint.n_linear=5",
                "probes.n_heldout=16", *(f"callbacks.{c}=null" for c in ("circuits", "robustness", "induction", "ablation"))]
        return Runs(cases={"default": tiny}, seeds=(0,), thread_overrides=("experiment=smoke", "train.total_tokens=8192"),
                    repeats=1, thread_settings=("auto",), busy=False)
    cases = {"default": [], "1-layer control": ["model.n_layers=1"]}
    if corpus is not None:
        cases["text_cpu"] = ["experiment=text_cpu", f"data.source={corpus}"]
    if long:
        cases["10x longer (40M tokens)"] = ["train.total_tokens=40000000"]
    costly = tuple(c for c in cases if c.startswith(("text_cpu", "10x")))  # 4x and 10x the default run's tokens
    return Runs(cases=cases, seeds=(0, 1, 2), thread_overrides=(), repeats=repeats, first_seed_only=costly)


# -- 7. schedules ----------------------------------------------------------------------------------
def window_of(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The phase-change window `python -m analysis` finds in these rows (None: none found)."""
    from train.core.phase import detect_run
    from train.core.runs import Run

    return detect_run(Run(rows=rows))["window"]


def resolution(rows: list[dict[str, Any]], window: dict[str, Any] | None) -> dict[str, Any]:
    """Checkpoints, zoomed checkpoints and checkpoints inside `window` of a run's rows."""
    from train.core import names as N
    from train.core.schedules import ZOOM

    rows = [r for r in rows if N.EVENT not in r]
    inside = None if window is None else sum(window["start_tokens"] <= r[N.TOKENS] <= window["end_tokens"]
                                             for r in rows)
    return {"checkpoints": len(rows), "zoomed": sum(r.get(N.CHECKPOINT_REASON) == ZOOM for r in rows),
            "window": window, "in_window": inside}


def edge_shift(window: dict[str, Any] | None, fixed: dict[str, Any] | None) -> dict[str, float] | None:
    """|adaptive edge - fixed edge| / fixed edge, per edge (None when either has no window)."""
    error = edge_error(window, fixed)
    return None if error is None else {k: abs(v) for k, v in error.items()}


def edge_error(window: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, float] | None:
    """(edge - reference edge) / reference edge, per edge (None when either has no window)."""
    if window is None or reference is None:
        return None
    return {k: (window[f"{k}_tokens"] - reference[f"{k}_tokens"]) / reference[f"{k}_tokens"] for k in ("start", "end")}


def schedule_run(device: torch.device, overrides: list[str]) -> dict[str, Any]:
    """One run through Trainer.run in this process: wall seconds, seconds inside evaluate and the
    watch, and the resolution of its rows."""
    from train.core.rundir import read_metrics

    with tempfile.TemporaryDirectory(prefix="bench-schedule-") as tmp:
        trainer = default_trainer(Path(tmp), device, overrides)
        w = trainer.watch
        watch = () if w is None else ((w, "values", "watch.values"), (w, "keep", "watch.keep"))
        with time_inside(trainer, device, watch) as inside:
            seconds = timed(trainer.run, device)
        if trainer.exit_code != 0:
            raise RuntimeError(f"the run {overrides} ended with exit code {trainer.exit_code}")
        rows = read_metrics(tmp)
    watch = inside.get("watch.values", 0.0) + inside.get("watch.keep", 0.0)
    out = {"overrides": overrides, "run_seconds": seconds, "evaluate_seconds": inside["evaluate"],
           "watch_seconds": watch, "train_step_seconds": inside["train_step"],
           "callback_share": inside["evaluate"] / seconds, "watch_share": watch / seconds,
           "steps": trainer.total_steps}
    return out | resolution(rows, window_of(rows))


def bench_schedules(device: torch.device, r: Runs, say=print) -> list[dict[str, Any]]:
    """Every case x seed x schedule (module docstring, 7), in the order of SCHEDULES: the dense
    reference and the fixed schedule of a case and seed before the adaptive run compared with them."""
    results = []
    for case, overrides in r.cases.items():
        for seed in r.seeds[:1] if case in r.first_seed_only else r.seeds:
            windows: dict[str, Any] = {}
            for schedule, extra in SCHEDULES.items():
                say(f"{case}, seed {seed}, {schedule} schedule ...")
                res = schedule_run(device, [*overrides, f"seed={seed}", *extra])
                res |= {"case": case, "seed": seed, "schedule": schedule}
                windows[schedule] = res["window"]
                res["edge_shift"] = edge_shift(res["window"], windows.get("fixed"))
                res["edge_error"] = edge_error(res["window"], windows.get("dense"))
                results.append(res)
    return results


# -- 8. threads ------------------------------------------------------------------------------------
@contextlib.contextmanager
def busy_process(on: bool):
    """One process spinning on a core while the block runs (nothing when not `on`)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        time.sleep(0.5 if on else 0)  # running before the measured run starts
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def train_wall(overrides: list[str], env_extra: dict[str, str], timeout: float) -> tuple[float, str]:
    """Wall seconds of `python -m train OVERRIDES` from start to exit, and the thread line its start
    printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **env_extra}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "train", "logger=none", *overrides, f"hydra.run.dir={tmp}/run"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"python -m train {' '.join(overrides)} exited {proc.returncode}: {proc.stderr[-500:]}")
    line = next((l.strip() for l in proc.stdout.splitlines() if "thread" in l and l.startswith("  device")), "")
    return seconds, line


def bench_threads(r: Runs, say=print) -> dict[str, Any]:
    """Every thread setting idle and beside a busy process (module docstring, 8)."""
    conditions = ("idle", "busy") if r.busy else ("idle",)
    walls: dict[str, dict[str, list[float]]] = {c: {s: [] for s in r.thread_settings} for c in conditions}
    lines: dict[str, dict[str, list[str]]] = {c: {s: [] for s in r.thread_settings} for c in conditions}
    for i in range(r.repeats):
        for condition in conditions:
            order = list(r.thread_settings) if i % 2 == 0 else list(r.thread_settings)[::-1]
            for setting in order:
                overrides, env = THREAD_SETTINGS[setting]
                say(f"threads {setting}, {condition}, run {i + 1} of {r.repeats} ...")
                with busy_process(condition == "busy"):
                    seconds, line = train_wall([*r.thread_overrides, *overrides], env, r.thread_timeout)
                walls[condition][setting].append(seconds)
                lines[condition][setting].append(line)
    return thread_summary(" ".join(r.thread_overrides) or "default", walls, lines)


def thread_summary(config: str, walls: dict[str, dict[str, list[float]]],
                   lines: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """The thread runs' walls (condition -> setting -> seconds) and start lines, with the median
    per condition and setting and, when measured beside a busy process, busy / idle per setting."""
    median = {c: {s: statistics.median(v) for s, v in by.items()} for c, by in walls.items()}
    ratio = {s: median["busy"][s] / median["idle"][s] for s in median["idle"]} if "busy" in median else {}
    return {"config": config, "walls": walls, "median_wall": median, "busy_over_idle": ratio, "start_lines": lines,
            "cpu_count": os.cpu_count()}
