"""Hand-built attention-only models whose induction-head scores are known in advance.

The residual stream is split into one-hot subspaces:
    token (d_vocab) | position (n_ctx) | previous token (d_vocab) | output (d_vocab)
W_E writes the token subspace, W_pos the position subspace, W_U reads the output subspace only.

`induction_circuit` builds the textbook two-layer circuit:
  * L0H0, a previous-token head: its query at position p matches the key at p - 1 (positions),
    and it copies the token there into the previous-token subspace;
  * L1H0, an induction head: its query (current token t) matches keys whose previous-token
    subspace holds t (K-composition with L0H0), i.e. the position after an earlier t, and its
    OV copies the attended token into the output subspace;
  * every other head has zero weights: uniform attention, no output.
`scale` is the attention logit of a match after the 1/sqrt(d_head) scaling.
"""
from __future__ import annotations

import math

import torch

from train.core.model import AttnOnlyTransformer


def _layout(d_vocab: int, n_ctx: int):
    tok = slice(0, d_vocab)
    pos = slice(d_vocab, d_vocab + n_ctx)
    prev = slice(pos.stop, pos.stop + d_vocab)
    out = slice(prev.stop, prev.stop + d_vocab)
    return tok, pos, prev, out, out.stop


def blank_model(d_vocab: int = 24, n_ctx: int = 64, n_layers: int = 2, n_heads: int = 2) -> AttnOnlyTransformer:
    """A model of the one-hot layout with every weight zero except W_E, W_pos and W_U."""
    tok, pos, prev, out, d_model = _layout(d_vocab, n_ctx)
    d_head = max(d_vocab, n_ctx)
    model = AttnOnlyTransformer(d_vocab, n_ctx, n_layers, n_heads, d_model, d_head, positional="learned",
                                layernorm=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, tok] = torch.eye(d_vocab)
        model.W_pos[:, pos] = torch.eye(n_ctx)
        model.W_U[out, :] = torch.eye(d_vocab)
    return model


def set_previous_token_head(model: AttnOnlyTransformer, layer: int, head: int, scale: float = 30.0) -> None:
    """Query at p matches the key at p - 1; OV writes the attended token into the prev subspace."""
    tok, pos, prev, out, _ = _layout(model.d_vocab, model.n_ctx)
    attn, n, v = model.blocks[layer].attn, model.n_ctx, model.d_vocab
    with torch.no_grad():
        attn.W_Q[head, pos, :n] = scale * math.sqrt(model.d_head) * torch.eye(n)  # position p -> unit p
        attn.W_K[head, pos, :n] = torch.eye(n, n).roll(1, dims=1)  # position p -> unit p + 1
        attn.W_K[head, pos.start + n - 1, :n] = 0  # the last position has no successor
        attn.W_V[head, tok, :v] = torch.eye(v)
        attn.W_O[head, :v, prev] = torch.eye(v)


def set_induction_head(model: AttnOnlyTransformer, layer: int, head: int, scale: float = 30.0) -> None:
    """Query (current token t) matches keys whose previous-token subspace holds t; OV copies."""
    tok, pos, prev, out, _ = _layout(model.d_vocab, model.n_ctx)
    attn, v = model.blocks[layer].attn, model.d_vocab
    with torch.no_grad():
        attn.W_Q[head, tok, :v] = scale * math.sqrt(model.d_head) * torch.eye(v)
        attn.W_K[head, prev, :v] = torch.eye(v)
        attn.W_V[head, tok, :v] = torch.eye(v)
        attn.W_O[head, :v, out] = torch.eye(v)


def set_previous_offset_head(model: AttnOnlyTransformer, layer: int, head: int, offset: int,
                             scale: float = 30.0, copy: bool = True) -> None:
    """Attends from position p to p - offset by position alone (no token information)."""
    tok, pos, prev, out, _ = _layout(model.d_vocab, model.n_ctx)
    attn, n, v = model.blocks[layer].attn, model.n_ctx, model.d_vocab
    with torch.no_grad():
        attn.W_Q[head, pos, :n] = scale * math.sqrt(model.d_head) * torch.eye(n)
        attn.W_K[head, pos, :n] = torch.eye(n, n).roll(offset, dims=1)
        attn.W_K[head, pos.start + n - offset:pos.stop, :n] = 0
        if copy:
            attn.W_V[head, tok, :v] = torch.eye(v)
            attn.W_O[head, :v, out] = torch.eye(v)


def induction_circuit(d_vocab: int = 24, n_ctx: int = 64, n_heads: int = 2, scale: float = 30.0) -> AttnOnlyTransformer:
    model = blank_model(d_vocab, n_ctx, 2, n_heads)
    set_previous_token_head(model, 0, 0, scale)
    set_induction_head(model, 1, 0, scale)
    return model.eval()


def repeated_probes(d_vocab: int, period: int, repeats: int, n: int = 16, seed: int = 5):
    """Probes for these models: BOS (0) + `period` distinct tokens of 1..d_vocab-1 tiled `repeats`
    times, the same tokens as the probe token set (no held-out text)."""
    from train.core.probes import Probes, repeated_random_tokens

    allowed = torch.arange(1, d_vocab)
    repeated = repeated_random_tokens(n, period, repeats, allowed, torch.Generator().manual_seed(seed))
    return Probes(repeated, period, repeats, allowed.clone(), None, allowed)
