"""Recompute checkpoint metrics for an existing run, without retraining.

    uv run python -m analysis.recompute RUN_DIR [--callbacks NAME ...] [--out FILE] [--device cpu]

Loads every saved checkpoint (RUN_DIR/checkpoints/step_*/model.safetensors + meta.json) and the
probes exactly as training built them, both through the run reader (train/core/runs.py Run), and
evaluates the named callbacks at each checkpoint with the same code training uses
(``train.core.callbacks.evaluate_checkpoint``), each at its own `every` cadence over the run's
checkpoint schedule (train/core/schedules.py run_schedule: the fixed schedule, or under adaptive
density the run's own checkpoints). Writes one row per checkpoint (step, tokens + metric keys) to
RUN_DIR/recomputed.jsonl (or --out). Callback names are the keys of the callbacks config: the
run's own saved entries first, then those of conf/callbacks/ (default.yaml, and the optional
ones such as `llc` in with_llc.yaml) for callbacks added since, so new metrics can be computed
for old runs. Without --callbacks, all of the current defaults (default.yaml) run; a named
callback brings the callbacks whose results it needs. Prints one line per head with
the first checkpoint at which it was labelled behavioral / mechanistic (when the induction
classification ran), one progress line per checkpoint (stderr), and a summary that counts, per
callback, the checkpoints it ran at (`llc` runs at every 10th) and where the rows went. The rows
are written when all are computed, under a temporary name (--out must be a new file or one of
this project's rows, or --force: train/core/outputs.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

from train.core import names as N
from train.core import edge, outputs, rundir
from train.core.callbacks import RunContext, evaluate_checkpoint, instantiate_callbacks, prepare_callbacks, with_providers
from train.core.config import ConfigError
from train.core.runs import RunError, open_run
from train.core.schedules import run_schedule

CALLBACK_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "callbacks"


class RecomputeError(ValueError):
    """A user-facing problem (an unknown callback, a device that is not there): one line, no traceback."""


def _entries(path: Path):
    """The callback entries of one conf/callbacks/ file (its Hydra defaults list left out)."""
    entries = OmegaConf.load(path)
    return OmegaConf.create({k: v for k, v in entries.items() if k != "defaults"})


def callback_configs(cfg, names: list[str] | None, prefer_defaults: bool = False) -> dict[str, Any]:
    """{name: resolved config} of the chosen callbacks and those whose results they need, in
    config order. `cfg` is the run's saved config."""
    defaults = OmegaConf.load(CALLBACK_CONFIGS / "default.yaml")
    known = OmegaConf.merge(*(_entries(p) for p in sorted(CALLBACK_CONFIGS.glob("*.yaml"))))
    # Saved entries win (unless prefer_defaults); entries the run switched off (null) come from
    # conf/ when asked for or needed; interpolations in conf/ (${probes.icl_early}) resolve
    # against the run's saved config.
    saved = OmegaConf.create({k: v for k, v in (cfg.get("callbacks") or {}).items() if v is not None})
    cfg.callbacks = OmegaConf.merge(saved, known) if prefer_defaults else OmegaConf.merge(known, saved)
    available = {name: c for name, c in cfg.callbacks.items() if c is not None}
    chosen = [n for n in defaults if n in available] if names is None else names
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise RecomputeError(f"unknown callback(s) {', '.join(unknown)}; available: {', '.join(available)}")
    classes = {}
    for name, c in available.items():
        try:
            classes[name] = get_class(c._target_)
        except Exception as e:  # noqa: BLE001 - any bad target is the same user-facing problem
            raise RecomputeError(f"callbacks.{name}: cannot load {c.get('_target_')!r} ({e})") from None
    needed = with_providers(classes, chosen)
    return {name: OmegaConf.to_container(c, resolve=True) for name, c in available.items() if name in needed}


