"""Calibrate the LLC estimator's SGLD settings on one checkpoint of a run.

    uv run python -m analysis.llc_calibrate RUN_DIR [--step N] [--lr LR ...] [--localization G ...]
        [--n-beta NB ...] [--draws N] [--chains N] [--burnin N] [--batch-size N] [--n-sequences N]
        [--seed N] [--device cpu]

Loads the checkpoint at step N (default: the last one with weights) and the run's probes through
the run reader (train/core/runs.py Run), and runs `train.core.llc.estimate_llc` on the first
n-sequences held-out sequences for every combination of --lr, --localization and --n-beta
("default": the rule in train/core/llc.py). Settings not given take the defaults of the `llc`
callback (train.core.callbacks.LLCEstimate). Prints one row per combination: lr, localization, n_beta,
mean, std (over chains), diverged chains, the LLC over the first and the second half of the
draws (close when the chains are stationary after burn-in), and seconds. Good settings: no
diverged chain, a small std, the two halves close, and a mean that changes little with lr.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from train.core import edge


def _defaults() -> dict:
    from train.core.callbacks import LLCEstimate

    return {k: p.default for k, p in inspect.signature(LLCEstimate).parameters.items()}


def calibrate(model, tokens, lrs, localizations, n_betas, **settings) -> Iterator[dict]:
    """One row per (lr, localization, n_beta), as each finishes: estimate_llc's results, the LLC
    of each half of the draws and the seconds it took."""
    from train.core.llc import estimate_llc

    for lr, loc, nb in itertools.product(lrs, localizations, n_betas):
        start = time.perf_counter()
        r = estimate_llc(model, tokens, lr=lr, n_beta=nb, localization=loc, **settings)
        seconds = time.perf_counter() - start
        trace = np.asarray(r["loss_trace"])
        finite = np.isfinite(trace).all(axis=1)
        half = trace.shape[1] // 2
        halves = [float(r["n_beta"] * (part[finite].mean() - r["init_loss"])) if finite.any() else float("nan")
                  for part in (trace[:, :half], trace[:, half:])]
        yield {"lr": lr, "localization": loc, "n_beta": r["n_beta"], "mean": r["mean"], "std": r["std"],
               "diverged": r["diverged_chains"], "first_half": halves[0], "second_half": halves[1],
               "seconds": seconds}


HEADER = (f"{'lr':>9} {'localization':>12} {'n_beta':>8} {'mean':>9} {'std':>8} {'diverged':>8} "
          f"{'1st half':>9} {'2nd half':>9} {'seconds':>8}")


def format_row(r: dict) -> str:
    return (f"{r['lr']:>9.3g} {r['localization']:>12.4g} {r['n_beta']:>8.4g} {r['mean']:>9.2f} {r['std']:>8.2f} "
            f"{r['diverged']:>8d} {r['first_half']:>9.2f} {r['second_half']:>9.2f} {r['seconds']:>8.1f}")


def _n_beta(text: str) -> float | None:
    return None if text.lower() in ("default", "none", "null") else float(text)


@edge.command
def main(argv: list[str] | None = None) -> int:
    d = _defaults()
    parser = argparse.ArgumentParser(prog="python -m analysis.llc_calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the last with weights)")
    parser.add_argument("--lr", type=float, nargs="+", default=[d["lr"]], help="SGLD step sizes")
    parser.add_argument("--localization", type=float, nargs="+", default=[d["localization"]])
    parser.add_argument("--n-beta", type=_n_beta, nargs="+", default=[d["n_beta"]],
                        help="inverse temperatures; 'default' for the n / ln n rule")
    parser.add_argument("--draws", type=int, default=d["num_draws"])
    parser.add_argument("--chains", type=int, default=d["num_chains"])
    parser.add_argument("--burnin", type=int, default=d["num_burnin_steps"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--n-sequences", type=int, default=d["n_sequences"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from train.core.llc import check_settings
    from train.core.runs import RunError, open_run

    try:
        for lr, loc, nb in itertools.product(args.lr, args.localization, args.n_beta):
            check_settings(lr, nb, loc, args.chains, args.draws, args.burnin, args.batch_size)
        run = open_run(args.run_dir)
        checkpoint = run.checkpoint(args.step)
        model, _ = run.load_model(checkpoint, args.device)
        tokens = run.probes().heldout[: args.n_sequences]
        print(f"{args.run_dir}: step {checkpoint.step}, {tokens.shape[0]} held-out sequences, {args.chains} chains x "
              f"({args.burnin} burn-in + {args.draws} draws), batch {args.batch_size}", flush=True)
        rows = calibrate(model, tokens, args.lr, args.localization, args.n_beta, num_chains=args.chains,
                         num_draws=args.draws, num_burnin_steps=args.burnin, batch_size=args.batch_size,
                         seed=args.seed)
        print(HEADER, flush=True)
        for row in rows:
            print(format_row(row), flush=True)
    except (RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
