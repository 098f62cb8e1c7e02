"""Causal scores per head on the induction probes: activation patching, path patching, their
attribution-patching estimates, and the causal induction-head label (definitions, thresholds and
measured values: docs/METRICS.md, section 14).

Clean run: the main probes (train/core/probes.py Probes.repeated: BOS + a segment of `period`
distinct tokens tiled `repeats` times). Corrupted run: `corrupted_probe`, the same shape with every
segment drawn afresh, so that no earlier occurrence predicts anything (the first segment is
re-drawn too: kept, the keys after its tokens would carry the clean previous tokens on both runs
and K-path patching could not move the attention of any later repeat). Per head (l, h), layer l2's
head h2 and earlier head (l1, h1), with `resid` the stream entering layer l2 on the clean run and
z* the corrupted run's z:

* repeated-token loss: the mean loss of the predictions of repeats 2..R (metrics.repeated_part_loss);
* activation_patching: the repeated-token loss with head (l, h)'s z replaced by z*, minus the clean
  loss (positive: the loss rises without the head's clean output);
* path patching, input c in q, k, v: head h2 reads, on its input c only, resid + (z*_h1 - z_h1) W_O[h1]
  (the direct path from h1; every other input and head of layer l2 reads the clean stream; the
  layers after l2 run as usual on h2's changed output). path_patching_attention_c: the drop (clean -
  patched) in h2's prefix-matching attention on the clean probe (c = q, k: values do not enter the
  pattern, so c = v is 0 by construction and not logged); path_patching_logit_c: the drop in the
  correct-token logit averaged over the predictions of repeats 2..R (c = q, k, v);
* causal_k_share of (l2, h2): the drop in its prefix-matching attention with the K input patched
  from every previous-token head of the layers before l2 at once (previous_token >= the
  `previous_token` setting), divided by the clean prefix-matching attention (0 when there is no
  such head; undefined in layer 0);
* attribution patching: the first-order estimate of each (the gradient of the measure on the
  clean run with respect to the patched activation: z, or h2's own q/k/v input, dotted with the
  corrupted - clean difference), and attribution_agreement: the Spearman rank correlation of the
  estimates with the exact values over the heads (activation) or over the pairs (path_q, path_k:
  attention; path_logit_q/k/v);
* is_causal: layer >= 1, causal_k_share >= k_share and activation_patching >= min_effect.

Models without separate query/key/value inputs or running from a layer (Hugging Face adapters,
train/core/adapter.py) get the activation patching and its estimate only, with one note."""
from __future__ import annotations

from typing import Any, Callable

import torch

from train.core import metrics as M
from train.core import names as N
from train.core.adapter import LOGITS, QKV_INPUTS, RUN_FROM, WEIGHTS, Z
from train.core.model import ActivationCache, next_token_loss
from train.core.probes import ALLOWED, Probes, repeated_random_tokens
from train.core.scoring import Callback, RunContext

LOGITS_BUDGET = 1 << 26  # floats of logits one patched forward pass may hold (256 MB)
RANK_DECIMALS = 4  # relative decimals kept before ranking (spearman)
PATH_INPUTS = {"attention": "qk", "logit": "qkv"}  # the inputs patched for each path measure


def corrupted_probe(probes: Probes, seed: int) -> torch.Tensor:
    """The corrupted probe [n, 1 + period * repeats] (CPU): BOS, then `repeats` segments of
    `period` distinct tokens of probes.allowed, each drawn independently (torch.Generator seeded
    `seed`)."""
    g = torch.Generator().manual_seed(seed)
    n = probes.repeated.shape[0]
    segments = [repeated_random_tokens(n, probes.period, 1, probes.allowed, g, probes.bos)[:, 1:]
                for _ in range(probes.repeats)]
    return torch.cat([probes.repeated[:, :1].cpu(), *segments], dim=1)


# -- measures, per block of rows ------------------------------------------------------------------
def repeat_losses(logits: torch.Tensor, tokens: torch.Tensor, period: int, blocks: int) -> torch.Tensor:
    """The repeated-token loss of each of `blocks` consecutive equal blocks of rows: [blocks]."""
    return next_token_loss(logits, tokens, "none")[:, period:].reshape(blocks, -1).mean(1)


def correct_logits(logits: torch.Tensor, tokens: torch.Tensor, period: int, blocks: int) -> torch.Tensor:
    """The logit of the correct next token, averaged over the predictions of repeats 2..R, of each
    of `blocks` consecutive equal blocks of rows: [blocks]."""
    got = logits[:, period:-1].gather(-1, tokens[:, period + 1:, None]).squeeze(-1)
    return got.float().reshape(blocks, -1).mean(1)