def recompute(run_dir: Path, names: list[str] | None = None, out: Path | None = None,
              device: str = "cpu", prefer_defaults: bool = False, force: bool = False,
              log=lambda message: None, ran: dict[str, int] | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Evaluate the callbacks at every checkpoint with weights (module docstring). Returns the
    rows and where they went; `ran` (when given) gets, per callback, the number of checkpoints it
    ran at (its `every`). Everything is checked before the first checkpoint is evaluated; `log`
    hears of each one."""
    from train.core.device import select_device

    run = open_run(run_dir)
    out = Path(out) if out is not None else run.path / rundir.RECOMPUTED_FILE
    outputs.check_output_file(out, force, what=f"--out {out}")
    try:
        device = select_device(device)
    except (ValueError, RuntimeError) as e:  # a device that is not there, or no device name
        raise RecomputeError(f"--device {device}: {e}") from None
    with_weights = run.with_weights()
    cfg = run.saved_config()
    configs = callback_configs(cfg, names, prefer_defaults)
    if names is not None and set(configs) - set(names):
        print(f"also running {', '.join(n for n in configs if n not in names)} (needed by "
              f"{', '.join(names)})", file=sys.stderr)
    model, _ = run.load_model(with_weights[0], device)
    ctx = RunContext(model, run.probes().to(device))
    callbacks = prepare_callbacks(instantiate_callbacks(configs), ctx)
    schedule = run_schedule(cfg, [r[N.STEP] for r in run.rows if N.EVENT not in r and N.STEP in r])
    all_steps = [c.step for c in run.checkpoints()]
    rows, ran = [], ran if ran is not None else {}
    ran.update(dict.fromkeys((cb.name for cb in callbacks), 0))
    for i, c in enumerate(with_weights):
        t0 = time.perf_counter()
        run.load_weights(model, c)
        model.eval()
        # Checkpoint cadence as in training: the step's index in the run's schedule.
        ctx.step, ctx.tokens = c.step, int(c.tokens)
        ctx.checkpoint_index = schedule.index(c.step) if c.step in schedule else all_steps.index(c.step)
        due = [cb.name for cb in callbacks if cb.due(ctx)]
        for name in due:
            ran[name] += 1
        rows.append({N.STEP: ctx.step, N.TOKENS: ctx.tokens} | evaluate_checkpoint(callbacks, ctx))
        log(f"step {c.step} ({i + 1}/{len(with_weights)}): {', '.join(due) or 'nothing due'} "
            f"({time.perf_counter() - t0:.1f} s)")
    rundir.write_text_atomic(out, "".join(rundir.format_row(r) for r in rows))
    return rows, out


def first_labelled(rows: list[dict[str, Any]], label: str) -> dict[str, int]:
    """Head name -> tokens of the first row where the per-head `label` is 1."""
    first: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            parsed = N.parse_head_key(key)
            if parsed and parsed[0] == label and value == 1:
                first.setdefault(N.head_name(*parsed[1:]), row[N.TOKENS])
    return first


@edge.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.recompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--callbacks", nargs="+", metavar="NAME", help="callback names (default: all current defaults)")
    parser.add_argument("--out", type=Path, help="output file (default: RUN_DIR/recomputed.jsonl)")
    parser.add_argument("--force", action="store_true", help="replace an --out file that holds no rows of this project's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--use-defaults", action="store_true",
                        help="take callback settings from conf/callbacks/ even where the run saved its own")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        ran: dict[str, int] = {}
        rows, out = recompute(args.run_dir, args.callbacks, args.out, args.device, args.use_defaults, args.force,
                              log=lambda m: print(m, file=sys.stderr), ran=ran)
    except (RecomputeError, RunError, ConfigError, rundir.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    behavioral, mechanistic = first_labelled(rows, N.IS_BEHAVIORAL), first_labelled(rows, N.IS_MECHANISTIC)
    for head in sorted(set(behavioral) | set(mechanistic), key=N.parse_head_name):
        b, m = behavioral.get(head), mechanistic.get(head)
        print(f"{head}: first behavioral at {'never' if b is None else f'{b:,} tokens'}, "
              f"first mechanistic at {'never' if m is None else f'{m:,} tokens'}")
    last = rows[-1] if rows else {}
    if N.part_key(N.INDUCTION_HEADS, N.BEHAVIORAL) in last:
        counts = ", ".join(f"{part} {last.get(N.part_key(N.INDUCTION_HEADS, part))}"
                           for part in (N.BEHAVIORAL, N.MECHANISTIC, N.BOTH, N.DISAGREEING))
        print(f"last checkpoint ({last[N.TOKENS]:,} tokens): {counts}")
    done = "; ".join(f"{name} at {n} of {len(rows)}" for name, n in ran.items())
    print(f"recomputed {len(rows)} checkpoints in {time.perf_counter() - t0:.1f} s ({done}) -> {out}")
    if not any(ran.values()):
        print("error: no callback was due at any checkpoint with weights (see each callback's `every`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
