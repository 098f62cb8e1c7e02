"""The callbacks: what runs at a checkpoint (conf/callbacks/default.yaml; the framework, their
declarations and `evaluate_checkpoint`: train/core/scoring.py). Each scores the model through its
adapter (train/core/adapter.py: the project's model, or a Hugging Face causal LM) on the fixed
probes (train/core/probes.py) and declares what it needs of them (`requires`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from train.core import circuits as C
from train.core import probes as P
from train.core import metrics as M
from train.core import names as N
from train.core.adapter import LOGITS, PARAMETERS, PATTERNS, WEIGHTS, Z
from train.core.config import ConfigError
from train.core.model import next_token_loss
from train.core.probes import ALLOWED, HELDOUT
from train.core.settings import check
from train.core.scoring import (Callback, RunContext, evaluate_checkpoint, instantiate_callbacks,  # noqa: F401
                                prepare_callbacks, with_providers)


# -- behavioral scores and losses ---------------------------------------------------------------
class AttentionScores(Callback):
    """Prefix-matching and duplicate-token scores on the repeated-random-token probes, and the
    previous-token score on the first `n_heldout` held-out training-distribution sequences (on
    the repeated-random-token probes when there are none)."""

    provides = (N.PREFIX_MATCHING, N.DUPLICATE_TOKEN, N.PREVIOUS_TOKEN)
    requires = (PATTERNS,)

    def __init__(self, every: int = 1, n_heldout: int = 64):
        super().__init__(every)
        check("n_heldout", n_heldout, 1, integer=True)
        self.n_heldout = n_heldout

    def setup(self, ctx: RunContext) -> None:
        tokens = ctx.probes.repeated
        self.prefix_mask = M.prefix_matching_mask(tokens)
        self.duplicate_mask = M.duplicate_token_mask(tokens)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        probe_patterns = M.attention_patterns(ctx.model, ctx.probes.repeated)
        text = ctx.probes.heldout if ctx.probes.heldout is not None else ctx.probes.repeated
        text_patterns = M.attention_patterns(ctx.model, text[: self.n_heldout])
        return {N.PREFIX_MATCHING: M.masked_attention_score(probe_patterns, self.prefix_mask),
                N.DUPLICATE_TOKEN: M.masked_attention_score(probe_patterns, self.duplicate_mask),
                N.PREVIOUS_TOKEN: M.previous_token_score(text_patterns)}


class CopyingScores(Callback):
    """Copying score per head (direct-path OV, weights only) on the probes' random tokens."""

    provides = (N.COPYING,)
    requires = (WEIGHTS,)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        return {N.COPYING: M.copying_score(ctx.model, ctx.probes.copy_tokens)}


class HeldoutLoss(Callback):
    """Held-out loss, the full per-position loss vector, and the ICL score with its indices and its
    standard error over the held-out sequences (each index averaged over +- `icl_window`
    positions). With the repetition knob on, the loss and ICL score on held-out sequences with
    the training repetition too (the plain ones stay the main numbers)."""

    provides = (N.LOSS_HELDOUT, N.ICL_SCORE, N.PER_POSITION_LOSS)
    requires = (LOGITS, HELDOUT)

    def __init__(self, every: int = 1, icl_early: int | None = None, icl_late: int | None = None,
                 icl_window: int = 0):
        super().__init__(every)
        for name, value in dict(icl_early=icl_early, icl_late=icl_late).items():
            check(name, value, 0, integer=True, none=True)
        check("icl_window", icl_window, 0, integer=True)
        self.icl_early, self.icl_late, self.icl_window = icl_early, icl_late, icl_window

    def setup(self, ctx: RunContext) -> None:
        self.early, self.late = M.icl_indices(ctx.probes.heldout.shape[1], self.icl_early, self.icl_late)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        per_sequence = M.sequence_losses(ctx.model, ctx.probes.heldout)
        losses = M.mean_over_sequences(per_sequence)
        out = {N.LOSS_HELDOUT: float(losses.mean()),
               N.ICL_SCORE: float(M.icl_score(losses, self.early, self.late, self.icl_window)),
               N.ICL_SCORE_SE: float(M.icl_score_se(per_sequence, self.early, self.late, self.icl_window)),
               N.ICL_EARLY: self.early, N.ICL_LATE: self.late,
               N.PER_POSITION_LOSS: losses}
        if ctx.probes.heldout_mixture is not None:
            mixture = M.per_position_loss(ctx.model, ctx.probes.heldout_mixture)
            out[N.LOSS_HELDOUT_MIXTURE] = float(mixture.mean())
            out[N.ICL_SCORE_MIXTURE] = float(M.icl_score(mixture, self.early, self.late, self.icl_window))
        return out


