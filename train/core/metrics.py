"""Behavioral induction-head metrics: pure functions of (model, probe tokens) returning tensors.
`model`: the project's model or a model adapter (train/core/adapter.py).

Definitions (docs/METRICS.md has each one with its probe data, range and known values; sources in
Olsson et al. 2022):

* prefix-matching score [n_layers, n_heads]: for every query position i whose token occurred
  earlier, the attention mass on the positions right after those earlier occurrences
  (j + 1 for every j < i with token_j == token_i), averaged over such queries and probes.
  On BOS + random segment x repeats, the queries are exactly those in repeats 2..R.
  Perfect induction head: 1; uniform attention: about (number of occurrences) / (i + 1).
* previous-token score [n_layers, n_heads]: mean attention from position i to i - 1, i >= 1.
* duplicate-token score [n_layers, n_heads]: attention mass on earlier occurrences of the
  query's own token, over queries that have one.
* copying score [n_layers, n_heads]: for random tokens t, the head's direct-path logits when it
  attends fully to t, l = LN_f(LN_1(W_E[t]) W_V W_O) W_U (LayerNorm scales and centering, no
  biases). Score = share of ReLU(l - mean(l)) that falls on t itself, averaged over t.
  Range [0, 1]: a pure copying head scores near 1, a random head about 2 / d_vocab.
* per-position loss [n_ctx - 1]: element i is the mean cross-entropy of the prediction made at
  position i (of token i + 1) over the held-out set.
* ICL score: per_position_loss[late] - per_position_loss[early]; negative means the model uses
  its context. Default indices scale Olsson's 50 and 500 (of 512) with the context length.
* repeated-part loss: mean loss of the predictions of the repeats 2..R of a probe (positions
  period..end - 1 predict them).
* ICL removed by an ablation: 1 - ablated ICL score / clean ICL score (0 when the clean score is 0).
* probe spread [n_layers, n_heads]: min and max prefix matching over the main probe and its
  variants; a head is probe-fragile when its main score is >= min_main but some variant scores
  below fragile_ratio x the main score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.core.adapter import Model
from train.core.model import next_token_loss


PATTERN_CHUNK = 1 << 19  # on CPU: pattern elements of one layer per forward pass (2 MiB in fp32)


@torch.no_grad()
def attention_patterns(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """Explicit attention patterns [n_layers, batch, n_heads, query, key]. On CPU, in forward
    passes of as many sequences as keep one layer's patterns within PATTERN_CHUNK elements: the
    softmax and the value mixing then stay in the cache, about twice as fast as 64 sequences of
    the default run at once, with identical results."""
    n = tokens.shape[-1]
    rows = max(1, PATTERN_CHUNK // (model.n_heads * n * n)) if tokens.device.type == "cpu" else len(tokens)
    if len(tokens) <= rows:
        return torch.stack(model.attention_patterns(tokens))
    return torch.cat([torch.stack(model.attention_patterns(chunk)) for chunk in tokens.split(rows)], dim=1)


def prefix_matching_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, query, key] True where key = j + 1 for an earlier j with token_j == token_query."""
    n = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, i, j]
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    same = same & earlier
    mask = torch.zeros_like(same)
    mask[:, :, 1:] = same[:, :, :-1]  # key j + 1 for each matching j
    return mask


def duplicate_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, query, key] True where key < query holds the query's own token."""
    n = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]
    return same & torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)


