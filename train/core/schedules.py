"""The two schedules of a run, both in optimizer steps:

* the checkpoint schedule (`checkpoint_steps`): when the run evaluates its callbacks and saves a
  checkpoint: log-spaced points in tokens seen (resolving the early, fast-changing part of
  training) united with linearly spaced ones (resolving the rest); config section `checkpoint`;
* the learning-rate schedule (`lr_multiplier`): linear warmup, then constant, cosine or linear
  decay; config keys `optim.warmup_tokens`, `optim.lr_schedule`, `optim.min_lr_ratio`."""
from __future__ import annotations

import math

import numpy as np


def checkpoint_steps(total_steps: int, tokens_per_step: int, n_log: int, n_linear: int, first_tokens: int) -> list[int]:
    """Sorted unique steps in [0, total_steps] at which to evaluate and checkpoint.

    Always includes step 0 (the initialisation) and the final step."""
    if total_steps <= 0:
        raise ValueError(f"training needs at least one step, got total_steps={total_steps}")
    total_tokens = total_steps * tokens_per_step
    points = [0.0, float(total_tokens)]
    if n_log > 0:
        start = min(max(first_tokens, tokens_per_step), total_tokens)
        points += list(np.geomspace(start, total_tokens, n_log))
    if n_linear > 0:
        points += list(np.linspace(0, total_tokens, n_linear + 1))
    steps = {min(total_steps, int(round(p / tokens_per_step))) for p in points}
    return sorted(steps)


def run_steps(cfg) -> tuple[int, int, list[int]]:
    """(tokens per step, total steps, checkpoint steps) of a run's config."""
    tokens_per_step = cfg.train.batch_size * cfg.data.n_ctx
    total_steps = cfg.train.total_tokens // tokens_per_step
    c = cfg.checkpoint
    return tokens_per_step, total_steps, checkpoint_steps(total_steps, tokens_per_step, c.n_log, c.n_linear,
                                                         c.first_tokens)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, lr_schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant, cosine or linear decay to `min_ratio` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if lr_schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if lr_schedule == "linear":
        return 1.0 - (1 - min_ratio) * min(1.0, progress)
    raise ValueError(f"unknown optim.lr_schedule {lr_schedule!r}")
