"""Mechanistic (weight-based) induction-head scores: pure functions of the model returning tensors.

Sources: Elhage et al. 2021 ("A Mathematical Framework for Transformer Circuits") for the QK/OV
circuits and composition scores; Olsson et al. 2022 (appendix) for the OV eigen-score and the
QK prefix-matching trace. The readings this project picks are written down here and in
docs/METRICS.md, and tested in tests/test_circuits.py.

Orientation (transpose convention)
----------------------------------
The residual stream is a **row vector** x [d_model] (as in the code: ``x @ W_Q``). Per head

    W_QK = W_Q W_K^T   [d_model, d_model]   attention logit  = x_query W_QK x_key^T
    W_OV = W_V W_O     [d_model, d_model]   written output   = x_key W_OV

(Elhage et al. use column vectors: their W_OV is our W_OV^T; W_QK is the same matrix.)
With an earlier head h1 writing x W_OV^{h1} into the stream and a later head h2 reading it:

    K-composition matrix  W_QK^{h2} W_OV^{h1 T}   (h1's output enters h2's keys)
    Q-composition matrix  W_OV^{h1} W_QK^{h2}     (h1's output enters h2's queries)
    V-composition matrix  W_OV^{h1} W_OV^{h2}     (h1's output enters h2's values)

and the score is ||product||_F / (||h2 factor||_F ||W_OV^{h1}||_F). These are transposes of
Elhage's products, so the Frobenius norms (and the scores) are identical. Every product is
evaluated in factored form: a matrix L C R^T with thin L, R [d_model, d_head] has
||L C R^T||_F^2 = tr(C^T (L^T L) C (R^T R)), so only d_head x d_head matrices are formed.
Each score is reported with the random baseline subtracted: the mean score of the same
factored product with i.i.d. Gaussian factors of the same shapes (``n_samples`` draws, fixed
seed, cached per (kind, d_model, d_head)). Random weights therefore score ~0; the baseline
itself is about 1 / sqrt(d_model) (0.125 at the default d_model 64, d_head 16; the spread of
random scores there is ~0.007). Note the ceiling: two perfectly aligned rank-r circuits score
1 / sqrt(r) before the baseline (0.25 for r = d_head = 16), so excesses are small numbers.

LayerNorm
---------
With ``fold_layernorm=True`` (default) a reading head's W_Q, W_K, W_V are replaced by
P diag(gamma) W where gamma is its layer's ln1 weight and P = I - 11^T/d_model the LayerNorm's
centering (TransformerLens's fold_ln + centering); the per-position 1/rms factor is a positive
scalar and is dropped; an RMSNorm (other families, train/core/adapter.py) has no centering:
diag(gamma) W. Without LayerNorms nothing changes. Embedding-side quantities (OV
eigen-score, QK trace) pass W_E through the reading layer's full LayerNorm direction
(centering, 1/rms per token, gamma) exactly like the behavioral copying score in
train/core/metrics.py (``layernorm_direction``), and the final LayerNorm likewise.

OV copying eigen-score (per head)
---------------------------------
M = LN_f(LN_l(W_E) W_OV) W_U~ over the regular tokens (BOS, id 0, excluded: it is never a
copy target), where W_U~ is W_U with its mean over those tokens subtracted (a per-row logit
shift changes no prediction, but would add a spurious eigenvalue). This is the [V, V]
direct-path token-to-logit map of train/core/metrics.py's copying score. Its nonzero eigenvalues
equal those of the [d_model, d_model] matrix W_U~ X (X = the [V, d_model] rows of LN_f(...)),
which is what is decomposed. Score = Re(sum lambda) / sum |lambda| in [-1, 1]: +1 for a pure
copying head (M positive semi-definite-like), -1 for an anti-copying head, ~0 for random.

QK prefix-matching trace (per head in layer >= 1)
-------------------------------------------------
For an earlier head k (layer < l) the key at position j + 1 carries k's output
K_k[t] = LN_k(W_E)[t] W_OV^k for the token t at j (taken through the linear part of layer l's
LayerNorm, P diag(gamma_l)); the query is the token itself, Q[t] = LN_l(W_E)[t]. The matrix
A = Q W_QK^h (sum_k s_k K_k)^T [V, V], with s_k head k's previous-token score, holds the
attention logit of query token t on a key whose previous token is t'. Prefix matching needs
the diagonal to dominate each row, so each row's mean is removed (softmax is invariant to it):
A~ = A (I - 11^T/V). The score is Re(tr A~) / sum |lambda(A~)| in [-1, 1] (= sum lambda /
sum |lambda|, the same normalisation as the OV eigen-score; the weights s_k cancel in scale).
A perfect induction head's A~ is c (I - 11^T/V) and scores +1; random weights score ~0.
Eigenvalues are computed in the d_head-sized space via the cyclic-permutation identity.

`model`: the project's model or a model adapter with weights (train/core/adapter.py; for other
families only the attention path: their MLPs are outside the direct path these scores read).

Known limits: for rotary positions W_QK is the zero-offset bilinear form; smeared keys let a
layer-0 head do induction, which these layer >= 1 circuit scores do not see.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from train.core.adapter import RUN_FROM, Model
from train.core.metrics import head_token_outputs, layernorm_direction
from train.core.model import ActivationCache
from train.core import names as N
from train.core.names import head_name

COMPOSITIONS = ("q", "k", "v")


# -- per-head circuits ---------------------------------------------------------------------------
def _ln_linear(ln: nn.Module, d_model: int, like: torch.Tensor) -> torch.Tensor | None:
    """The linear part of a LayerNorm, P diag(gamma) [d_model, d_model] (of an RMSNorm, diag(gamma));
    None without a norm."""
    if isinstance(ln, nn.RMSNorm):
        return torch.diag(ln.weight.detach().to(like.dtype))
    if not isinstance(ln, nn.LayerNorm):
        return None
    eye = torch.eye(d_model, dtype=like.dtype, device=like.device)
    centre = eye - 1.0 / d_model
    return centre * ln.weight.detach().to(like.dtype)[None, :]


@torch.no_grad()
def head_weights(model: Model, layer: int, fold_layernorm: bool = True) -> dict[str, torch.Tensor]:
    """W_Q, W_K, W_V [n_heads, d_model, d_head] (LayerNorm folded in) and W_O [n_heads, d_head, d_model]."""
    attn = model.blocks[layer].attn
    w = {"W_Q": attn.W_Q.detach(), "W_K": attn.W_K.detach(), "W_V": attn.W_V.detach(), "W_O": attn.W_O.detach()}
    if fold_layernorm:
        lin = _ln_linear(model.blocks[layer].ln1, model.d_model, w["W_Q"])
        if lin is not None:
            for name in ("W_Q", "W_K", "W_V"):
                w[name] = lin @ w[name]
    return {k: v.float() for k, v in w.items()}


@torch.no_grad()
def qk_circuit(model: Model, layer: int, fold_layernorm: bool = True) -> torch.Tensor:
    """W_QK = W_Q W_K^T [n_heads, d_model, d_model] (logit = x_q W_QK x_k^T)."""
    w = head_weights(model, layer, fold_layernorm)
    return w["W_Q"] @ w["W_K"].transpose(-1, -2)


@torch.no_grad()
def ov_circuit(model: Model, layer: int, fold_layernorm: bool = True) -> torch.Tensor:
    """W_OV = W_V W_O [n_heads, d_model, d_model] (output = x W_OV)."""
    w = head_weights(model, layer, fold_layernorm)
    return w["W_V"] @ w["W_O"]


# -- composition scores in factored form -------------------------------------------------------
def _factors(kind: str, w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor]):
    """(L, C, R) with product = L C R^T, and the factor pairs of the two norms.

    w1 / w2: the earlier / later head's weights, already broadcastable against each other."""
    V1, O1 = w1["W_V"], w1["W_O"]
    t = lambda a: a.transpose(-1, -2)  # noqa: E731
    if kind == "k":  # W_QK^{h2} W_OV^{h1 T} = W_Q2 (W_K2^T W_O1^T) W_V1^T
        L, C, R = w2["W_Q"], t(w2["W_K"]) @ t(O1), V1
        f2 = (w2["W_Q"], w2["W_K"])
    elif kind == "q":  # W_OV^{h1} W_QK^{h2} = W_V1 (W_O1 W_Q2) W_K2^T
        L, C, R = V1, O1 @ w2["W_Q"], w2["W_K"]
        f2 = (w2["W_Q"], w2["W_K"])
    elif kind == "v":  # W_OV^{h1} W_OV^{h2} = W_V1 (W_O1 W_V2) W_O2
        L, C, R = V1, O1 @ w2["W_V"], t(w2["W_O"])
        f2 = (w2["W_V"], t(w2["W_O"]))
    else:
        raise ValueError(f"unknown composition {kind!r}; use one of {COMPOSITIONS}")
    return L, C, R, f2, (V1, t(O1))


