"""Callbacks: thin wrappers that schedule metrics (train/metrics.py) and return flat rows.

Each callback is built from config (`_target_`), gets `setup(ctx)` once (build what depends only
on the fixed probes, never per checkpoint), and `__call__(ctx)` at every `every`-th checkpoint,
returning a dict of flat keys (`prefix_matching/L1H3`, `icl_score`, ...) for metrics.jsonl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from train import circuits as C
from train import metrics as M
from train.data import Probes, repeated_random_tokens
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


# -- mechanistic circuit scores, induction-head classification, probe robustness, ablations -----
# These read the row built so far at this checkpoint (`ctx.row`, set by the loop before the
# callbacks run) to reuse scores the behavioral callbacks above already computed; without it
# (or without those callbacks) they compute what they need themselves.


def _row_so_far(ctx: RunContext) -> dict[str, Any]:
    row = getattr(ctx, "row", None)
    return row if isinstance(row, dict) else {}


def _head_table(row: dict[str, Any], name: str, n_layers: int, n_heads: int) -> torch.Tensor | None:
    keys = [f"{name}/L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    if not all(k in row for k in keys):
        return None
    return torch.tensor([float(row[k]) for k in keys]).view(n_layers, n_heads)


def _shape(ctx: RunContext) -> tuple[int, int]:
    return ctx.model.n_layers, ctx.model.n_heads


def _previous_token(ctx: RunContext, n_heldout: int = 64) -> torch.Tensor:
    """The previous-token scores of this checkpoint (as AttentionScores computes them)."""
    table = _head_table(_row_so_far(ctx), "previous_token", *_shape(ctx))
    if table is None:
        table = M.previous_token_score(M.attention_patterns(ctx.model, ctx.probes.heldout[:n_heldout]))
    return table.cpu()


def _prefix_matching(ctx: RunContext) -> torch.Tensor:
    table = _head_table(_row_so_far(ctx), "prefix_matching", *_shape(ctx))
    if table is None:
        tokens = ctx.probes.repeated
        table = M.prefix_matching_score(M.attention_patterns(ctx.model, tokens), tokens)
    return table.cpu()


def _copying(ctx: RunContext) -> torch.Tensor:
    table = _head_table(_row_so_far(ctx), "copying", *_shape(ctx))
    return (table if table is not None else M.copying_score(ctx.model, ctx.probes.copy_tokens)).cpu()


def composition_key(kind: str, later: tuple[int, int], earlier: tuple[int, int]) -> str:
    return f"{kind}_composition/{C.head_name(*later)}/{C.head_name(*earlier)}"


class CircuitScores(Callback):
    """Weight-based circuit scores (train/circuits.py): Q-, K-, V-composition for every
    (later head, earlier head) pair with the random baseline subtracted
    (`k_composition/L1H2/L0H3`), the baselines (`composition_baseline/k`), the OV copying
    eigen-score (`ov_copying/L{l}H{h}`) and, for layers >= 1, the QK prefix-matching trace
    weighted by previous-token scores (`qk_prefix_matching/L{l}H{h}`)."""

    def __init__(self, every: int = 1, fold_layernorm: bool = True, baseline_samples: int = 256,
                 baseline_seed: int = 0):
        super().__init__(every)
        self.fold_layernorm = fold_layernorm
        self.baseline_samples, self.baseline_seed = baseline_samples, baseline_seed

    def setup(self, ctx: RunContext) -> None:
        m = ctx.model
        self.baselines = {k: C.composition_baseline(k, m.d_model, m.d_head, self.baseline_samples, self.baseline_seed)
                          for k in C.COMPOSITIONS}

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        model = ctx.model
        row: dict[str, Any] = {f"composition_baseline/{k}": v for k, v in self.baselines.items()}
        comp = C.composition_scores(model, self.fold_layernorm, self.baseline_samples, self.baseline_seed)
        for kind, pairs in comp.items():
            for (l2, l1), table in pairs.items():
                for h2, values in enumerate(table.tolist()):
                    for h1, v in enumerate(values):
                        row[composition_key(kind, (l2, h2), (l1, h1))] = v
        row |= per_head("ov_copying", C.ov_eigen_score(model))
        qk = C.qk_prefix_matching_trace(model, _previous_token(ctx))  # NaN in layer 0: not logged
        row |= {k: v for k, v in per_head("qk_prefix_matching", qk).items() if v == v}
        return row


class ProbeRobustness(Callback):
    """Prefix matching on probe variants built once in setup: repeated random tokens with other
    periods and lengths (`variants`: [period, repeats] pairs; variants that do not fit the
    context are dropped) and repeated segments of held-out data (`heldout_segments`). Per head:
    each variant (`prefix_matching_p8x7/L1H2`, `prefix_matching_text_p10x6/L1H2`), the min and
    max over variants and the main probe (`prefix_matching_min/..`, `prefix_matching_max/..`), and
    `probe_fragile/L{l}H{h}` = 1 when the main-probe score is >= `min_main` but some variant
    falls below `fragile_ratio` x the main score."""

    def __init__(self, every: int = 1, variants: list | None = None, heldout_segments: list | None = None,
                 n_probes: int = 8, seed: int = 4321, fragile_ratio: float = 0.5, min_main: float = 0.3):
        super().__init__(every)
        self.variants = [tuple(v) for v in (variants if variants is not None else [[5, 4], [8, 7], [12, 2], [20, 3]])]
        self.heldout_segments = [tuple(v) for v in (heldout_segments if heldout_segments is not None else [[10, 6]])]
        self.n_probes, self.seed = n_probes, seed
        self.fragile_ratio, self.min_main = fragile_ratio, min_main

    def setup(self, ctx: RunContext) -> None:
        heldout = ctx.probes.heldout.cpu()
        n_ctx = min(heldout.shape[1], ctx.model.n_ctx)
        allowed = ctx.probes.allowed  # the main probe's token set
        g = torch.Generator().manual_seed(self.seed)
        sets: list[tuple[str, torch.Tensor]] = []
        for period, repeats in self.variants:
            if 1 + period * repeats <= n_ctx and period <= allowed.numel() and repeats >= 2:
                sets.append((f"p{period}x{repeats}", repeated_random_tokens(self.n_probes, period, repeats, allowed, g)))
        for period, repeats in self.heldout_segments:
            if 1 + period * repeats <= n_ctx and repeats >= 2:
                seg = heldout[-self.n_probes:, 1 : 1 + period]
                sets.append((f"text_p{period}x{repeats}", torch.cat([heldout[-self.n_probes:, :1], seg.repeat(1, repeats)], 1)))
        self.names = [name for name, _ in sets]
        # One batch for all variants: shorter ones are padded at the end, which (causal attention)
        # changes nothing before the padding; padded queries are left out of the masks.
        length = max((t.shape[1] for _, t in sets), default=0)
        tokens, masks, self.rows = [], [], []
        for _, t in sets:
            pad = length - t.shape[1]
            mask = M.prefix_matching_mask(t)
            tokens.append(torch.cat([t, torch.zeros(t.shape[0], pad, dtype=t.dtype)], 1))
            masks.append(F.pad(mask, (0, pad, 0, pad)))
            start = sum(r.stop - r.start for r in self.rows)
            self.rows.append(range(start, start + t.shape[0]))
        device = ctx.probes.repeated.device
        self.tokens = torch.cat(tokens).to(device) if tokens else None
        self.masks = torch.cat(masks).to(device) if masks else None

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        main = _prefix_matching(ctx)
        scores = {}
        if self.tokens is not None:
            patterns = M.attention_patterns(ctx.model, self.tokens)
            for name, rows in zip(self.names, self.rows):
                sl = slice(rows.start, rows.stop)
                scores[name] = M.masked_attention_score(patterns[:, sl], self.masks[sl]).cpu()
        row: dict[str, Any] = {}
        for name, table in scores.items():
            row |= per_head(f"prefix_matching_{name}", table)
        stacked = torch.stack([main, *scores.values()])
        low, high = stacked.min(0).values, stacked.max(0).values
        row |= per_head("prefix_matching_min", low) | per_head("prefix_matching_max", high)
        fragile = (main >= self.min_main) & (low < self.fragile_ratio * main)
        row |= {k: int(v) for k, v in per_head("probe_fragile", fragile.float()).items()}
        return row


class InductionClassification(Callback):
    """Behavioral vs mechanistic induction heads at every checkpoint (thresholds: see
    train.circuits.Thresholds, written into each row as `induction_thresholds/<name>`).

    Per head: `is_behavioral/L{l}H{h}`, `is_mechanistic/L{l}H{h}` (0/1) and
    `k_composition_prev_token/L{l}H{h}` (best baseline-subtracted K-composition with an
    earlier-layer previous-token head; absent when there is none). Counts
    `induction_heads/behavioral`, `/mechanistic`, `/both`, `/disagree`, and the lists
    `induction_heads/disagreeing` (names of heads labelled by one definition only),
    `induction_heads/both_heads` and `previous_token_heads`."""

    def __init__(self, every: int = 1, prefix_matching: float = 0.4, copying: float = 0.08,
                 previous_token: float = 0.2, k_composition: float = 0.03, ov_copying: float = 0.0,
                 qk_prefix_matching: float = 0.0, fold_layernorm: bool = True):
        super().__init__(every)
        self.thresholds = C.Thresholds(prefix_matching, copying, previous_token, k_composition, ov_copying,
                                       qk_prefix_matching)
        self.fold_layernorm = fold_layernorm

    def _circuits(self, ctx: RunContext, previous: torch.Tensor):
        model, row = ctx.model, _row_so_far(ctx)
        n_layers, n_heads = _shape(ctx)
        ov = _head_table(row, "ov_copying", n_layers, n_heads)
        keys = [f"qk_prefix_matching/L{l}H{h}" for l in range(1, n_layers) for h in range(n_heads)]
        kk = {(l2, l1): [[composition_key("k", (l2, h2), (l1, h1)) for h1 in range(n_heads)] for h2 in range(n_heads)]
              for l2 in range(1, n_layers) for l1 in range(l2)}
        if ov is None or not all(k in row for k in keys) or not all(k in row for t in kk.values() for r in t for k in r):
            comp = C.composition_scores(model, self.fold_layernorm)["k"]
            return comp, C.ov_eigen_score(model).cpu(), C.qk_prefix_matching_trace(model, previous)
        qk = torch.full((n_layers, n_heads), float("nan"))
        if n_layers > 1:
            qk[1:] = torch.tensor([float(row[k]) for k in keys]).view(n_layers - 1, n_heads)
        comp = {p: torch.tensor([[float(row[k]) for k in r] for r in t]) for p, t in kk.items()}
        return comp, ov, qk

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        previous = _previous_token(ctx)
        comp, ov, qk = self._circuits(ctx, previous)
        behavioral, mechanistic, k_prev = C.classify_heads(
            _prefix_matching(ctx), _copying(ctx), previous, comp, ov, qk, self.thresholds)
        row: dict[str, Any] = {f"induction_thresholds/{k}": v for k, v in vars(self.thresholds).items()}
        row |= {k: int(v) for k, v in per_head("is_behavioral", behavioral.float()).items()}
        row |= {k: int(v) for k, v in per_head("is_mechanistic", mechanistic.float()).items()}
        row |= {k: v for k, v in per_head("k_composition_prev_token", k_prev).items() if v == v}
        names = [[C.head_name(l, h) for h in range(behavioral.shape[1])] for l in range(behavioral.shape[0])]
        flat = [(names[l][h], bool(behavioral[l, h]), bool(mechanistic[l, h]))
                for l in range(behavioral.shape[0]) for h in range(behavioral.shape[1])]
        row["induction_heads/behavioral"] = int(behavioral.sum())
        row["induction_heads/mechanistic"] = int(mechanistic.sum())
        row["induction_heads/both"] = int((behavioral & mechanistic).sum())
        row["induction_heads/disagree"] = int((behavioral ^ mechanistic).sum())
        row["induction_heads/disagreeing"] = [n for n, b, m in flat if b != m]
        row["induction_heads/both_heads"] = [n for n, b, m in flat if b and m]
        row["previous_token_heads"] = [names[l][h] for l in range(previous.shape[0]) for h in range(previous.shape[1])
                                       if previous[l, h] >= self.thresholds.previous_token]
        return row


class HeadAblations(Callback):
    """Causal check: zero- and mean-ablate each head (through the model's z hooks) and measure
    the ICL score on the held-out set (same indices as HeldoutLoss) and the loss on the repeated
    part (repeats 2..R) of the main probes. Mean ablation replaces the head's z by its mean over
    the batch at each position. Keys per head and kind (zero | mean):
    `icl_score_{kind}_ablated/L{l}H{h}`, `repeat_loss_{kind}_ablated/L{l}H{h}`,
    `icl_removed_{kind}/L{l}H{h}` (share of the clean ICL score removed: 1 - ablated / clean),
    and the clean `ablation/icl_score`, `ablation/repeat_loss`. When the row already holds
    `induction_heads/both_heads`, those heads are also ablated together
    (`ablation/icl_score_{kind}_induction_heads`). Default cadence: every 10th checkpoint, on the
    first 64 held-out sequences (`n_heldout`; None: all)."""

    def __init__(self, every: int = 10, kinds: list[str] | None = None, n_heldout: int | None = 64,
                 icl_early: int | None = None, icl_late: int | None = None):
        super().__init__(every)
        self.kinds = list(kinds) if kinds is not None else ["zero", "mean"]
        for k in self.kinds:
            if k not in ("zero", "mean"):
                raise ValueError(f"unknown ablation kind {k!r}; use zero or mean")
        self.n_heldout, self.icl_early, self.icl_late = n_heldout, icl_early, icl_late

    def setup(self, ctx: RunContext) -> None:
        heldout = ctx.probes.heldout
        heldout = heldout if self.n_heldout is None else heldout[: self.n_heldout]
        self.early, self.late = M.icl_indices(heldout.shape[1], self.icl_early, self.icl_late)
        probe = ctx.probes.repeated
        self.n_text, self.probe_len = heldout.shape[0], probe.shape[1]
        self.repeat_from = ctx.probes.period  # predictions at i >= period target repeats 2..R
        # Held-out text and probes in one batch (probes padded at the end: causal, so harmless).
        length = max(heldout.shape[1], probe.shape[1])
        pad = lambda t: F.pad(t, (0, length - t.shape[1]))  # noqa: E731
        self.tokens = torch.cat([pad(heldout), pad(probe)])

    def _losses(self, logits: torch.Tensor) -> tuple[float, float]:
        """(ICL score on the held-out part, loss on the probes' repeated part)."""
        losses = M.token_losses(logits, self.tokens)
        text = losses[: self.n_text].mean(0)
        probe = losses[self.n_text :, self.repeat_from : self.probe_len - 1].mean()
        return float(text[self.late] - text[self.early]), float(probe)

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        model = ctx.model
        logits, resid, zs = C.residual_inputs(model, self.tokens)
        clean_icl, clean_rep = self._losses(logits)
        # Mean ablation: the head's mean z over the batch at each position, taken separately over
        # the held-out part and the probe part.
        means = [torch.cat([z[: self.n_text].mean(0, keepdim=True).expand(self.n_text, -1, -1, -1),
                            z[self.n_text :].mean(0, keepdim=True).expand(z.shape[0] - self.n_text, -1, -1, -1)])
                 for z in zs]
        row: dict[str, Any] = {"ablation/icl_score": clean_icl, "ablation/repeat_loss": clean_rep}
        both = _row_so_far(ctx).get("induction_heads/both_heads") or []
        joint = [(int(n[1 : n.index("H")]), int(n[n.index("H") + 1 :])) for n in both]
        for kind in self.kinds:
            repl = means if kind == "mean" else None
            for l in range(model.n_layers):
                for h in range(model.n_heads):
                    icl, rep = self._losses(C.ablated_logits(model, self.tokens, [(l, h)], repl, resid))
                    name = C.head_name(l, h)
                    row[f"icl_score_{kind}_ablated/{name}"] = icl
                    row[f"repeat_loss_{kind}_ablated/{name}"] = rep
                    row[f"icl_removed_{kind}/{name}"] = 1.0 - icl / clean_icl if clean_icl != 0 else 0.0
            if joint:
                icl, rep = self._losses(C.ablated_logits(model, self.tokens, joint, repl, resid))
                row[f"ablation/icl_score_{kind}_induction_heads"] = icl
                row[f"ablation/repeat_loss_{kind}_induction_heads"] = rep
                row[f"ablation/icl_removed_{kind}_induction_heads"] = 1.0 - icl / clean_icl if clean_icl != 0 else 0.0
        return row
