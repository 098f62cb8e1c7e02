"""Numerical faults that stop training (exit 3, train/cli.py): a non-finite loss or gradient norm
(`FiniteCheck`), and divergence, the held-out loss above a uniform prediction's for several
checkpoints in a row (`Divergence`). Each raises TrainingError, whose `event` metrics.jsonl
records; the last good checkpoint is kept."""
from __future__ import annotations

import math
from typing import Any

import torch

from train import distributed as D
from train.core import names as N


class TrainingError(RuntimeError):
    """Training stopped on a fault; the message names the step, `event` the kind of fault
    (train/core/names.py: NONFINITE, DIVERGENCE) recorded in metrics.jsonl."""

    def __init__(self, message: str, event: str = N.NONFINITE):
        super().__init__(message)
        self.event = event


class FiniteCheck:
    """The loss and gradient norm of every step must be finite. Checked at once (`after_step`
    raises) unless `deferred`: on CUDA reading them every step is a host sync that stalls the
    GPU, so the check stays on the device, where fused AdamW skips every update from the first
    non-finite step on, and `check` raises at the next checkpoint. Values every rank computed
    together (the global batch's loss, the all-reduced gradient's norm) make every rank raise at
    the same step, so the error is marked shared (train/distributed.py)."""

    def __init__(self, device: torch.device, deferred: bool, tokens_per_step: int):
        self.deferred, self.tokens_per_step = deferred, tokens_per_step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, optimizer) -> None:
        """Before `optimizer.step()`: raise for a non-finite value, or with deferred checks mark
        the update to be skipped (`found_inf`, read by fused AdamW)."""
        if self.deferred:  # no host sync: the update is skipped on the device
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
            optimizer.found_inf = (self.first_bad >= 0).float()
        elif not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise D.mark_shared(TrainingError(f"non-finite {what} at step {step} "
                                              f"({step * self.tokens_per_step:,} tokens); stopped without updating"))

    def check(self, step: int) -> None:
        """With deferred checks: raise TrainingError when a step since the last check had a
        non-finite loss or gradient norm (the updates from that step on were skipped)."""
        if self.deferred and int(self.first_bad) >= 0:
            bad = int(self.first_bad)
            raise D.mark_shared(TrainingError(f"non-finite loss or gradient norm at step {bad} "
                                              f"({bad * self.tokens_per_step:,} tokens), found at step {step}; "
                                              f"stopped without updating from step {bad} on"))


class Divergence:
    """The held-out loss above ln(vocab_size) + train.divergence_margin (a uniform prediction's
    loss plus the margin) at train.divergence_checkpoints consecutive checkpoints (0: never)."""

    def __init__(self, cfg: Any, tokens_per_step: int):
        self.limit = cfg.train.divergence_checkpoints
        self.line = math.log(cfg.data.vocab_size) + cfg.train.divergence_margin
        self.tokens_per_step = tokens_per_step
        self.over = 0  # consecutive checkpoints above the line

    def check(self, row: dict[str, Any], step: int) -> None:
        """Count the checkpoint's row; raise TrainingError once the limit is reached."""
        if not self.limit or N.LOSS_HELDOUT not in row:
            return
        self.over = self.over + 1 if row[N.LOSS_HELDOUT] > self.line else 0
        if self.over >= self.limit:
            raise TrainingError(f"diverged: held-out loss {row[N.LOSS_HELDOUT]:.4g} at step {step} "
                                f"({step * self.tokens_per_step:,} tokens) above ln(vocab_size) + "
                                f"train.divergence_margin = {self.line:.3f} at {self.limit} checkpoints in a row; "
                                f"lower optim.lr", N.DIVERGENCE)
