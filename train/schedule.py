"""Checkpoint schedule in tokens seen: log-spaced points (resolving the early, fast-changing part
of training) united with linearly spaced ones (resolving the rest), mapped to optimizer steps."""
from __future__ import annotations

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


def run_schedule(cfg) -> tuple[int, int, list[int]]:
    """(tokens per step, total steps, checkpoint steps) of a run's config."""
    tokens_per_step = cfg.train.batch_size * cfg.data.n_ctx
    total_steps = cfg.train.total_tokens // tokens_per_step
    s = cfg.schedule
    return tokens_per_step, total_steps, checkpoint_steps(total_steps, tokens_per_step, s.n_log, s.n_linear,
                                                         s.first_tokens)