def masked_attention_score(patterns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over (probe, query with any True key) of the attention mass on the masked keys.

    patterns [n_layers, batch, n_heads, q, k], mask [batch, q, k] -> [n_layers, n_heads]."""
    mask = mask.to(patterns.dtype)
    mass = torch.einsum("lbhqk,bqk->lbhq", patterns, mask)
    valid = (mask.sum(-1) > 0).to(patterns.dtype)  # [b, q]
    return torch.einsum("lbhq,bq->lh", mass, valid) / valid.sum().clamp(min=1)


def prefix_matching_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return masked_attention_score(patterns, prefix_matching_mask(tokens))


def duplicate_token_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return masked_attention_score(patterns, duplicate_token_mask(tokens))


def previous_token_score(patterns: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads] mean attention from i to i - 1 over queries i >= 1."""
    return patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def layernorm_direction(x: torch.Tensor, ln) -> torch.Tensor:
    """Apply a LayerNorm's centering, scaling and weight (not its bias), or an RMSNorm's scaling
    and weight (models of other families, train/core/adapter.py); identity if no norm."""
    if isinstance(ln, torch.nn.RMSNorm):
        eps = ln.eps if ln.eps is not None else torch.finfo(x.dtype).eps
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * ln.weight
    if not isinstance(ln, torch.nn.LayerNorm):
        return x
    x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    return x * ln.weight


@torch.no_grad()
def head_token_outputs(model: Model, layer: int, embeddings: torch.Tensor) -> torch.Tensor:
    """[n_heads, t, d_model]: what each head of `layer` writes to the residual stream when it
    attends fully to a position holding each embedding row (through that layer's LayerNorm
    direction; no biases)."""
    block = model.blocks[layer]
    x = layernorm_direction(embeddings, block.ln1)  # [t, d_model]
    return torch.einsum("td,hde,hem->htm", x, block.attn.W_V, block.attn.W_O)


@torch.no_grad()
def direct_path_logits(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads, len(tokens), d_vocab]: each head's direct-path logits when it attends
    fully to each token."""
    return torch.stack([layernorm_direction(head_token_outputs(model, layer, model.W_E[tokens]), model.ln_final)
                        @ model.W_U for layer in range(model.n_layers)])


@torch.no_grad()
def copying_score(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads] share of positive (mean-subtracted) direct-path logit mass on the
    attended token itself."""
    logits = direct_path_logits(model, tokens)
    positive = F.relu(logits - logits.mean(-1, keepdim=True))
    own = positive.gather(-1, tokens.view(1, 1, -1, 1).expand(*positive.shape[:3], 1)).squeeze(-1)
    return (own / positive.sum(-1).clamp(min=1e-12)).mean(-1)


@torch.no_grad()
def sequence_losses(model: Model, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[n, n_ctx - 1]: cross-entropy of every next-token prediction of every sequence in `tokens`
    (forward passes of `batch_size` sequences: on CPU, chunks whose activations stay in the
    allocator's reused memory are a third faster than one large batch, with identical results)."""
    return torch.cat([next_token_loss(model(chunk).logits, chunk, "none") for chunk in tokens.split(batch_size)])


def mean_over_sequences(losses: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """[n, pos] -> [pos]: the mean over sequences (summed in chunks of `batch_size` sequences)."""
    total = torch.zeros(losses.shape[1], device=losses.device)
    for chunk in losses.split(batch_size):
        total += chunk.sum(0)
    return total / losses.shape[0]


def per_position_loss(model: Model, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[n_ctx - 1]: mean cross-entropy of the prediction at each position over `tokens`
    (forward passes of `batch_size` sequences)."""
    return mean_over_sequences(sequence_losses(model, tokens, batch_size))


def icl_indices(n_ctx: int, early: int | None = None, late: int | None = None) -> tuple[int, int]:
    """Olsson's token indices 50 and 500 (of 512) scaled to the context, unless given."""
    last = n_ctx - 2  # the last position that makes a prediction
    early = round(n_ctx * 50 / 512) if early is None else early
    late = min(round(n_ctx * 500 / 512), last) if late is None else late
    if not 0 <= early < late <= last:
        raise ValueError(f"ICL indices need 0 <= early < late <= {last} for n_ctx={n_ctx}, got {early}, {late}")
    return early, late


def _window(index: int, window: int, length: int) -> slice:
    return slice(max(index - window, 0), min(index + window + 1, length))


def icl_score(position_loss: torch.Tensor, early: int, late: int, window: int = 0) -> torch.Tensor:
    """loss at `late` - loss at `early` (each the mean over positions index +- `window`) of a
    per-position loss [pos] (or [n, pos]: one score per sequence)."""
    if window == 0:
        return position_loss[..., late] - position_loss[..., early]
    n = position_loss.shape[-1]
    return (position_loss[..., _window(late, window, n)].mean(-1)
            - position_loss[..., _window(early, window, n)].mean(-1))


def icl_score_se(losses: torch.Tensor, early: int, late: int, window: int = 0) -> torch.Tensor:
    """Standard error of the ICL score over sequences: std of the per-sequence scores of `losses`
    [n, pos] / sqrt(n)."""
    per_sequence = icl_score(losses, early, late, window)
    return per_sequence.std() / per_sequence.numel() ** 0.5


def repeated_part_loss(losses: torch.Tensor, period: int) -> torch.Tensor:
    """Mean of token losses [batch, pos - 1] of BOS + segment x repeats probes over the predictions
    of repeats 2..R (positions period .. pos - 2)."""
    return losses[:, period:].mean()


def icl_removed(clean: float, ablated: float) -> float:
    """Share of the clean ICL score removed by an ablation: 1 - ablated / clean (0 if clean is 0)."""
    return 1.0 - ablated / clean if clean != 0 else 0.0


def probe_spread(main: torch.Tensor, variants: list[torch.Tensor], fragile_ratio: float,
                 min_main: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, fragile) [n_layers, n_heads] of prefix-matching scores over the main probe and
    its variants; fragile is bool (see the module docstring)."""
    stacked = torch.stack([main, *variants])
    low, high = stacked.min(0).values, stacked.max(0).values
    return low, high, (main >= min_main) & (low < fragile_ratio * main)