# -- mechanistic scores, probe robustness, classification, ablations ---------------------------
class CircuitScores(Callback):
    """Weight-based circuit scores (train/core/circuits.py): Q-, K-, V-composition for every
    (later head, earlier head) pair with the random baseline subtracted, the baselines, the OV
    copying eigen-score and, for layers >= 1, the QK prefix-matching trace weighted by this
    checkpoint's previous-token scores."""

    provides = (N.COMPOSITION_BASELINE, *(N.composition(k) for k in C.COMPOSITIONS), N.OV_COPYING,
                N.QK_PREFIX_MATCHING)
    needs = (N.PREVIOUS_TOKEN,)
    requires = (WEIGHTS,)

    def __init__(self, every: int = 1, fold_layernorm: bool = True, baseline_samples: int = 256,
                 baseline_seed: int = 0):
        super().__init__(every)
        check("baseline_samples", baseline_samples, 1, integer=True)
        check("baseline_seed", baseline_seed, 0, integer=True)
        self.fold_layernorm = fold_layernorm
        self.baseline_samples, self.baseline_seed = baseline_samples, baseline_seed

    def setup(self, ctx: RunContext) -> None:
        m = ctx.model
        self.baselines = {k: C.composition_baseline(k, m.d_model, m.d_head, self.baseline_samples, self.baseline_seed)
                          for k in C.COMPOSITIONS}

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        model = ctx.model
        results: dict[str, Any] = {N.COMPOSITION_BASELINE: dict(self.baselines)}
        comp = C.composition_scores(model, self.fold_layernorm, self.baseline_samples, self.baseline_seed)
        results |= {N.composition(kind): pairs for kind, pairs in comp.items()}
        results[N.OV_COPYING] = C.ov_eigen_score(model)
        results[N.QK_PREFIX_MATCHING] = C.qk_prefix_matching_trace(model, ctx.scores[N.PREVIOUS_TOKEN].cpu())
        return results


