"""The project's model as a Hugging Face `transformers` model type ("induction_tracker").

`AttnOnlyConfig` holds the keyword arguments of `train.core.model.AttnOnlyTransformer`;
`AttnOnlyForCausalLM` wraps that model unchanged (its parameters under `model.`), so the logits
are the project's exactly, for every variant (learned / shortformer / rotary positions,
LayerNorm or none, smeared keys, output bias b_U). `output_attentions=True` returns the explicit
attention patterns [batch, n_heads, query, key] per layer.

This file imports only torch, transformers and `.model`: `python -m analysis.export` copies it
into an export next to a copy of train/core/model.py, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the export without
this project installed.
"""
from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from .model import MODEL_FIELDS, AttnOnlyTransformer, next_token_loss

MODEL_TYPE = "induction_tracker"
# The model's fields with their defaults (the constructor's; a context and vocabulary of 64 where
# it has none), so that `AttnOnlyConfig()` stands alone as transformers expects.
DEFAULTS = {name: (64 if p.default is inspect.Parameter.empty else p.default)
            for name, p in inspect.signature(AttnOnlyTransformer).parameters.items()}


class AttnOnlyConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        for name, default in DEFAULTS.items():  # the model's fields (MODEL_FIELDS)
            setattr(self, name, kwargs.pop(name, default))
        # The names other tools look for.
        kwargs.setdefault("vocab_size", self.d_vocab)
        kwargs.setdefault("max_position_embeddings", self.n_ctx)
        kwargs.setdefault("num_hidden_layers", self.n_layers)
        kwargs.setdefault("num_attention_heads", self.n_heads)
        kwargs.setdefault("hidden_size", self.d_model)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def model_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_FIELDS}


class AttnOnlyForCausalLM(PreTrainedModel):
    config_class = AttnOnlyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.model = AttnOnlyTransformer(**config.model_kwargs())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights come from the checkpoint; buffers that are not saved (rotary angles) are
        # recomputed here, as loading may have created them empty.
        if hasattr(module, "cos") and hasattr(module, "sin") and module is getattr(self.model, "rotary", None):
            fresh = type(module)(self.config.d_head, self.config.n_ctx, self.config.rotary_base)
            module.cos, module.sin = fresh.cos.to(module.cos.device), fresh.sin.to(module.sin.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_attentions: bool | None = None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: every attention_mask entry must be 1")
        out = self.model(input_ids, return_patterns=bool(output_attentions))
        loss = None
        if labels is not None:
            loss = next_token_loss(out.logits, labels)
        return CausalLMOutput(loss=loss, logits=out.logits,
                              attentions=tuple(out.patterns) if output_attentions else None)


def register_project_model() -> None:
    """Let `transformers`' Auto classes load this model type with these classes (no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, AttnOnlyConfig)
        AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM)
    except ValueError:  # already registered
        pass
