"""Adaptive checkpoint density in a training run (`checkpoint.adaptive`): the watch the trainer
(train/loop.py) runs every few steps and the weights it keeps for lead-in checkpoints. What is
decided from the watched values, and when, is train/core/schedules.py DensityWatch's.

The watched values, measured on rank 0: every head's prefix-matching score on the first
`watch_probes` main repeated-token probes (train/core/metrics.py, the attention callback's
definition on fewer probes), and with `loss_change` set the mean training loss since the previous
regular watch. The weights (and running train-loss sums and learning rate) of the steps the
decisions keep (`DensityWatch.kept`) are copied on the model's device, so that a lead-in checkpoint
can be evaluated and saved once a later watch decides on it; they are part of the resume state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.core import metrics as M
from train.core import names as N
from train.core.schedules import DensityWatch


@dataclass
class Kept:
    """A watched step's weights, train-loss sums since the last checkpoint, and learning rate."""

    weights: dict[str, torch.Tensor]
    loss_sum: torch.Tensor
    loss_count: int
    lr: float


class Watch:
    """The watch of one run: its decisions (`decide`: DensityWatch) and, on rank 0, the probes it
    measures and the kept weights."""

    def __init__(self, cfg, model, probes, base_steps: list[int], tokens_per_step: int):
        a = cfg.checkpoint.adaptive
        floors: dict[str, float | None] = {N.head_name(l, h): a.min_change for l in range(model.n_layers)
                                           for h in range(model.n_heads)}
        if a.loss_change is not None:
            floors[N.LOSS_TRAIN] = a.loss_change
        self.decide = DensityWatch(a, base_steps, tokens_per_step, floors)
        self.tokens = None if probes is None else probes.repeated[: a.watch_probes]
        self.mask = None if self.tokens is None else M.prefix_matching_mask(self.tokens)
        self.watches_loss = a.loss_change is not None
        self.loss_sum, self.loss_count = 0.0, 0  # the training loss since the last regular watch
        self.kept: dict[int, Kept] = {}

    def add_loss(self, loss: torch.Tensor) -> None:
        if self.watches_loss:
            self.loss_sum, self.loss_count = self.loss_sum + float(loss), self.loss_count + 1

    def values(self, model, step: int) -> dict[str, float]:
        """The watched values now (module docstring)."""
        model.eval()
        scores = M.masked_attention_score(M.attention_patterns(model, self.tokens), self.mask)
        model.train()
        values = {N.head_name(l, h): v for l, row in enumerate(scores.tolist()) for h, v in enumerate(row)}
        if self.watches_loss:
            values[N.LOSS_TRAIN] = self.loss_sum / max(self.loss_count, 1)
        if step % self.decide.interval(step) == 0:
            self.loss_sum, self.loss_count = 0.0, 0
        return values

    def keep(self, step: int, model, loss_sum: torch.Tensor, loss_count: int, lr: float) -> None:
        """Keep this step's weights when the decisions keep the step, and let go of those they
        dropped."""
        if step in self.decide.kept and step not in self.kept:
            self.kept[step] = Kept({k: v.detach().clone() for k, v in model.state_dict().items()},
                                   loss_sum.detach().clone(), loss_count, lr)
        self.kept = {s: k for s, k in self.kept.items() if s in self.decide.kept}

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and tensors (what `torch.load(weights_only=True)` reads back)."""
        kept = {str(s): {"weights": k.weights, "loss_sum": k.loss_sum, "loss_count": k.loss_count, "lr": k.lr}
                for s, k in self.kept.items()}
        return {"density": self.decide.state_dict(), "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "kept": kept}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.decide.load_state_dict(state["density"])
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.kept = {int(s): Kept({n: t.to(device) for n, t in k["weights"].items()}, k["loss_sum"].to(device),
                                  int(k["loss_count"]), float(k["lr"])) for s, k in state["kept"].items()}
        if set(self.kept) != set(self.decide.kept):
            raise ValueError(f"kept weights for steps {sorted(self.kept)}, the decisions keep {sorted(self.decide.kept)}")


def explain(decision) -> dict[str, Any]:
    """The row keys that say why a checkpoint was taken (train/core/schedules.py Decision)."""
    row: dict[str, Any] = {N.CHECKPOINT_REASON: decision.reason}
    if decision.channel is not None:
        row |= {N.WATCH_CHANNEL: decision.channel, N.WATCH_CHANGE: decision.change}
    if decision.threshold is not None:
        row[N.WATCH_THRESHOLD] = decision.threshold
    return row
