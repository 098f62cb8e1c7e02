"""The out-of-distribution suite (callback `ood`, conf/callbacks/with_definitions.yaml): named probe
sets that training never shows, and on each, per head, the prefix-matching score and the change
of the loss of the set's scored predictions when the head is ablated (zero and mean): the ground
truth of "this head matters out of distribution" against which analysis/definitions.py tests the
induction-head definitions. Exact definitions: docs/METRICS.md, section 15.

The sets (`SETS`), each `n_probes` sequences of the probes' length (the context), seeded per set:

    short         random distinct tokens tiled with period min_period - 1 (below the training range)
    long          ... with the longest period that repeats at least twice (above max_period)
    fuzzy         the main probe's period, a share `fuzz` of the repeated tokens substituted
    reserved      the main probe's period, half the segment tokens that training kept out of every
                  repeated segment (data.reserved_tokens); scored on those tokens only
    text          spans of held-out training-distribution sequences, tiled (runs whose repeats are
                  not their own text: the embedded language, other models)
    random        random tokens tiled (runs trained with the repetition knob, whose repeats are text)
    conflict      blocks [A][B][A][C][A][C]: scored on the prediction after the third [A]
    long_context  the main probe's period tiled over `context_factor` x the trained context, scored
                  beyond it (rotary positions only: learned positions have no rows there)

A set that does not apply (its period does not fit, no reserved tokens, no held-out text, no
rotary positions) is left out, with one note in ctx.notes."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from train.core import circuits as C
from train.core import metrics as M
from train.core import names as N
from train.core import probes as P
from train.core.adapter import LOGITS, PATTERNS, RUN_FROM, Z
from train.core.callbacks import LOGITS_BUDGET
from train.core.language import generator
from train.core.model import AttnOnlyTransformer, Rotary, next_token_loss
from train.core.scoring import Callback, RunContext

SETS = ("short", "long", "fuzzy", "reserved", "text", "random", "conflict", "long_context")
MIN_COPY_ATTENTION = 0.1  # ood_conflict_recent: least mean attention on the two copies' continuations


@dataclass
class OODSet:
    """One probe set: tokens [n, length]; `queries` [n, length] bool, the query positions of its
    prefix-matching score; `targets` [n, length - 1] bool, the predictions its loss averages;
    conflict only: `recent`, `first` [n, length, length] bool, the keys right after the most
    recent and the first earlier copy of each query in the third [A], and `alternatives`
    [n, length - 1], a second correct token of a prediction (-1: none), whose probability the
    prediction's loss adds: -ln(p(next token) + p(alternative))."""

    name: str
    tokens: torch.Tensor
    queries: torch.Tensor
    targets: torch.Tensor
    recent: torch.Tensor | None = None
    first: torch.Tensor | None = None
    alternatives: torch.Tensor | None = None


@dataclass
class Spec:
    """What the sets are built from: the probes, the sets' length and rows per set, the training
    range of periods, the fuzzy share and the conflict span."""

    probes: P.Probes
    length: int
    n: int
    min_period: int
    max_period: int
    fuzz: float
    conflict_span: int


def _tiled_set(name: str, tokens: torch.Tensor) -> OODSet:
    return OODSet(name, tokens, torch.ones_like(tokens, dtype=torch.bool), P.induction_targets(tokens))


def _random(spec: Spec, period: int, g) -> torch.Tensor:
    """BOS + `period` distinct allowed tokens tiled to the sets' length, `spec.n` rows."""
    return P.tiled(P.distinct_draws(spec.n, period, spec.probes.allowed, g), spec.length, spec.probes.bos)


def _short(spec: Spec, g) -> OODSet | str:
    p = spec.min_period - 1
    return _tiled_set("short", _random(spec, p, g)) if p >= 2 else f"period {p} is below 2"