def _in_chunks(fn: Callable[[range], torch.Tensor], n_blocks: int, rows: int, length: int, d_vocab: int):
    """fn(blocks) -> [len(blocks)] over chunks of blocks of `rows` rows whose logits stay within
    LOGITS_BUDGET floats."""
    per = max(1, LOGITS_BUDGET // (rows * length * d_vocab))
    return torch.cat([fn(range(i, min(i + per, n_blocks))) for i in range(0, n_blocks, per)])


def _head_out(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's direct contribution z W_O[h] to the stream: [batch, n_heads, pos, d_model]."""
    return torch.einsum("bhpe,hed->bhpd", z, model.blocks[layer].attn.W_O)


def _replace(z: torch.Tensor, n: int, pairs: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """z [n, heads, pos, e] tiled over len(pairs) blocks; block i gets pairs[i] = (head, z_head [n, pos, e])."""
    z = z.repeat(len(pairs), 1, 1, 1)
    for i, (head, value) in enumerate(pairs):
        z[i * n:(i + 1) * n, head] = value
    return z


# -- activation patching ----------------------------------------------------------------------------
def activation_patching(model, tokens: torch.Tensor, clean: ActivationCache, corrupted_z: list[torch.Tensor],
                        period: int, clean_loss: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads]: the repeated-token loss with each head's z replaced by `corrupted_z`,
    minus `clean_loss`. All heads of a layer in one batch; from the layer on when the model runs
    from a layer, else the full forward pass with the z hook (the same numbers)."""
    n, length = tokens.shape
    from_layer = RUN_FROM in model.capabilities
    effects = []
    for layer in range(model.n_layers):
        def block(heads: range, layer=layer) -> torch.Tensor:
            pairs = [(h, corrupted_z[layer][:, h]) for h in heads]
            if from_layer:
                z = _replace(clean.z[layer], n, pairs)
                logits = model.run_from(layer, clean.resid_pre[layer].repeat(len(heads), 1, 1), z=z).logits
            else:
                logits = model(tokens.repeat(len(heads), 1),
                               z_hook=lambda l, z: _replace(z[:n], n, pairs) if l == layer else z).logits
            return repeat_losses(logits, tokens.repeat(len(heads), 1), period, len(heads))
        effects.append(_in_chunks(block, model.n_heads, n, length, model.d_vocab))
    return torch.stack(effects) - clean_loss


def attribution_activation_patching(model, tokens: torch.Tensor, corrupted_z: list[torch.Tensor],
                                    period: int) -> torch.Tensor:
    """[n_layers, n_heads]: <d loss / d z_h, z*_h - z_h> of the repeated-token loss on the clean run."""
    zs: list[torch.Tensor] = []

    def hook(layer: int, z: torch.Tensor) -> torch.Tensor:
        # a new tensor in the graph (an adapter's hook replaces its input only by a new one)
        z = z.view_as(z) if z.requires_grad else z.detach().requires_grad_(True)
        zs.append(z)
        return z

    with torch.enable_grad():
        logits = model(tokens, z_hook=hook).logits
        loss = repeat_losses(logits, tokens, period, 1).sum()
        grads = torch.autograd.grad(loss, zs)
    return torch.stack([(g * (zc - z.detach())).sum((0, 2, 3)) for g, z, zc in zip(grads, zs, corrupted_z)])


# -- path patching ----------------------------------------------------------------------------------
def _senders(model, l2: int, clean: ActivationCache, corrupted: ActivationCache) -> torch.Tensor:
    """(corrupted - clean) direct contribution of every head of the layers before l2, layer-major:
    [l2 * n_heads, batch, pos, d_model]."""
    return torch.cat([_head_out(model, l1, corrupted.z[l1] - clean.z[l1]).transpose(0, 1) for l1 in range(l2)])


def _by_layer(table: torch.Tensor, l2: int, n_heads: int) -> dict[tuple[int, int], torch.Tensor]:
    """[senders (layer-major), h2] -> {(l2, l1): [h2, h1]}."""
    return {(l2, l1): table[l1 * n_heads:(l1 + 1) * n_heads].T for l1 in range(l2)}


def logits_after(model, layer: int, x: torch.Tensor, tokens: torch.Tensor, period: int, blocks: int) -> torch.Tensor:
    """`correct_logits` of the stream x [rows, pos, d_model] entering layer `layer` (n_layers: the
    final stream, whose correct-token logits alone are computed)."""
    if layer < model.n_layers:
        return correct_logits(model.run_from(layer, x).logits, tokens, period, blocks)
    targets = tokens[:, period + 1:]
    got = (model.ln_final(x[:, period:-1]) * model.W_U.T[targets]).sum(-1) + model.b_U[targets]
    return got.float().reshape(blocks, -1).mean(1)


def path_patching(model, tokens: torch.Tensor, clean: ActivationCache, corrupted: ActivationCache, period: int,
                  mask: torch.Tensor, previous: torch.Tensor):
    """Exact path patching: ({(measure, input): {(l2, l1): drops [h2, h1]}}, causal_k_share
    [n_layers, n_heads]). `mask`: the clean probe's prefix-matching mask; `previous`: bool
    [n_layers, n_heads], the previous-token heads. Per later layer one batch of its inputs: clean,
    then each sender on q, on k (and all previous-token heads together), on v."""
    n, length = tokens.shape
    n_heads = model.n_heads
    drops: dict[tuple[str, str], dict] = {(m, c): {} for m, inputs in PATH_INPUTS.items() for c in inputs}
    share = torch.full((model.n_layers, n_heads), float("nan"), device=tokens.device)
    for l2 in range(1, model.n_layers):
        x = clean.resid_pre[l2]
        delta = _senders(model, l2, clean, corrupted)
        joint = (delta * previous[:l2].flatten().to(delta.dtype)[:, None, None, None]).sum(0, keepdim=True)
        s, zero = len(delta), torch.zeros_like(x)[None]
        patched = {"q": delta, "k": torch.cat([delta, joint]), "v": delta}  # the blocks that patch each input
        inputs = {c: x[None] + torch.cat([zero, *(d if c == i else torch.zeros_like(d) for i, d in patched.items())])
                  for c in "qkv"}
        z, pattern = model.run_layer_split(l2, *(inputs[c].flatten(0, 1) for c in "qkv"))
        blocks = len(inputs["q"])  # clean, q: s, k: s + 1, v: s
        prefix = M.masked_attention_score(pattern.view(blocks, n, n_heads, length, length), mask)  # [blocks, h2]
        drop = prefix[:1] - prefix
        drops[("attention", "q")] |= _by_layer(drop[1:1 + s], l2, n_heads)
        drops[("attention", "k")] |= _by_layer(drop[1 + s:1 + 2 * s], l2, n_heads)
        share[l2] = drop[1 + 2 * s] / prefix[0].clamp(min=1e-6)
        # each block's change of each head's output alone, on the stream leaving layer l2 [blocks, h2, n, pos, d]
        z = z.view(blocks, n, *z.shape[1:])
        change = torch.einsum("kbhpe,hed->khbpd", z - z[:1], model.blocks[l2].attn.W_O).flatten(0, 1)
        after = x + model.blocks[l2].attn.output(clean.z[l2])

        def block(chunk: range) -> torch.Tensor:
            rows = (after + change[chunk.start:chunk.stop]).flatten(0, 1)
            return logits_after(model, l2 + 1, rows, tokens.repeat(len(chunk), 1), period, len(chunk))

        logit = _in_chunks(block, blocks * n_heads, n, length, model.d_vocab).view(blocks, n_heads)
        logit = logit[:1] - logit
        for c, rows in (("q", slice(1, 1 + s)), ("k", slice(1 + s, 1 + 2 * s)), ("v", slice(2 + 2 * s, 2 + 3 * s))):
            drops[("logit", c)] |= _by_layer(logit[rows], l2, n_heads)
    return drops, share


def attribution_path_patching(model, tokens: torch.Tensor, clean: ActivationCache, corrupted: ActivationCache,
                              period: int, mask: torch.Tensor) -> dict[tuple[str, str], dict]:
    """Attribution estimates of `path_patching`'s drops: -<d measure / d x_c[h2], delta_h1>, the
    gradient on the clean run with respect to head h2's own input c (per-head inputs)."""
    estimates: dict[tuple[str, str], dict] = {(m, c): {} for m, inputs in PATH_INPUTS.items() for c in inputs}
    for l2 in range(1, model.n_layers):
        x = clean.resid_pre[l2].detach()
        inputs = [x[:, None].expand(-1, model.n_heads, -1, -1).clone().requires_grad_(True) for _ in "qkv"]
        with torch.enable_grad():
            z, pattern = model.run_layer_split(l2, *inputs)
            prefix = M.masked_attention_score(pattern[None], mask).sum()
            grads = dict(zip("qk", torch.autograd.grad(prefix, inputs[:2], retain_graph=True)))
            after = x + model.blocks[l2].attn.output(z)
            logit = logits_after(model, l2 + 1, after, tokens, period, 1).sum()
            logit_grads = dict(zip("qkv", torch.autograd.grad(logit, inputs)))
        delta = _senders(model, l2, clean, corrupted)
        for measure, g in (("attention", grads), ("logit", logit_grads)):
            for c, grad in g.items():
                estimate = -torch.einsum("bhpd,sbpd->sh", grad, delta)
                estimates[(measure, c)] |= _by_layer(estimate, l2, model.n_heads)
    return estimates


# -- agreement --------------------------------------------------------------------------------------
def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of x, ties given their mean rank."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    _, inverse = x.unique(return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=x.dtype, device=x.device).index_add_(0, inverse, ranks)
    return (sums / torch.bincount(inverse).to(x.dtype))[inverse]


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x over its largest |value|, rounded to RANK_DECIMALS decimals."""
    scale = x.abs().max()
    return (x / scale).round(decimals=RANK_DECIMALS) if scale > 0 else x


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors over their finite pairs, each side
    first divided by its largest |value| and rounded to RANK_DECIMALS decimals (float rounding
    around 0 is a tie, not an order); NaN for fewer than 2 pairs or a constant side."""
    a, b = a.flatten().double(), b.flatten().double()
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 2:
        return float("nan")
    ra, rb = _ranks(_rounded(a[keep])), _ranks(_rounded(b[keep]))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = ra.norm() * rb.norm()
    return float(ra @ rb / denominator) if denominator > 0 else float("nan")


def _pairs(tables: dict) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tables.values()]) if tables else torch.zeros(0)


# -- the callback -----------------------------------------------------------------------------------
class CausalScores(Callback):
    """Activation patching, path patching, their attribution estimates and the causal label
    (module docstring) on the main probes and a corrupted copy drawn once in setup (`seed`).
    Thresholds: `previous_token` (which earlier heads count as previous-token heads, as in the
    induction classification), `k_share` and `min_effect` (nats) of the label; `attribution`:
    also the attribution estimates and their agreement. Default cadence: every 10th checkpoint."""

    provides = (N.ACTIVATION_PATCHING,)
    needs = (N.PREVIOUS_TOKEN,)
    requires = (LOGITS, Z, ALLOWED)

    def __init__(self, every: int = 10, previous_token: float = 0.1, k_share: float = 0.5,
                 min_effect: float = 0.05, attribution: bool = True, seed: int = 2718):
        super().__init__(every)
        self.thresholds = dict(previous_token=previous_token, k_share=k_share, min_effect=min_effect)
        self.attribution, self.seed = attribution, seed

    def setup(self, ctx: RunContext) -> None:
        probes = ctx.probes
        self.tokens, self.period = probes.repeated, probes.period
        self.corrupted = corrupted_probe(probes, self.seed).to(self.tokens.device)
        self.mask = M.prefix_matching_mask(self.tokens)
        self.paths = {QKV_INPUTS, RUN_FROM, WEIGHTS} <= set(getattr(ctx.model, "capabilities", ()))
        if not self.paths:
            model = getattr(ctx.model, "name", type(ctx.model).__name__)
            ctx.notes.append(f"{model}: callbacks.{self.name} gives activation patching only (path patching, "
                             f"{N.CAUSAL_K_SHARE} and {N.IS_CAUSAL} need separate q/k/v inputs and running from a layer)")

    def __call__(self, ctx: RunContext) -> dict[str, Any]:
        model, tokens, period = ctx.model, self.tokens, self.period
        clean_logits, clean = model.run_with_cache(tokens)
        _, corrupted = model.run_with_cache(self.corrupted)
        effect = activation_patching(model, tokens, clean, corrupted.z, period,
                                     repeat_losses(clean_logits, tokens, period, 1))
        out: dict[str, Any] = {N.CAUSAL_THRESHOLDS: dict(self.thresholds), N.ACTIVATION_PATCHING: effect}
        agreement: dict[str, float] = {}
        if self.attribution:
            estimate = attribution_activation_patching(model, tokens, corrupted.z, period)
            out[N.attribution(N.ACTIVATION_PATCHING)] = estimate
            agreement["activation"] = spearman(effect, estimate)
        if self.paths:
            previous = ctx.scores[N.PREVIOUS_TOKEN].to(tokens.device) >= self.thresholds["previous_token"]
            drops, share = path_patching(model, tokens, clean, corrupted, period, self.mask, previous)
            out |= {N.path_patching(m, c): pairs for (m, c), pairs in drops.items()}
            out[N.CAUSAL_K_SHARE] = share
            out[N.IS_CAUSAL] = (share >= self.thresholds["k_share"]) & (effect >= self.thresholds["min_effect"])
            if self.attribution and model.n_layers > 1:
                estimates = attribution_path_patching(model, tokens, clean, corrupted, period, self.mask)
                out |= {N.attribution(N.path_patching(m, c)): pairs for (m, c), pairs in estimates.items()}
                for (m, c), pairs in drops.items():
                    name = f"path_{c}" if m == "attention" else f"path_{m}_{c}"
                    agreement[name] = spearman(_pairs(pairs), _pairs(estimates[(m, c)]))
        if agreement:
            out[N.ATTRIBUTION_AGREEMENT] = agreement
        return out
