"""What a score may ask of a model, and the models that answer: the project's own and Hugging Face
causal LMs.

A model adapter is anything the callbacks (train/core/callbacks.py) score through. It has the
project's model's interface (train/core/model.py), or the part of it named by its `capabilities`:

    logits     model(tokens).logits [batch, pos, d_vocab]
    patterns   model(tokens, return_patterns=True).patterns: per layer [batch, n_heads, query, key];
               model.attention_patterns(tokens): the same list (the project's model leaves out
               what no pattern depends on)
    z          model(tokens, z_hook=hook): hook(layer, z) reads or replaces the per-head attention
               outputs z [batch, n_heads, pos, d_head] before W_O; model.run_with_cache(tokens) ->
               (logits, ActivationCache: residual stream entering each layer, z per layer)
    weights    W_E [d_vocab, d_model], W_U [d_model, d_vocab], ln_final, and per layer
               blocks[l].ln1 (the norm before attention) and blocks[l].attn.W_Q / W_K / W_V
               [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]
    run_from   model.run_from(layer, resid, z_hook, z=...): the forward pass from the residual
               stream entering `layer` on
    qkv_inputs model.run_layer_split(layer, x_q, x_k, x_v) -> (z, pattern): a layer whose
               queries, keys and values read separate residual streams (path patching)
    parameters a trainable torch module whose forward gives logits (the LLC's sampler)

and n_layers, n_heads, d_model, d_head, d_vocab, n_ctx. The project's model is its own adapter
(it has every capability); `adapt` gives the adapter of any model.

`HFAdapter` serves a `transformers` causal LM. The GPT-2, GPT-NeoX and Llama / Mistral / Qwen2
families get logits, patterns, z and weights: patterns through `output_attentions` (the model
must run eager attention), z through a pre-hook on the attention output projection (c_proj,
dense, o_proj), the residual stream entering each layer from `output_hidden_states`, and the
weights in the project's names and shapes (fp32), the norms as torch's LayerNorm / RMSNorm and
grouped key/value heads repeated for the query heads they serve. Only the attention path is
mapped: the MLPs stay in the forward pass (logits, patterns, z) but are outside the direct path
the weight-based scores read, and biases are left out of the weights as for the project's model.
Running from a layer is not offered (a family's layers take positions and masks built by its
own forward): ablations run the full forward pass with the z hook, which gives the same numbers.
Nor are separate query/key/value inputs: the causal scores (train/core/causal.py) get activation
patching only.
Any other causal LM gets logits and patterns only, the behavioural scores, with a one-line `note`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable, Union

import torch
from torch import nn

from train.core.model import ActivationCache, AttnOnlyTransformer, ModelOutput, ZHook

LOGITS, PATTERNS, Z, WEIGHTS, RUN_FROM, PARAMETERS = "logits", "patterns", "z", "weights", "run_from", "parameters"
QKV_INPUTS = "qkv_inputs"
CAPABILITIES = frozenset({LOGITS, PATTERNS, Z, WEIGHTS, RUN_FROM, QKV_INPUTS, PARAMETERS})
NATIVE_TYPE = "induction_tracker"  # the project's transformers model type (train/core/hf_model.py MODEL_TYPE)


class AdapterError(ValueError):
    """A model that cannot give what was asked of it: one line, no traceback."""


def adapt(model, d_vocab: int | None = None) -> "Model":
    """The adapter of `model`: the project's model itself (also out of its transformers wrapper,
    train/core/hf_model.py), an adapter as it is, or an HFAdapter of a transformers causal LM
    (`d_vocab`: the token ids scored, e.g. the tokenizer's, when the embedding is padded)."""
    if isinstance(model, (AttnOnlyTransformer, HFAdapter)):
        return model
    if getattr(getattr(model, "config", None), "model_type", None) == NATIVE_TYPE:
        return model.model
    return HFAdapter(model, d_vocab)


# -- the weights of the families this knows ------------------------------------------------------
@dataclass
class HeadWeights:
    """One layer's per-head weights (fp32): W_Q, W_K, W_V [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor


@dataclass
class BlockWeights:
    ln1: nn.Module  # the norm before attention (torch's LayerNorm or RMSNorm, fp32)
    attn: HeadWeights


def _norm(module: nn.Module) -> nn.Module:
    """A family's LayerNorm / RMSNorm as torch's own, in fp32."""
    weight = module.weight.detach().float()
    if isinstance(module, nn.LayerNorm):
        ln = nn.LayerNorm(weight.shape[0], eps=module.eps, device=weight.device)
        ln.weight.data, ln.bias.data = weight.clone(), module.bias.detach().float().clone()
        return ln
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    ln = nn.RMSNorm(weight.shape[0], eps=eps, device=weight.device)
    ln.weight.data = weight.clone()
    return ln


def _heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[d_model, n_heads * d_head] (input-major) -> [n_heads, d_model, d_head]."""
    return w.reshape(w.shape[0], n_heads, -1).permute(1, 0, 2)


def _gpt2(model) -> tuple[torch.Tensor, list[BlockWeights], nn.Module]:
    t, h, d = model.transformer, model.config.n_head, model.config.n_embd
    blocks = []
    for b in t.h:
        w = b.attn.c_attn.weight.detach().float()  # Conv1D [d, 3d]: columns Q | K | V, heads in order
        q, k, v = (_heads(w[:, i * d:(i + 1) * d], h) for i in range(3))
        o = b.attn.c_proj.weight.detach().float().reshape(h, -1, d)
        blocks.append(BlockWeights(_norm(b.ln_1), HeadWeights(q, k, v, o)))
    return t.wte.weight, blocks, _norm(t.ln_f)


def _neox(model) -> tuple[torch.Tensor, list[BlockWeights], nn.Module]:
    t, h, d = model.gpt_neox, model.config.num_attention_heads, model.config.hidden_size
    blocks = []
    for b in t.layers:
        qkv = b.attention.query_key_value.weight.detach().float().reshape(h, 3, -1, d)  # rows: head, q/k/v, e
        q, k, v = (qkv[:, i].transpose(1, 2) for i in range(3))
        o = b.attention.dense.weight.detach().float().T.reshape(h, -1, d)
        blocks.append(BlockWeights(_norm(b.input_layernorm), HeadWeights(q, k, v, o)))
    return t.embed_in.weight, blocks, _norm(t.final_layer_norm)


def _llama(model) -> tuple[torch.Tensor, list[BlockWeights], nn.Module]:
    t, c = model.model, model.config
    h, d = c.num_attention_heads, c.hidden_size
    groups = h // (getattr(c, "num_key_value_heads", None) or h)  # query heads per key/value head
    blocks = []
    for b in t.layers:
        a = b.self_attn
        q = _heads(a.q_proj.weight.detach().float().T, h)
        k, v = (_heads(p.weight.detach().float().T, h // groups).repeat_interleave(groups, dim=0)
                for p in (a.k_proj, a.v_proj))
        o = a.o_proj.weight.detach().float().T.reshape(h, -1, d)
        blocks.append(BlockWeights(_norm(b.input_layernorm), HeadWeights(q, k, v, o)))
    return t.embed_tokens.weight, blocks, _norm(t.norm)


# model_type -> (the attention output projections per layer, the weights)
FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (lambda m: [b.attn.c_proj for b in m.transformer.h], _gpt2),
    "gpt_neox": (lambda m: [b.attention.dense for b in m.gpt_neox.layers], _neox),
    **{kind: (lambda m: [b.self_attn.o_proj for b in m.model.layers], _llama) for kind in ("llama", "mistral", "qwen2")},
}


# -- a transformers causal LM as the project's model ---------------------------------------------
class HFAdapter:
    """A `transformers` causal LM seen through the project's model interface (module docstring)."""

    def __init__(self, model, d_vocab: int | None = None):
        c = model.config
        self.hf, self.name = model, c.model_type
        self.family = FAMILIES.get(c.model_type)
        self.n_layers = getattr(c, "num_hidden_layers", None)
        self.n_heads = getattr(c, "num_attention_heads", None)
        self.d_model = getattr(c, "hidden_size", None)
        self.d_head = getattr(c, "head_dim", None) or (self.d_model // self.n_heads if self.d_model and self.n_heads else None)
        self.d_vocab = d_vocab or c.vocab_size
        self.n_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1 << 30
        if self.family is not None:
            self.capabilities, self.note = frozenset({LOGITS, PATTERNS, Z, WEIGHTS}), None
        else:
            self.capabilities = frozenset({LOGITS, PATTERNS})
            self.note = (f"{self.name}: behavioural scores only (its attention weights and per-head outputs "
                         f"are not mapped onto W_Q/W_K/W_V/W_O; adapters: {', '.join(FAMILIES)})")

    def __call__(self, tokens: torch.Tensor, return_patterns: bool = False, z_hook: ZHook | None = None) -> ModelOutput:
        return self._run(tokens, return_patterns, z_hook)[0]

    def attention_patterns(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's pattern [batch, n_heads, query, key], as the project's model's."""
        return self(tokens, return_patterns=True).patterns

    def run_with_cache(self, tokens: torch.Tensor, return_patterns: bool = False,
                       z_hook: ZHook | None = None) -> tuple[torch.Tensor, ActivationCache]:
        """(logits, cache) of one forward pass, as the project's model's run_with_cache."""
        zs: list[torch.Tensor] = []

        def record(layer: int, z: torch.Tensor) -> torch.Tensor:
            z = z_hook(layer, z) if z_hook is not None else z
            zs.append(z)
            return z

        out, hidden = self._run(tokens, return_patterns, record, hidden=True)
        return out.logits, ActivationCache(list(hidden[: self.n_layers]), zs, out.patterns)

    def _run(self, tokens: torch.Tensor, return_patterns: bool, z_hook: ZHook | None, hidden: bool = False):
        if z_hook is not None and Z not in self.capabilities:
            raise AdapterError(f"{self.name}: per-head outputs (z) are not mapped for this model type")
        handles = []
        if z_hook is not None:
            for layer, proj in enumerate(self.family[0](self.hf)):
                handles.append(proj.register_forward_pre_hook(partial(self._z_pre_hook, layer, z_hook)))
        try:
            out = self.hf(tokens, output_attentions=return_patterns, output_hidden_states=hidden, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        patterns = None
        if return_patterns:
            if not out.attentions or any(a is None for a in out.attentions):
                raise AdapterError(f"{type(self.hf).__name__} returns no attention weights (no eager attention path)")
            patterns = [a.float() for a in out.attentions]
        return ModelOutput(out.logits, patterns), out.hidden_states

    def _z_pre_hook(self, layer: int, z_hook: ZHook, module: nn.Module, args: tuple):
        """The output projection's input [batch, pos, n_heads * d_head] as z, through the hook."""
        x = args[0]
        b, n, _ = x.shape
        z = x.view(b, n, self.n_heads, -1).transpose(1, 2)
        new = z_hook(layer, z)
        if new is z:
            return None
        return (new.transpose(1, 2).reshape(b, n, -1), *args[1:])

    # -- weights, in the project's names (built on first use) ----------------------------------
    @cached_property
    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, list[BlockWeights], nn.Module]:
        if WEIGHTS not in self.capabilities:
            raise AdapterError(f"{self.name}: weights are not mapped for this model type")
        w_e, blocks, ln_final = self.family[1](self.hf)
        w_u = self.hf.get_output_embeddings().weight.detach().float().T
        return w_e.detach().float()[: self.d_vocab], w_u[:, : self.d_vocab], blocks, ln_final

    @property
    def W_E(self) -> torch.Tensor:
        return self._weights[0]

    @property
    def W_U(self) -> torch.Tensor:
        return self._weights[1]

    @property
    def blocks(self) -> list[BlockWeights]:
        return self._weights[2]

    @property
    def ln_final(self) -> nn.Module:
        return self._weights[3]


Model = Union[AttnOnlyTransformer, HFAdapter]  # what the scores take