def _long(spec: Spec, g) -> OODSet | str:
    p = min((spec.length - 1) // 2, spec.probes.allowed.numel())
    if p <= spec.max_period:
        return f"no period above {spec.max_period} repeats twice in {spec.length} tokens"
    return _tiled_set("long", _random(spec, p, g))


def _fuzzy(spec: Spec, g) -> OODSet:
    period = spec.probes.period
    tokens, _ = P.substitute(_random(spec, period, g), 1 + period, spec.fuzz, spec.probes.allowed, g)
    return _tiled_set("fuzzy", tokens)


def _reserved(spec: Spec, g) -> OODSet | str:
    """Segments of the main period's distinct tokens, min(#reserved, ceil(period / 2)) of them
    reserved, in random order; queries and targets restricted to the reserved tokens."""
    reserved, period, allowed = spec.probes.reserved, spec.probes.period, spec.probes.allowed
    if reserved is None or reserved.numel() == 0:
        return "no reserved tokens (data.reserved_tokens=0)"
    r = min(reserved.numel(), -(-period // 2))
    segs = torch.cat([P.distinct_draws(spec.n, r, reserved, g), P.distinct_draws(spec.n, period - r, allowed, g)], 1)
    segs = torch.stack([row[torch.randperm(period, generator=g)] for row in segs])
    tokens = P.tiled(segs, spec.length, spec.probes.bos)
    is_reserved = torch.isin(tokens, reserved)
    return OODSet("reserved", tokens, is_reserved, P.induction_targets(tokens) & is_reserved[:, 1:])


def _text(spec: Spec, g) -> OODSet | str:
    """Per held-out sequence that is not itself a repeat (no period <= max_period) its first span of
    `period` tokens without a reserved token, the last `n` of them, tiled."""
    heldout, period = spec.probes.heldout, spec.probes.period
    if heldout is None or spec.probes.heldout_mixture is not None:
        return "no held-out text" if heldout is None else "training repeats its own text (the run gets `random`)"
    rows = heldout.cpu()[:, 1:]
    periodic = torch.stack([(rows[:, p:] == rows[:, :-p]).all(1) for p in range(1, spec.max_period + 1)
                            if p < rows.shape[1]]).any(0)
    clean = ~torch.isin(rows, spec.probes.reserved) if spec.probes.reserved is not None else torch.ones_like(rows, dtype=torch.bool)
    windows = clean.float().unfold(1, period, 1).all(-1) & ~periodic[:, None]  # [rows, starts]
    starts = [(i, int(w.nonzero()[0])) for i, w in enumerate(windows) if w.any()][-spec.n :]
    if not starts:
        return f"no held-out text holds {period} tokens in a row outside repeats and reserved tokens"
    spans = torch.stack([rows[i, j : j + period] for i, j in starts])
    return _tiled_set("text", P.tiled(spans, spec.length, spec.probes.bos))


def _random_set(spec: Spec, g) -> OODSet | str:
    if spec.probes.heldout is not None and spec.probes.heldout_mixture is None:
        return "training does not repeat its own text (the run gets `text`)"
    return _tiled_set("random", _random(spec, spec.probes.period, g))


def _conflict(spec: Spec, g) -> OODSet | str:
    """Blocks [A][B][A][C][A][C] of `conflict_span` tokens each (3 x span distinct tokens a
    block, distinct across the row), as many as fit, then BOS padding; scored on the prediction at
    the last token of each third [A], where both copies' continuations (B's and C's first tokens)
    count as correct."""
    span, length, n = spec.conflict_span, spec.length, spec.n
    blocks = min((length - 1) // (6 * span), spec.probes.allowed.numel() // (3 * span))
    if blocks < 1:
        return f"no block of 6 x {span} tokens fits"
    a, b, c = P.distinct_draws(n, 3 * span * blocks, spec.probes.allowed, g).view(n, blocks, 3, span).unbind(2)
    body = torch.cat([a, b, a, c, a, c], dim=2).reshape(n, -1)
    tokens = torch.full((n, length), spec.probes.bos, dtype=torch.long)
    tokens[:, 1 : 1 + body.shape[1]] = body
    queries, targets = torch.zeros_like(tokens, dtype=torch.bool), torch.zeros(n, length - 1, dtype=torch.bool)
    recent, first = (torch.zeros(n, length, length, dtype=torch.bool) for _ in range(2))
    alternatives = torch.full((n, length - 1), -1, dtype=torch.long)
    queries[:, 1 : 1 + body.shape[1]] = True
    for k in range(blocks):
        third = 1 + 6 * span * k + 4 * span  # the first position of the third [A]
        targets[:, third + span - 1] = True
        alternatives[:, third + span - 1] = b[:, k, 0]
        for q in range(third, third + span):
            recent[:, q, q - 2 * span + 1] = True
            first[:, q, q - 4 * span + 1] = True
    return OODSet("conflict", tokens, queries, targets, recent, first, alternatives)


BUILDERS = {"short": _short, "long": _long, "fuzzy": _fuzzy, "reserved": _reserved, "text": _text,
            "random": _random_set, "conflict": _conflict}


def build_sets(spec: Spec, names: Sequence[str], seed: int) -> tuple[list[OODSet], dict[str, str]]:
    """The sets of `names` (long_context aside) that apply, and {set: why not} for the others.
    Set i of SETS draws from generator(seed, i), whichever others are built."""
    built, skipped = [], {}
    for name in names:
        s = BUILDERS[name](spec, generator(seed, SETS.index(name)))
        if isinstance(s, str):
            skipped[name] = s
        else:
            built.append(s)
    return built, skipped


def long_context_set(probes: P.Probes, n: int, n_ctx: int, factor: int, seed: int) -> OODSet:
    """The main probe's period tiled over factor x n_ctx tokens; queries at positions >= n_ctx and
    targets the predictions of the tokens there."""
    g = generator(seed, SETS.index("long_context"))
    tokens = P.tiled(P.distinct_draws(n, probes.period, probes.allowed, g), factor * n_ctx, probes.bos)
    beyond = torch.arange(factor * n_ctx) >= n_ctx
    return OODSet("long_context", tokens, beyond.expand_as(tokens).clone(), P.induction_targets(tokens) & beyond[1:])


def longer_context_model(model, factor: int, rotary_base: float):
    """A copy of the project's model with rotary positions that runs `factor` x its context (same
    weights, rotary angles for the new positions); None for any other model, or when `rotary_base`
    does not give the model's own angles."""
    if not isinstance(model, AttnOnlyTransformer) or model.rotary is None:
        return None
    longer = copy.deepcopy(model)
    longer.rotary = Rotary(model.d_head, factor * model.n_ctx, rotary_base).to(model.rotary.cos.device)
    longer.n_ctx = factor * model.n_ctx
    return longer if torch.allclose(longer.rotary.cos[: model.n_ctx], model.rotary.cos, atol=1e-6) else None


# -- scoring ----------------------------------------------------------------------------------
class Batch:
    """Sets of one length as one batch: tokens [rows, length], each row's set, the prefix-matching
    masks [rows, q, k] (restricted to each set's queries), the targets [rows, length - 1] and, with
    the conflict set, its `recent` and `first` key masks (False on the other rows)."""

    def __init__(self, sets: list[OODSet], device):
        self.names = [s.name for s in sets]
        self.tokens = torch.cat([s.tokens for s in sets]).to(device)
        self.set_of_row = torch.cat([torch.full((len(s.tokens),), i) for i, s in enumerate(sets)]).to(device)
        self.sizes = torch.tensor([float(len(s.tokens)) for s in sets], device=device)
        self.prefix = torch.cat([M.prefix_matching_mask(s.tokens) & s.queries[:, :, None] for s in sets]).to(device)
        self.targets = torch.cat([s.targets for s in sets]).to(device)
        self.alternatives = None
        if any(s.alternatives is not None for s in sets):
            self.alternatives = torch.cat([s.alternatives if s.alternatives is not None else
                                           torch.full(s.targets.shape, -1) for s in sets]).to(device)
        self.recent = self.first = self.conflict_rows = None
        for i, s in enumerate(sets):
            if s.recent is not None:
                start = sum(len(t.tokens) for t in sets[:i])
                self.conflict_rows = slice(start, start + len(s.tokens))
                self.recent, self.first = s.recent.float().to(device), s.first.float().to(device)

    def per_set(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        """Sums over each set's rows: values [rows of the chunk, ...] -> [n_sets, ...] (float32)."""
        out = torch.zeros(len(self.names), *values.shape[1:], device=values.device)
        return out.index_add_(0, self.set_of_row[rows], values.float())

    def target_sums(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """[n_sets]: the sums of the targets' losses in the chunk `rows`."""
        losses = next_token_loss(logits, self.tokens[rows], "none")
        alt = self.alternatives[rows] if self.alternatives is not None else None
        if alt is not None and (alt >= 0).any():  # -ln(p(next) + p(alternative))
            logp = logits[:, :-1].float().log_softmax(-1)
            both = torch.logaddexp(logp.gather(-1, self.tokens[rows, 1:, None]), logp.gather(-1, alt.clamp(min=0)[..., None]))
            losses = torch.where(alt >= 0, -both.squeeze(-1), losses)
        return self.per_set((losses * self.targets[rows]).sum(1), rows)

    def chunks(self, model) -> list[slice]:
        """Row chunks whose logits and attention patterns stay within LOGITS_BUDGET floats."""
        n, length = self.tokens.shape
        per_row = max(length * model.d_vocab, model.n_layers * model.n_heads * length * length)
        size = max(1, LOGITS_BUDGET // per_row)
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def score(model, batch: Batch, kinds: Sequence[str]) -> dict[str, Any]:
    """The results of the sets in `batch` (keys: train/core/names.py; definitions: docs/METRICS.md)."""
    chunks, caches = batch.chunks(model), []
    counts = batch.per_set(batch.targets.sum(1), slice(None))
    n_queries = batch.per_set(batch.prefix.any(-1).sum(-1), slice(None))
    clean, mass, recent, first, z_sums = 0, 0, 0, 0, None
    for rows in chunks:
        logits, cache = model.run_with_cache(batch.tokens[rows], return_patterns=True)
        clean = clean + batch.target_sums(logits, rows)
        patterns = torch.stack(cache.patterns).float()  # [layer, row, head, q, k]
        mass = mass + batch.per_set(torch.einsum("lbhqk,bqk->blh", patterns, batch.prefix[rows].float()), rows)
        if batch.recent is not None:  # the conflict set's rows in this chunk
            lo, hi = max(rows.start, batch.conflict_rows.start), min(rows.stop, batch.conflict_rows.stop)
            if lo < hi:
                mine, theirs = slice(lo - rows.start, hi - rows.start), slice(lo - batch.conflict_rows.start,
                                                                             hi - batch.conflict_rows.start)
                recent = recent + torch.einsum("lbhqk,bqk->lh", patterns[:, mine], batch.recent[theirs])
                first = first + torch.einsum("lbhqk,bqk->lh", patterns[:, mine], batch.first[theirs])
        sums = [batch.per_set(z, rows) for z in cache.z]
        z_sums = sums if z_sums is None else [a + b for a, b in zip(z_sums, sums)]
        cache.patterns = None
        caches.append(cache if RUN_FROM in model.capabilities else None)
    means = [(s / batch.sizes[:, None, None, None]).to(cache.z[0].dtype) for s in z_sums]
    clean = clean / counts
    pm = mass / n_queries[:, None, None]
    out: dict[str, Any] = {N.OOD_LOSS: {name: float(clean[i]) for i, name in enumerate(batch.names)}}
    out |= {N.ood_prefix_matching(name): pm[i].cpu() for i, name in enumerate(batch.names)}
    if batch.recent is not None:  # written where the head puts >= MIN_COPY_ATTENTION on the two continuations
        both, n_conflict = recent + first, batch.recent.any(-1).sum()
        out[N.OOD_CONFLICT_RECENT] = torch.where(both >= MIN_COPY_ATTENTION * n_conflict, recent / both, torch.nan).cpu()
    for kind in kinds:
        effect = torch.zeros(len(batch.names), model.n_layers, model.n_heads)
        for l in range(model.n_layers):
            for h in range(model.n_heads):
                total = 0
                for rows, cache in zip(chunks, caches):
                    repl = None if kind == "zero" else {l: means[l][batch.set_of_row[rows]]}
                    total = total + batch.target_sums(C.ablated_logits(model, batch.tokens[rows], [(l, h)], repl, cache), rows)
                effect[:, l, h] = (total / counts - clean).cpu()
        out |= {N.ood_ablation(kind, name): effect[i] for i, name in enumerate(batch.names)}
    return out


class OODSuite(Callback):
    """The out-of-distribution suite (module docstring; docs/METRICS.md section 15): per set,
    `ood_loss/{set}`, and per head `ood_prefix_matching_{set}`, `ood_ablation_{kind}_{set}` (the
    ablated minus the clean loss of the set's targets) and, on the conflict set,
    `ood_conflict_recent`. `min_period`, `max_period`: the training range of repeat periods.
    Default cadence: every 10th checkpoint, as the head ablations."""

    provides = (N.OOD_LOSS,)
    requires = (LOGITS, PATTERNS, Z, P.ALLOWED)

    def __init__(self, every: int = 10, sets: Sequence[str] = SETS, kinds: Sequence[str] = ("zero", "mean"),
                 n_probes: int = 16, seed: int = 2718, min_period: int = 4, max_period: int = 20, fuzz: float = 0.25,
                 conflict_span: int = 2, context_factor: int = 2, rotary_base: float = 10000.0):
        super().__init__(every)
        self.sets, self.kinds = list(sets), list(kinds)
        unknown = [s for s in self.sets if s not in SETS] + [k for k in self.kinds if k not in ("zero", "mean")]
        if unknown:
            raise ValueError(f"unknown OOD set or ablation kind {', '.join(map(repr, unknown))}; sets: "
                             f"{', '.join(SETS)}; kinds: zero, mean")
        if not (0 < fuzz < 1 and n_probes >= 1 and conflict_span >= 1 and context_factor >= 2):
            raise ValueError("OOD suite: need 0 < fuzz < 1, n_probes >= 1, conflict_span >= 1, context_factor >= 2")
        self.n_probes, self.seed, self.min_period, self.max_period = n_probes, seed, min_period, max_period
        self.fuzz, self.conflict_span, self.context_factor, self.rotary_base = fuzz, conflict_span, context_factor, rotary_base

    def setup(self, ctx: RunContext) -> None:
        probes, model = ctx.probes, ctx.model
        length = min(model.n_ctx, (probes.heldout if probes.heldout is not None else probes.repeated).shape[1])
        spec = Spec(probes, length, self.n_probes, self.min_period, self.max_period, self.fuzz, self.conflict_span)
        sets, skipped = build_sets(spec, [s for s in self.sets if s != "long_context"], self.seed)
        device = probes.repeated.device
        self.batches = [Batch(sets, device)] if sets else []
        self.long_batch = None
        if "long_context" in self.sets:
            if longer_context_model(model, self.context_factor, self.rotary_base) is None:
                skipped["long_context"] = "only the project's models with rotary positions run a longer context"
            else:
                long_set = long_context_set(probes, self.n_probes, model.n_ctx, self.context_factor, self.seed)
                self.long_batch = Batch([long_set], device)
        if skipped:
            ctx.notes.append(f"callbacks.{self.name}: left out the OOD sets "
                             + "; ".join(f"{name} ({why})" for name, why in skipped.items()))

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        out: dict[str, Any] = {N.OOD_LOSS: {}}
        runs = [(ctx.model, b) for b in self.batches]
        if self.long_batch is not None:
            runs.append((longer_context_model(ctx.model, self.context_factor, self.rotary_base), self.long_batch))
        for model, batch in runs:
            results = score(model, batch, self.kinds)
            out[N.OOD_LOSS] |= results.pop(N.OOD_LOSS)
            out |= results
        return out
