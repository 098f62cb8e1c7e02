"""An attention-only transformer with TransformerLens-style parameter names and shapes.

    W_E   [d_vocab, d_model]          token embedding
    W_pos [n_ctx, d_model]            positions ("learned": added to the residual stream;
                                      "shortformer": added to the query/key inputs only)
    blocks[l].attn.W_Q/W_K/W_V [n_heads, d_model, d_head], b_Q/b_K/b_V [n_heads, d_head]
    blocks[l].attn.W_O [n_heads, d_head, d_model], b_O [d_model]
    W_U   [d_model, d_vocab], b_U [d_vocab]

The residual stream is x = W_E[tokens] (+ W_pos); each layer adds its attention output; logits are
LN_final(x) @ W_U + b_U (LayerNorms are optional, pre-norm). Training uses fused
scaled-dot-product attention; pass ``return_patterns=True`` to get explicit attention patterns
(``attention_patterns`` gives them alone, as the probes take them), and ``z_hook`` to read or
replace per-head outputs (ablations do).
What circuits and patching need, TransformerLens-like: ``run_with_cache`` (the logits, the
residual stream entering each layer and each layer's z), ``run_from`` (the forward pass from the
residual stream entering a given layer on), ``z_hook``, the hook per layer, and ``run_layer_split``
(a layer whose queries, keys and values read separate streams: path patching). The model is its own
adapter for the scores (train/core/adapter.py: ``capabilities``).
Constructor defaults are the config schema's (train/core/config.py, ModelConfig).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from train.core.config import POSITIONAL_SCHEMES
from train.core.config import ModelConfig as _Defaults

# z_hook(layer, z) -> z, with z [batch, n_heads, pos, d_head]: the per-head attention output
# before W_O. Returning a modified tensor ablates or patches heads.
ZHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [batch, pos, d_vocab]
    patterns: list[torch.Tensor] | None = None  # per layer run [batch, n_heads, query, key]


@dataclass
class ActivationCache:
    """What one forward pass leaves for circuits and patching, per layer l:
    resid_pre[l]: the residual stream entering layer l [batch, pos, d_model];
    z[l]: the per-head attention outputs before W_O [batch, n_heads, pos, d_head] (after any z hook);
    patterns[l]: [batch, n_heads, query, key], when asked for (else None)."""

    resid_pre: list[torch.Tensor]
    z: list[torch.Tensor]
    patterns: list[torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, layer: int, d_model: int, n_heads: int, d_head: int, smeared_keys: bool):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, n_heads, d_head
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        # Smeared keys (Olsson et al. 2022): k_j <- sigmoid(a) k_j + (1 - sigmoid(a)) k_{j-1}.
        self.smear = nn.Parameter(torch.zeros(n_heads)) if smeared_keys else None

    def forward(
        self,
        x: torch.Tensor,
        qk_pos: torch.Tensor | None = None,
        rotary: "Rotary | None" = None,
        return_pattern: bool = False,
        z_hook: ZHook | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, pattern = self.attend(*self.project(x, qk_pos), rotary, return_pattern)
        if z_hook is not None:
            z = z_hook(self.layer, z)
        return self.output(z), pattern

    def project(self, x: torch.Tensor, qk_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(q, k, v), each [batch, n_heads, pos, d_head], of the (normalised) stream x."""
        if qk_pos is None:  # one matmul for all three projections
            return _project(x, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V))
        # shortformer: positions enter the queries and keys only
        return (*_project(x + qk_pos, (self.W_Q, self.W_K), (self.b_Q, self.b_K)), *_project(x, (self.W_V,), (self.b_V,)))

    def pattern(self, x: torch.Tensor, qk_pos: torch.Tensor | None = None, rotary: "Rotary | None" = None) -> torch.Tensor:
        """The pattern [batch, n_heads, query, key] of forward(x, ..., return_pattern=True), the
        same numbers, without mixing the values or writing the output."""
        q, k, _ = self.project(x, qk_pos)
        return self.softmax_pattern(*self.positions(q, k, rotary))

    def split_forward(self, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor,
                      qk_pos: torch.Tensor | None = None, rotary: "Rotary | None" = None):
        """(z, pattern) of the heads given separate (normalised) inputs for the queries, keys and
        values, each [batch, pos, d_model] or per head [batch, n_heads, pos, d_model]."""
        if qk_pos is not None:
            x_q, x_k = x_q + qk_pos, x_k + qk_pos
        q, k, v = (_project(x, (w,), (b,))[0] if x.dim() == 3 else x @ w + b[:, None]
                   for x, w, b in ((x_q, self.W_Q, self.b_Q), (x_k, self.W_K, self.b_K), (x_v, self.W_V, self.b_V)))
        return self.attend(q, k, v, rotary, True)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: "Rotary | None" = None,
               return_pattern: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head z [batch, n_heads, pos, d_head] (and the pattern) of queries, keys and values
        [batch, n_heads, pos, d_head]: smeared keys, rotary positions, causal softmax attention."""
        q, k = self.positions(q, k, rotary)
        pattern = None
        if return_pattern:
            pattern = self.softmax_pattern(q, k)
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return z, pattern

    def positions(self, q: torch.Tensor, k: torch.Tensor, rotary: "Rotary | None") -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys with smeared keys and rotary positions applied."""
        if self.smear is not None:
            s = torch.sigmoid(self.smear)[None, :, None, None]
            k = torch.cat([k[:, :, :1], s * k[:, :, 1:] + (1 - s) * k[:, :, :-1]], dim=2)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        return q, k

    def softmax_pattern(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d_head) + causal mask) [batch, n_heads, query, key], scaled and
        masked in one op."""
        b, h, n, e = q.shape
        mask = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = torch.baddbmm(mask, q.reshape(b * h, n, e), k.reshape(b * h, n, e).transpose(-1, -2),
                               alpha=1 / math.sqrt(self.d_head))
        return scores.softmax(dim=-1).view(b, h, n, n)

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """What the heads write to the residual stream: z [batch, n_heads, pos, d_head] -> sum over
        heads of z W_O, plus b_O: [batch, pos, d_model]."""
        b, h, n, e = z.shape
        out = torch.addmm(self.b_O, z.transpose(1, 2).reshape(b * n, h * e), self.W_O.reshape(h * e, -1))
        return out.view(b, n, -1)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (in fp32) of every next-token prediction: logits [batch, pos, d_vocab] at
    positions 0..pos-2 against tokens [batch, pos] at 1..pos-1 (a target of -100 is left out).
    reduction="mean": the mean over all predictions (the training loss); "none": [batch, pos - 1],
    one loss per prediction (the held-out and per-position losses, the LLC's loss)."""
    if reduction == "none":
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _project(x: torch.Tensor, weights, biases) -> tuple[torch.Tensor, ...]:
    """x [b, p, d_model] through stacked per-head weights [h, d_model, e] -> each [b, h, p, e]."""
    h, d, e = weights[0].shape
    w = torch.cat([w.transpose(0, 1).reshape(d, h * e) for w in weights], dim=1)
    bias = torch.cat([bb.reshape(h * e) for bb in biases])
    out = torch.addmm(bias, x.reshape(-1, d), w).view(*x.shape[:2], len(weights), h, e)
    return tuple(t.transpose(1, 2) for t in out.unbind(2))  # unbind: its backward stacks, no zero-filled copies