class ProbeRobustness(Callback):
    """Prefix matching on the probe variants of `train.core.probes.robustness_probes` (`variants`:
    [period, repeats] of repeated random tokens; `heldout_segments`: of tiled held-out text), all
    in one batch, and the spread over them and the main probe (min, max, probe_fragile)."""

    provides = (N.PREFIX_MATCHING_MIN, N.PREFIX_MATCHING_MAX, N.PROBE_FRAGILE)
    needs = (N.PREFIX_MATCHING,)
    requires = (PATTERNS, ALLOWED)

    def __init__(self, every: int = 1, variants: Sequence = ((5, 4), (8, 7), (12, 2), (20, 3)),
                 heldout_segments: Sequence = ((10, 6),), n_probes: int = 8, seed: int = 4321,
                 fragile_ratio: float = 0.5, min_main: float = 0.3):
        super().__init__(every)
        self.variants = [tuple(v) for v in variants]
        self.heldout_segments = [tuple(v) for v in heldout_segments]
        for name, pairs in (("variants", self.variants), ("heldout_segments", self.heldout_segments)):
            for pair in pairs:
                for part, value in zip(("period", "repeats"), pair if len(pair) == 2 else (None, None)):
                    check(f"{name} {list(pair)}: {part}", value, 2, integer=True)
        check("n_probes", n_probes, 1, integer=True)
        check("fragile_ratio", fragile_ratio, 0, 1)
        check("min_main", min_main, 0, 1)
        self.n_probes, self.seed = n_probes, seed
        self.fragile_ratio, self.min_main = fragile_ratio, min_main

    def setup(self, ctx: RunContext) -> None:
        sets = P.robustness_probes(ctx.probes, ctx.model.n_ctx, self.variants, self.heldout_segments,
                                   self.n_probes, self.seed)
        self.names = [name for name, _ in sets]
        self.tokens = self.masks = None
        if sets:
            # Padded queries are left out of the masks (they have no True key).
            tokens, self.rows = P.concat_padded([t for _, t in sets])
            length = tokens.shape[1]
            masks = [F.pad(M.prefix_matching_mask(t), (0, length - t.shape[1], 0, length - t.shape[1])) for _, t in sets]
            device = ctx.probes.repeated.device
            self.tokens, self.masks = tokens.to(device), torch.cat(masks).to(device)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        variants: dict[str, torch.Tensor] = {}
        if self.tokens is not None:
            patterns = M.attention_patterns(ctx.model, self.tokens)
            for name, rows in zip(self.names, self.rows):
                variants[name] = M.masked_attention_score(patterns[:, rows], self.masks[rows]).cpu()
        low, high, fragile = M.probe_spread(ctx.scores[N.PREFIX_MATCHING].cpu(), list(variants.values()),
                                            self.fragile_ratio, self.min_main)
        results: dict[str, Any] = {N.prefix_matching_variant(name): t for name, t in variants.items()}
        return results | {N.PREFIX_MATCHING_MIN: low, N.PREFIX_MATCHING_MAX: high, N.PROBE_FRAGILE: fragile}


class InductionClassification(Callback):
    """Behavioral vs mechanistic induction heads at every checkpoint (rules: train.core.circuits.classify_heads;
    thresholds: keyword arguments named as the fields of train.core.circuits.Thresholds, whose
    defaults they take, and written into each row). Results: the thresholds, the per-head labels,
    the best K-composition with an earlier previous-token head, the counts and lists of
    `train.core.circuits.label_summary`, and the previous-token heads."""

    provides = (N.INDUCTION_THRESHOLDS, N.IS_BEHAVIORAL, N.IS_MECHANISTIC, N.K_COMPOSITION_PREV_TOKEN,
                N.INDUCTION_HEADS, N.PREVIOUS_TOKEN_HEADS)
    needs = (N.PREFIX_MATCHING, N.COPYING, N.PREVIOUS_TOKEN, N.composition("k"), N.OV_COPYING, N.QK_PREFIX_MATCHING)

    def __init__(self, every: int = 1, **thresholds: float):
        super().__init__(every)
        try:
            self.thresholds = C.Thresholds(**thresholds)
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(C.Thresholds))
            raise ValueError(f"unknown induction threshold(s) {', '.join(sorted(thresholds))}; known: {known}") from None
        for name, value in dataclasses.asdict(self.thresholds).items():  # any level (above 1: never), not nan
            check(name, value)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        s = ctx.scores
        previous = s[N.PREVIOUS_TOKEN].cpu()
        behavioral, mechanistic, k_prev = C.classify_heads(
            s[N.PREFIX_MATCHING].cpu(), s[N.COPYING].cpu(), previous, s[N.composition("k")], s[N.OV_COPYING].cpu(),
            s[N.QK_PREFIX_MATCHING].cpu(), self.thresholds)
        return {N.INDUCTION_THRESHOLDS: dataclasses.asdict(self.thresholds),
                N.IS_BEHAVIORAL: behavioral, N.IS_MECHANISTIC: mechanistic, N.K_COMPOSITION_PREV_TOKEN: k_prev,
                N.INDUCTION_HEADS: C.label_summary(behavioral, mechanistic),
                N.PREVIOUS_TOKEN_HEADS: C.previous_token_heads(previous, self.thresholds.previous_token)}


