"""Callbacks: thin wrappers that schedule metrics (train/metrics.py) and return flat rows.

Each callback is built from config (`_target_`), gets `setup(ctx)` once (build what depends only
on the fixed probes, never per checkpoint), and `__call__(ctx)` at every `every`-th checkpoint,
returning a dict of flat keys (`prefix_matching/L1H3`, `icl_score`, ...) for metrics.jsonl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train import metrics as M
from train.data import Probes
from train.model import AttnOnlyTransformer


@dataclass
class RunContext:
    model: AttnOnlyTransformer
    probes: Probes
    step: int = 0
    tokens: int = 0
    checkpoint_index: int = 0  # how many checkpoints came before this one


def per_head(name: str, scores: torch.Tensor) -> dict[str, float]:
    """[n_layers, n_heads] -> {"name/L{l}H{h}": value}."""
    return {f"{name}/L{l}H{h}": float(v) for l, row in enumerate(scores.tolist()) for h, v in enumerate(row)}


class Callback:
    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"callback 'every' must be >= 1, got {every}")
        self.every = every

    def due(self, ctx: RunContext) -> bool:
        return ctx.checkpoint_index % self.every == 0

    def setup(self, ctx: RunContext) -> None:
        pass

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError


class AttentionScores(Callback):
    """Prefix-matching and duplicate-token scores on the repeated-random-token probes, and the
    previous-token score on held-out training-distribution sequences."""

    def __init__(self, every: int = 1, n_heldout: int = 64):
        super().__init__(every)
        self.n_heldout = n_heldout

    def setup(self, ctx: RunContext) -> None:
        tokens = ctx.probes.repeated
        self.prefix_mask = M.prefix_matching_mask(tokens)
        self.duplicate_mask = M.duplicate_token_mask(tokens)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        probe_patterns = M.attention_patterns(ctx.model, ctx.probes.repeated)
        text_patterns = M.attention_patterns(ctx.model, ctx.probes.heldout[: self.n_heldout])
        row = per_head("prefix_matching", M.masked_attention_score(probe_patterns, self.prefix_mask))
        row |= per_head("duplicate_token", M.masked_attention_score(probe_patterns, self.duplicate_mask))
        row |= per_head("previous_token", M.previous_token_score(text_patterns))
        return row


class CopyingScores(Callback):
    """Copying score per head (direct-path OV, weights only) on the probes' random tokens."""

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        return per_head("copying", M.copying_score(ctx.model, ctx.probes.copy_tokens))


class HeldoutLoss(Callback):
    """Held-out loss, the full per-position loss vector, and the ICL score with its indices."""

    def __init__(self, every: int = 1, icl_early: int | None = None, icl_late: int | None = None):
        super().__init__(every)
        self.icl_early, self.icl_late = icl_early, icl_late

    def setup(self, ctx: RunContext) -> None:
        self.early, self.late = M.icl_indices(ctx.probes.heldout.shape[1], self.icl_early, self.icl_late)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        losses = M.per_position_loss(ctx.model, ctx.probes.heldout)
        return {
            "loss/heldout": float(losses.mean()),
            "icl_score": float(M.icl_score(losses, self.early, self.late)),
            "icl_early": self.early,
            "icl_late": self.late,
            "per_position_loss": [round(x, 5) for x in losses.tolist()],
        }