class Rotary(nn.Module):
    """Rotary position embedding applied to queries and keys (rotate-half convention)."""

    def __init__(self, d_head: int, n_ctx: int, base: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary positions need an even d_head, got {d_head}")
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        angles = torch.arange(n_ctx, dtype=torch.float32)[:, None] * inv_freq[None]
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", angles.sin().repeat(1, 2), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[-2]
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * self.cos[:n].to(t.dtype) + rotated * self.sin[:n].to(t.dtype)


class Block(nn.Module):
    def __init__(self, layer, d_model, n_heads, d_head, layernorm, smeared_keys):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.attn = Attention(layer, d_model, n_heads, d_head, smeared_keys)


class AttnOnlyTransformer(nn.Module):
    # What a score may ask of this model (train/core/adapter.py names them): everything.
    capabilities = frozenset({"logits", "patterns", "z", "weights", "run_from", "qkv_inputs", "parameters"})

    def __init__(
        self,
        d_vocab: int,
        n_ctx: int,
        n_layers: int = _Defaults.n_layers,
        n_heads: int = _Defaults.n_heads,
        d_model: int = _Defaults.d_model,
        d_head: int = _Defaults.d_head,
        positional: str = _Defaults.positional,
        layernorm: bool = _Defaults.layernorm,
        smeared_keys: bool = _Defaults.smeared_keys,
        init_std: float = _Defaults.init_std,
        rotary_base: float = _Defaults.rotary_base,
    ):
        super().__init__()
        if positional not in POSITIONAL_SCHEMES:
            raise ValueError(f"unknown positional scheme {positional!r}; choose one of {POSITIONAL_SCHEMES}")
        for name, value in dict(d_vocab=d_vocab, n_ctx=n_ctx, n_layers=n_layers, n_heads=n_heads,
                                d_model=d_model, d_head=d_head).items():
            if value <= 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        self.d_vocab, self.n_ctx, self.n_layers = d_vocab, n_ctx, n_layers
        self.n_heads, self.d_model, self.d_head = n_heads, d_model, d_head
        self.positional, self.layernorm = positional, layernorm
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model)) if positional != "rotary" else None
        self.rotary = Rotary(d_head, n_ctx, rotary_base) if positional == "rotary" else None
        self.blocks = nn.ModuleList(
            Block(layer, d_model, n_heads, d_head, layernorm, smeared_keys) for layer in range(n_layers)
        )
        self.ln_final = nn.LayerNorm(d_model) if layernorm else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab))
        self.b_U = nn.Parameter(torch.zeros(d_vocab))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.init_std
        for name, p in self.named_parameters():
            if name.endswith(("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_U")):
                nn.init.normal_(p, std=std)
            elif name.endswith("W_O"):
                # Scaled down with depth so the residual stream's size does not grow with layers.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.n_layers))

    def forward(
        self,
        tokens: torch.Tensor,
        return_patterns: bool = False,
        z_hook: ZHook | None = None,
    ) -> ModelOutput:
        return self.run_from(0, self.embed(tokens), z_hook, return_patterns)

    def attention_patterns(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's pattern [batch, n_heads, query, key]: forward(tokens, return_patterns=True)'s,
        the same numbers, without what no pattern depends on (the last layer's value mixing and
        output, the unembedding)."""
        qk_pos = self.qk_positions(tokens.shape[1])
        x, patterns = self.embed(tokens), []
        for l in range(self.n_layers - 1):
            out, pattern = self.run_layer(l, x, qk_pos, return_pattern=True)
            x = x + out
            patterns.append(pattern)
        last = self.blocks[-1]
        return [*patterns, last.attn.pattern(last.ln1(x), qk_pos, self.rotary)]

    def run_with_cache(self, tokens: torch.Tensor, return_patterns: bool = False,
                       z_hook: ZHook | None = None) -> tuple[torch.Tensor, ActivationCache]:
        """(logits, cache) of one forward pass (the same numbers as `forward`)."""
        cache = ActivationCache([], [], None)
        out = self.run_from(0, self.embed(tokens), z_hook, return_patterns, cache=cache)
        cache.patterns = out.patterns
        return out.logits, cache

    def run_from(self, layer: int, resid: torch.Tensor, z_hook: ZHook | None = None, return_patterns: bool = False,
                 z: torch.Tensor | None = None, cache: ActivationCache | None = None) -> ModelOutput:
        """The forward pass from the residual stream `resid` [batch, pos, d_model] entering layer
        `layer` on: the logits and (return_patterns) the patterns of layers `layer`.. . With `z`
        (layer `layer`'s per-head z, e.g. from a cache), that layer's queries, keys and values are
        not recomputed: z, through the z hook, goes through W_O. `cache`, when given, collects the
        residual streams entering and the z of the layers run."""
        qk_pos = self.qk_positions(resid.shape[1])
        hook = z_hook
        if cache is not None:
            def hook(l: int, z_l: torch.Tensor) -> torch.Tensor:
                z_l = z_hook(l, z_l) if z_hook is not None else z_l
                cache.z.append(z_l)
                return z_l
        x, patterns = resid, [] if return_patterns else None
        for l in range(layer, self.n_layers):
            if cache is not None:
                cache.resid_pre.append(x)
            if z is not None and l == layer:
                out, pattern = self.blocks[l].attn.output(hook(l, z) if hook is not None else z), None
            else:
                out, pattern = self.run_layer(l, x, qk_pos, return_patterns, hook)
            x = x + out
            if patterns is not None:
                patterns.append(pattern)
        return ModelOutput(logits=self.unembed(x), patterns=patterns)

    def qk_positions(self, n: int) -> torch.Tensor | None:
        """The positions added to the query/key inputs of `n` positions (shortformer), else None."""
        return self.W_pos[:n] if self.positional == "shortformer" else None

    # The three stages of the forward pass.
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0 [batch, pos, d_model]."""
        n = tokens.shape[1]
        if n > self.n_ctx:
            raise ValueError(f"sequence length {n} exceeds the model's context n_ctx={self.n_ctx}")
        x = F.embedding(tokens, self.W_E)  # deterministic backward on CPU (indexing is not)
        if self.positional == "learned":
            x = x + self.W_pos[:n]
        return x

    def run_layer(self, layer: int, x: torch.Tensor, qk_pos: torch.Tensor | None,
                  return_pattern: bool = False, z_hook: ZHook | None = None):
        """Layer `layer`'s attention output and pattern (the caller adds the output to the stream);
        qk_pos: the positions added to its query/key inputs (shortformer), else None."""
        block = self.blocks[layer]
        return block.attn(block.ln1(x), qk_pos, self.rotary, return_pattern, z_hook)

    def run_layer_split(self, layer: int, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor):
        """(z, pattern) of layer `layer` when its queries, keys and values read separate residual
        streams x_q, x_k, x_v, each [batch, pos, d_model] or per head [batch, n_heads, pos, d_model]
        and each through the layer's norm (path patching). With all three the stream entering the
        layer: run_layer's z and pattern (explicit path), up to float rounding."""
        block = self.blocks[layer]
        qk_pos = self.qk_positions(x_q.shape[-2])
        return block.attn.split_forward(block.ln1(x_q), block.ln1(x_k), block.ln1(x_v), qk_pos, self.rotary)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(x)
        return torch.addmm(self.b_U, x.reshape(-1, x.shape[-1]), self.W_U).view(*x.shape[:-1], -1)


# The model's fields: the constructor's arguments, in order. The config schema's `model` section
# (train/core/config.py ModelConfig, a test keeps the two equal), a checkpoint's meta.json and the
# transformers config (train/core/hf_model.py) hold exactly these.
MODEL_FIELDS = tuple(inspect.signature(AttnOnlyTransformer).parameters)


def model_kwargs(fields: dict) -> dict:
    """The constructor's arguments among `fields` (a saved `model` section or meta.json's)."""
    return {k: fields[k] for k in MODEL_FIELDS if k in fields}