LOGITS_BUDGET = 1 << 26  # floats of logits one ablation forward pass may hold (256 MB)


class HeadAblations(Callback):
    """Causal check: zero- and mean-ablate each head (through the model's z hook) and measure the
    ICL score on the first `n_heldout` held-out sequences (None: all) and the loss on the repeated
    part of the main probes (train/core/metrics.py), both in one batch. Mean ablation replaces the
    head's z by its mean over the held-out part or the probe part at each position
    (train.core.circuits.mean_ablation_values). When the induction classification runs, the heads it
    labels both are also ablated together. Default cadence: every 10th checkpoint.

    Per-head results come head by head (all of one head's keys together), so they are returned
    under their row keys."""

    uses = (N.INDUCTION_HEADS,)
    requires = (LOGITS, Z, HELDOUT)

    def __init__(self, every: int = 10, kinds: Sequence[str] = ("zero", "mean"), n_heldout: int | None = 64,
                 icl_early: int | None = None, icl_late: int | None = None):
        super().__init__(every)
        self.kinds = list(kinds)
        for k in self.kinds:
            if k not in ("zero", "mean"):
                raise ValueError(f"unknown ablation kind {k!r}; use zero or mean")
        check("n_heldout", n_heldout, 1, integer=True, none=True)
        for name, value in dict(icl_early=icl_early, icl_late=icl_late).items():
            check(name, value, 0, integer=True, none=True)
        self.n_heldout, self.icl_early, self.icl_late = n_heldout, icl_early, icl_late

    def setup(self, ctx: RunContext) -> None:
        heldout = ctx.probes.heldout
        heldout = heldout if self.n_heldout is None else heldout[: self.n_heldout]
        self.early, self.late = M.icl_indices(heldout.shape[1], self.icl_early, self.icl_late)
        probe = ctx.probes.repeated
        self.n_text, self.probe_len, self.period = heldout.shape[0], probe.shape[1], ctx.probes.period
        self.tokens, _ = P.concat_padded([heldout, probe])

    def _rows(self, d_vocab: int) -> list[slice]:
        """Row chunks of the batch whose logits stay within LOGITS_BUDGET floats (one chunk for
        the project's models: 80 x 64 x 64; a 50k vocabulary at 512 positions takes several)."""
        n, length = self.tokens.shape
        per_chunk = max(1, LOGITS_BUDGET // (length * d_vocab))
        return [slice(i, min(i + per_chunk, n)) for i in range(0, n, per_chunk)]

    def _scores(self, losses: torch.Tensor) -> tuple[float, float]:
        """(ICL score on the held-out part, loss on the probes' repeated part) of the per-prediction
        losses [rows, pos - 1]."""
        text = losses[: self.n_text].mean(0)
        probe = losses[self.n_text :, : self.probe_len - 1]
        return float(M.icl_score(text, self.early, self.late)), float(M.repeated_part_loss(probe, self.period))

    def _ablated(self, model, chunks, heads, replacement) -> tuple[float, float]:
        """The scores with `heads` ablated (train/core/circuits.py ablated_logits), chunk by chunk."""
        losses = []
        for rows, cache in chunks:
            repl = None if replacement is None else [r[rows] for r in replacement]
            logits = C.ablated_logits(model, self.tokens[rows], heads, repl, cache)
            losses.append(next_token_loss(logits, self.tokens[rows], "none"))
        return self._scores(torch.cat(losses))

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        model = ctx.model
        chunks, clean, zs = [], [], []
        for rows in self._rows(model.d_vocab):
            logits, cache = model.run_with_cache(self.tokens[rows])
            clean.append(next_token_loss(logits, self.tokens[rows], "none"))
            chunks.append((rows, cache))
            zs.append(cache.z)
        clean_icl, clean_rep = self._scores(torch.cat(clean))
        z = zs[0] if len(zs) == 1 else [torch.cat(layer) for layer in zip(*zs)]
        means = C.mean_ablation_values(z, [self.n_text, self.tokens.shape[0] - self.n_text])
        both = (ctx.scores.get(N.INDUCTION_HEADS) or {}).get(N.BOTH_HEADS) or []
        joint = [N.parse_head_name(n) for n in both]
        out: dict[str, Any] = {N.part_key(N.ABLATION, N.ICL_SCORE): clean_icl,
                               N.part_key(N.ABLATION, N.REPEAT_LOSS): clean_rep}
        for kind in self.kinds:
            repl = means if kind == "mean" else None
            icl_key, rep_key, removed_key = N.ablated(N.ICL_SCORE, kind), N.ablated(N.REPEAT_LOSS, kind), N.icl_removed(kind)
            for l in range(model.n_layers):
                for h in range(model.n_heads):
                    icl, rep = self._ablated(model, chunks, [(l, h)], repl)
                    out[N.head_key(icl_key, l, h)] = icl
                    out[N.head_key(rep_key, l, h)] = rep
                    out[N.head_key(removed_key, l, h)] = M.icl_removed(clean_icl, icl)
            if joint:
                icl, rep = self._ablated(model, chunks, joint, repl)
                out[N.part_key(N.ABLATION, N.of_induction_heads(icl_key))] = icl
                out[N.part_key(N.ABLATION, N.of_induction_heads(rep_key))] = rep
                out[N.part_key(N.ABLATION, N.of_induction_heads(removed_key))] = M.icl_removed(clean_icl, icl)
        return out


# -- loss-landscape degeneracy -------------------------------------------------------------------
class LLCEstimate(Callback):
    """Local learning coefficient (train/core/llc.py: definition, default n_beta rule) by SGLD on a deep
    copy of the model, on the first `n_sequences` held-out sequences. Results under `llc`: mean and
    std over the chains that stayed finite, every chain's value (NaN where it diverged), how many
    diverged, and the settings used (`n_beta`: the value used, the default rule's when null).
    Default cadence: every 10th checkpoint. The default settings were chosen on the default run's
    checkpoints (analysis/llc_calibrate.py): no chain diverges, chains agree, about 20 s of 2-core
    CPU per call."""

    provides = (N.LLC,)
    requires = (PARAMETERS, HELDOUT)

    def __init__(self, every: int = 10, lr: float = 1e-3, n_beta: float | None = None,
                 localization: float = 30.0, num_chains: int = 4, num_draws: int = 160,
                 num_burnin_steps: int = 100, batch_size: int = 16, seed: int = 0, n_sequences: int = 64):
        from train.core.llc import check_settings

        super().__init__(every)
        self.settings = dict(lr=lr, n_beta=n_beta, localization=localization, num_chains=num_chains,
                             num_draws=num_draws, num_burnin_steps=num_burnin_steps, batch_size=batch_size,
                             seed=seed)
        check_settings(**{k: v for k, v in self.settings.items() if k != "seed"})
        for name in ("lr", "localization", "n_beta"):
            check(name, self.settings[name], none=name == "n_beta")
        check("n_sequences", n_sequences, 1, integer=True)
        self.n_sequences = n_sequences

    def setup(self, ctx: RunContext) -> None:
        self.tokens = ctx.probes.heldout[: self.n_sequences]
        if self.tokens.shape[0] < self.settings["batch_size"]:
            raise ConfigError(f"callbacks.{self.name}: batch_size={self.settings['batch_size']} needs at least as many "
                              f"held-out sequences, have {self.tokens.shape[0]} (n_sequences={self.n_sequences})")

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        from train.core.llc import estimate_llc

        r = estimate_llc(ctx.model, self.tokens, **self.settings)
        settings = self.settings | {"n_beta": r["n_beta"], "n_sequences": int(self.tokens.shape[0])}
        return {N.LLC: {"mean": r["mean"], "std": r["std"], "per_chain": r["per_chain"],
                        "diverged_chains": r["diverged_chains"], "settings": settings}}
