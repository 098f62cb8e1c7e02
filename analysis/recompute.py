"""Recompute checkpoint metrics for an existing run, without retraining.

    uv run python -m analysis.recompute RUN_DIR [--callbacks NAME ...] [--out FILE] [--device cpu]

Loads every saved checkpoint (RUN_DIR/checkpoints/step_*/model.safetensors + meta.json), rebuilds
the probes exactly as training did (``probes_from_config`` on the run's saved config), runs the
named callbacks (the same classes training uses, in config order, each at its own `every`
cadence over the checkpoints) and writes one row per checkpoint (step, tokens + metric keys) to
RUN_DIR/recomputed.jsonl (or --out). Callback names are the keys of the callbacks config: the
run's own saved entries first, then conf/callbacks/default.yaml for callbacks added since (so
new metrics can be computed for old runs). Without --callbacks, all of the current defaults
run. Prints one line per head with the first checkpoint at which it was labelled behavioral /
mechanistic (when the induction classification ran), and where the rows went.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train import checkpoint as ckpt
from train.callbacks import RunContext
from train.data import probes_from_config
from train.loggers import format_row
from train.schedule import run_schedule

DEFAULT_CALLBACKS = Path(__file__).resolve().parents[1] / "conf" / "callbacks" / "default.yaml"


class RecomputeError(ValueError):
    """A user-facing problem (missing run, no weights, unknown callback): one line, no traceback."""


def callback_configs(saved_cfg: dict[str, Any], names: list[str] | None,
                     prefer_defaults: bool = False) -> list[tuple[str, Any]]:
    """(name, resolved config) for the chosen callbacks, in config order."""
    cfg = OmegaConf.create(saved_cfg)
    defaults = OmegaConf.load(DEFAULT_CALLBACKS)
    saved = cfg.get("callbacks") or OmegaConf.create({})
    # Saved entries win (unless prefer_defaults); interpolations in the defaults
    # (${probes.icl_early}) resolve against the run's saved config.
    cfg.callbacks = OmegaConf.merge(saved, defaults) if prefer_defaults else OmegaConf.merge(defaults, saved)
    available = list(cfg.callbacks.keys())
    chosen = list(defaults.keys()) if names is None else names
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise RecomputeError(f"unknown callback(s) {', '.join(unknown)}; available: {', '.join(available)}")
    out = []
    for name in available:  # config order: later callbacks reuse earlier ones' scores
        if name in chosen and cfg.callbacks[name] is not None:
            out.append((name, OmegaConf.to_container(cfg.callbacks[name], resolve=True)))
    return out


def recompute(run_dir: Path, names: list[str] | None = None, out: Path | None = None,
              device: str = "cpu", prefer_defaults: bool = False) -> tuple[list[dict[str, Any]], Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecomputeError(f"no run directory at {run_dir}")
    checkpoints = ckpt.list_checkpoints(run_dir)
    if not checkpoints:
        raise RecomputeError(f"{run_dir} has no checkpoints (expected {run_dir / 'checkpoints' / 'step_*'})")
    with_weights = [c for c in checkpoints if (c / ckpt.MODEL_FILE).is_file()]
    if not with_weights:
        raise RecomputeError(f"no checkpoint of {run_dir} has weights ({ckpt.MODEL_FILE}); "
                             "the run was trained with checkpoint.save_weights=false")
    meta = ckpt.read_meta(with_weights[0])
    if "config" not in meta:
        raise RecomputeError(f"{with_weights[0] / ckpt.META_FILE} holds no saved config")
    cfg = OmegaConf.create(meta["config"])
    model, _ = ckpt.load_model(with_weights[0], device)
    data = instantiate(cfg.data)
    probes = probes_from_config(data, cfg.data.n_ctx, cfg.probes).to(device)
    callbacks = [instantiate(c) for _, c in callback_configs(meta["config"], names, prefer_defaults)]
    ctx = RunContext(model, probes)
    for cb in callbacks:
        cb.setup(ctx)
    out = Path(out) if out is not None else run_dir / "recomputed.jsonl"
    _, _, schedule = run_schedule(cfg)
    rows = []
    with torch.no_grad():
        for index, path in enumerate(checkpoints):
            if not (path / ckpt.MODEL_FILE).is_file():
                continue
            m = ckpt.read_meta(path)
            ckpt.load_weights(model, path)
            model.eval()
            # Checkpoint cadence as in training: the step's index in the run's schedule.
            ctx.step, ctx.tokens = int(m["step"]), int(m["tokens"])
            ctx.checkpoint_index = schedule.index(ctx.step) if ctx.step in schedule else index
            row: dict[str, Any] = {"step": ctx.step, "tokens": ctx.tokens}
            ctx.row = row
            for cb in callbacks:
                if cb.due(ctx):
                    row |= cb(ctx)
            rows.append(row)
    ckpt.write_text_atomic(out, "".join(format_row(r) for r in rows))
    return rows, out


def first_labelled(rows: list[dict[str, Any]], label: str) -> dict[str, int]:
    """Head name -> tokens of the first row where `label/<head>` is 1."""
    first: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(label + "/") and value == 1:
                first.setdefault(key.split("/", 1)[1], row["tokens"])
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.recompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--callbacks", nargs="+", metavar="NAME", help="callback names (default: all current defaults)")
    parser.add_argument("--out", type=Path, help="output file (default: RUN_DIR/recomputed.jsonl)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--use-defaults", action="store_true",
                        help="take callback settings from conf/callbacks/default.yaml even where the run saved its own")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows, out = recompute(args.run_dir, args.callbacks, args.out, args.device, args.use_defaults)
    except (RecomputeError, ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    behavioral, mechanistic = first_labelled(rows, "is_behavioral"), first_labelled(rows, "is_mechanistic")
    for head in sorted(set(behavioral) | set(mechanistic)):
        b, m = behavioral.get(head), mechanistic.get(head)
        print(f"{head}: first behavioral at {'never' if b is None else f'{b:,} tokens'}, "
              f"first mechanistic at {'never' if m is None else f'{m:,} tokens'}")
    if rows and any(k.startswith("is_behavioral/") for k in rows[-1]):
        last = rows[-1]
        print(f"last checkpoint ({last['tokens']:,} tokens): behavioral {last.get('induction_heads/behavioral')}, "
              f"mechanistic {last.get('induction_heads/mechanistic')}, both {last.get('induction_heads/both')}, "
              f"disagreeing {last.get('induction_heads/disagreeing')}")
    print(f"recomputed {len(rows)} checkpoints in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