def _gram(a: torch.Tensor) -> torch.Tensor:
    return a.transpose(-1, -2) @ a


def _factored_norm(L: torch.Tensor, C: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """||L C R^T||_F for stacks of thin factors, via tr(C^T L^T L C R^T R)."""
    sq = (C.transpose(-1, -2) @ _gram(L) @ C @ _gram(R)).diagonal(dim1=-2, dim2=-1).sum(-1)
    return sq.clamp(min=0).sqrt()


def _pair_norm(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """||A B^T||_F for A, B [..., d, e]."""
    a, b = pair
    return (_gram(a) * _gram(b)).sum((-1, -2)).clamp(min=0).sqrt()


def _raw_composition(kind: str, w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor],
                     grid: bool = True) -> torch.Tensor:
    """Composition scores without baseline: [n_later, n_earlier] for every pair (grid=True), or
    elementwise over matching leading dims (grid=False)."""
    if grid:
        w1 = {k: v[None] for k, v in w1.items()}
        w2 = {k: v[:, None] for k, v in w2.items()}
    L, C, R, f2, f1 = _factors(kind, w1, w2)
    return _factored_norm(L, C, R) / (_pair_norm(f2) * _pair_norm(f1)).clamp(min=1e-30)


@lru_cache(maxsize=64)
def composition_baseline(kind: str, d_model: int, d_head: int, n_samples: int = 256, seed: int = 0) -> float:
    """Mean composition score of i.i.d. Gaussian factors of these shapes (cached per shape)."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        return {n: torch.randn(n_samples, *s, generator=g, dtype=torch.float64)
                for n, s in (("W_Q", (d_model, d_head)), ("W_K", (d_model, d_head)),
                             ("W_V", (d_model, d_head)), ("W_O", (d_head, d_model)))}

    w1, w2 = draw(), draw()
    return float(_raw_composition(kind, w1, w2, grid=False).mean())


@torch.no_grad()
def composition_scores(model: Model, fold_layernorm: bool = True, n_samples: int = 256,
                       seed: int = 0, subtract_baseline: bool = True) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """{"q"|"k"|"v": {(l2, l1): [n_heads (later), n_heads (earlier)]}} for every l1 < l2,
    baseline-subtracted unless asked otherwise."""
    weights = [head_weights(model, l, fold_layernorm) for l in range(model.n_layers)]
    out: dict[str, dict[tuple[int, int], torch.Tensor]] = {k: {} for k in COMPOSITIONS}
    for kind in COMPOSITIONS:
        base = composition_baseline(kind, model.d_model, model.d_head, n_samples, seed) if subtract_baseline else 0.0
        for l2 in range(1, model.n_layers):
            for l1 in range(l2):
                out[kind][(l2, l1)] = _raw_composition(kind, weights[l1], weights[l2]) - base
    return out


# -- OV copying eigen-score --------------------------------------------------------------------
def _eigen_score(mat: torch.Tensor) -> torch.Tensor:
    """Re(sum lambda) / sum |lambda| over the eigenvalues of each square matrix in a stack."""
    lam = torch.linalg.eigvals(mat.double())
    return (lam.sum(-1).real / lam.abs().sum(-1).clamp(min=1e-30)).float()


def _regular_unembed(model: Model) -> torch.Tensor:
    """W_U over the regular tokens (no BOS), centred over them: [d_model, V - 1]."""
    w_u = model.W_U.detach().float()[:, 1:]
    return w_u - w_u.mean(1, keepdim=True)


@torch.no_grad()
def ov_eigen_score(model: Model) -> torch.Tensor:
    """[n_layers, n_heads] OV copying eigen-score (see the module docstring)."""
    w_e = model.W_E.detach().float()[1:]
    w_u = _regular_unembed(model)
    out = []
    for layer in range(model.n_layers):
        rows = layernorm_direction(head_token_outputs(model, layer, w_e).float(), model.ln_final)  # [h, V, d]
        out.append(_eigen_score(w_u[None] @ rows))  # nonzero eigs of rows @ w_u == those of w_u @ rows
    return torch.stack(out)


# -- QK prefix-matching trace ------------------------------------------------------------------
@torch.no_grad()
def qk_prefix_matching_trace(model: Model, previous_token: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads] QK prefix-matching trace; layer 0 (no earlier heads) is NaN.

    previous_token: [n_layers, n_heads] previous-token scores weighting the earlier heads."""
    w_e = model.W_E.detach().float()[1:]
    prev = previous_token.detach().float().to(w_e.device)
    result = torch.full((model.n_layers, model.n_heads), float("nan"))
    earlier = 0  # sum over the earlier layers k of sum_h s_k,h K_k,h, K_k[t] = LN_k(W_E)[t] W_OV^k  [V, d]
    for l in range(1, model.n_layers):
        block = model.blocks[l]
        earlier = earlier + (prev[l - 1][:, None, None] * head_token_outputs(model, l - 1, w_e).float()).sum(0)
        keys = earlier
        lin = _ln_linear(block.ln1, model.d_model, keys)
        if lin is not None:
            keys = keys @ lin  # row vectors through P diag(gamma)
        queries = layernorm_direction(w_e, block.ln1)  # [V, d]
        keys_c = keys - keys.mean(0, keepdim=True)  # A (I - 11^T/V) == Q W_QK (centred keys)^T
        w_q, w_k = block.attn.W_Q.detach().float(), block.attn.W_K.detach().float()
        # A~ = Q W_Q W_K^T keys_c^T; nonzero eigs == those of (W_K^T keys_c^T Q W_Q) [e, e].
        small = w_k.transpose(-1, -2) @ keys_c.T @ queries @ w_q  # [h, e, e]
        result[l] = _eigen_score(small).cpu()
    return result


# -- classification ----------------------------------------------------------------------------
@dataclass
class Thresholds:
    """Per-head induction-head thresholds (written into every report row).

    behavioral:   prefix_matching >= prefix_matching and copying >= copying
    mechanistic:  layer >= 1, K-composition (baseline subtracted) >= k_composition with at least
                  one earlier-layer head whose previous_token score >= previous_token, and
                  ov_copying > ov_copying and qk_prefix_matching > qk_prefix_matching.

    copying defaults to 0.08: the share-of-positive-mass copying score is about
    2 / d_vocab for a random head (0.03 at vocab 64) and only ~0.13-0.14 for trained heads that
    put their top-1 logit on the attended token >90% of the time, so 0.08 sits between them at
    vocab 64 (for a much smaller vocabulary, raise it above 2 / d_vocab).
    previous_token defaults to 0.2: uniform causal attention scores ~0.06 at n_ctx 64, and the
    default model's layer-0 heads share the previous-token job (they end at ~0.25-0.3 each on
    held-out text, not the >0.5 of a dedicated head).
    k_composition defaults to 0.03 above the baseline: ~4 standard deviations of random scores
    at d_model 64 (trained induction heads reach 0.05-0.07; the aligned rank-16 ceiling is 0.125)."""

    prefix_matching: float = 0.4
    copying: float = 0.08
    previous_token: float = 0.2
    k_composition: float = 0.03
    ov_copying: float = 0.0
    qk_prefix_matching: float = 0.0


def classify_heads(prefix: torch.Tensor, copying: torch.Tensor, previous_token: torch.Tensor,
                   k_composition: dict[tuple[int, int], torch.Tensor], ov: torch.Tensor, qk: torch.Tensor,
                   thr: Thresholds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(behavioral, mechanistic) bool [n_layers, n_heads], and the best baseline-subtracted
    K-composition of each head with a previous-token head of an earlier layer (NaN if none).

    All score tables are [n_layers, n_heads]; k_composition maps (l2, l1) -> [h2, h1]."""
    n_layers, n_heads = prefix.shape
    behavioral = (prefix >= thr.prefix_matching) & (copying >= thr.copying)
    k_prev = torch.full((n_layers, n_heads), float("nan"))
    for l2 in range(1, n_layers):
        best = torch.full((n_heads,), float("-inf"))
        for l1 in range(l2):
            is_prev = previous_token[l1] >= thr.previous_token  # [h1]
            if is_prev.any():
                best = torch.maximum(best, k_composition[(l2, l1)][:, is_prev].max(dim=1).values.cpu())
        k_prev[l2] = torch.where(torch.isinf(best), torch.tensor(float("nan")), best)
    circuit = (k_prev >= thr.k_composition) & (ov > thr.ov_copying) & (qk > thr.qk_prefix_matching)
    circuit[0] = False
    return behavioral, circuit, k_prev


def label_summary(behavioral: torch.Tensor, mechanistic: torch.Tensor) -> dict[str, object]:
    """Counts of heads labelled behavioral, mechanistic, both and only one of the two, and the
    names of the heads labelled by one definition only (`disagreeing`) and by both (`both_heads`)."""
    n_layers, n_heads = behavioral.shape
    flat = [(head_name(l, h), bool(behavioral[l, h]), bool(mechanistic[l, h]))
            for l in range(n_layers) for h in range(n_heads)]
    return {N.BEHAVIORAL: int(behavioral.sum()), N.MECHANISTIC: int(mechanistic.sum()),
            N.BOTH: int((behavioral & mechanistic).sum()), N.DISAGREE: int((behavioral ^ mechanistic).sum()),
            N.DISAGREEING: [n for n, b, m in flat if b != m], N.BOTH_HEADS: [n for n, b, m in flat if b and m]}


def previous_token_heads(previous_token: torch.Tensor, threshold: float) -> list[str]:
    """Names of the heads whose previous-token score is >= threshold."""
    n_layers, n_heads = previous_token.shape
    return [head_name(l, h) for l in range(n_layers) for h in range(n_heads) if previous_token[l, h] >= threshold]


# -- causal checks: ablating heads through the model's z hooks ----------------------------------
def mean_ablation_values(zs: list[torch.Tensor], groups: list[int]) -> list[torch.Tensor]:
    """Per layer, each head's z [batch, n_heads, pos, d_head] replaced by its mean over the batch at
    each position, taken separately within consecutive groups of rows of the given sizes (so
    that differently built inputs in one batch, e.g. text and probes, each get their own mean)."""
    return [torch.cat([part.mean(0, keepdim=True).expand(len(part), -1, -1, -1) for part in z.split(groups)])
            for z in zs]


@torch.no_grad()
def ablated_logits(model, tokens: torch.Tensor, heads: list[tuple[int, int]],
                   replacement: list[torch.Tensor] | None = None, cache: ActivationCache | None = None) -> torch.Tensor:
    """Logits with each head in `heads` replaced through the model's z hooks: by zero
    (replacement None) or by replacement[layer][:, head] (e.g. the head's mean z over the batch).

    `model`: the project's model or a model adapter (train/core/adapter.py) with per-head z. With
    `cache` (the model's run_with_cache on the same tokens) and a model that runs from a layer
    (capability run_from), neither the layers before the first ablated head nor the queries, keys
    and values of its layer are recomputed (its clean z, with the ablated heads replaced, goes
    through W_O): the same numbers as the full forward pass with the hook, which is run otherwise."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook(layer, z):
        if layer not in by_layer:
            return z
        z = z.clone()
        for h in by_layer[layer]:
            z[:, h] = 0.0 if replacement is None else replacement[layer][:, h]
        return z

    if cache is None or not by_layer or RUN_FROM not in model.capabilities:
        return model(tokens, z_hook=hook).logits
    first = min(by_layer)
    return model.run_from(first, cache.resid_pre[first], hook, z=cache.z[first]).logits
