"""The training step per model size (scripts/bench.py, sections 2 and 6): our model's step and
TransformerLens's HookedTransformer's with the same weights, batch and AdamW, timed in
interleaved blocks, with the model FLOPs per token and the step's peak memory."""
from __future__ import annotations

import contextlib
import statistics
import sys
import warnings
from typing import Any, Callable

import torch

from scripts.bench_machine import peak_memory, reset_peak_memory
from scripts.bench_timing import N_LAYERS, Settings, time_interleaved, timed
from train.core.config import DataConfig, ModelConfig, OptimConfig
from train.core.device import autocast
from train.core.model import AttnOnlyTransformer, next_token_loss

TL_MISSING = "TransformerLens not installed"


def random_batch(batch: int, n_ctx: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n_ctx), generator=g).to(device)


# -- model FLOPs -------------------------------------------------------------------------------------
def flops_per_token(n_layers: int, d_model: int, n_heads: int, d_head: int, d_vocab: int, n_ctx: int) -> dict[str, int]:
    """Training FLOPs per token (formula: scripts/bench.py's docstring)."""
    he = n_heads * d_head
    n_mm = n_layers * (3 * d_model * he + he * d_model) + d_model * d_vocab
    weights = 6 * n_mm
    attention = 12 * n_layers * n_ctx * he
    return {"matmul_params": n_mm, "weights": weights, "attention": attention, "total": weights + attention}


# -- models and steps ----------------------------------------------------------------------------------
def make_model(d_model: int, n_ctx: int, device: torch.device, seed: int = 0) -> AttnOnlyTransformer:
    """2 layers, the default n_heads and vocabulary, d_head = d_model / n_heads, other settings the
    config's defaults."""
    torch.manual_seed(seed)
    n_heads = ModelConfig.n_heads
    return AttnOnlyTransformer(d_vocab=DataConfig.vocab_size, n_ctx=n_ctx, n_layers=N_LAYERS, n_heads=n_heads,
                               d_model=d_model, d_head=d_model // n_heads).to(device)


def import_transformer_lens():
    """The transformer_lens module, or None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformer_lens
    except ImportError:
        return None
    return transformer_lens


def make_tl_model(model: AttnOnlyTransformer, tl, device: torch.device):
    """TransformerLens's HookedTransformer with `model`'s config and weights (analysis/export.py)."""
    from analysis.export import transformer_lens_state

    state, cfg = transformer_lens_state(model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HookedTransformer is deprecated" (3.x)
        with contextlib.redirect_stdout(sys.stderr):
            hooked = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg, device=device.type))
    missing, unexpected = hooked.load_state_dict(state, strict=False)
    with contextlib.redirect_stdout(sys.stderr):  # "Moving model to device: ..."
        hooked = hooked.to(device)
    if unexpected or not all(k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing):
        raise RuntimeError(f"HookedTransformer weights do not match: missing {missing}, unexpected {unexpected}")
    return hooked.train()


def make_optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the config's defaults, fused on CUDA as the trainer's."""
    o = OptimConfig()
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                             fused=device.type == "cuda" or None)


def make_step(logits_of: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter],
              device: torch.device, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step on the fixed batch `tokens`, as train/loop.py Trainer.train_step without
    its scheduler and non-finite checks: autocast forward, cross-entropy, backward, clip, AdamW."""
    optimizer = make_optimizer(params, device)
    clip = OptimConfig.grad_clip

    def step() -> torch.Tensor:
        with autocast(device):
            logits = logits_of(tokens)
        loss = next_token_loss(logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        optimizer.step()
        return loss.detach()

    return step


def model_step(model: AttnOnlyTransformer, device: torch.device, tokens: torch.Tensor, forward=None):
    forward = model if forward is None else forward
    return make_step(lambda t: forward(t).logits, list(model.parameters()), device, tokens)


def tl_step(hooked, device: torch.device, tokens: torch.Tensor):
    return make_step(lambda t: hooked(t), list(hooked.parameters()), device, tokens)


def warm_up_libraries(device: torch.device) -> None:
    """A few steps of a tiny model, so that one-time costs (lazy library loads, allocator and
    thread-pool set-up) land in no size's time or memory."""
    model = make_model(16, 16, device)
    timed(model_step(model, device, random_batch(4, 16, model.d_vocab, device)), device, 3)


# -- 2. + 6. per model size ----------------------------------------------------------------------------
def bench_size(d_model: int, n_ctx: int, batch: int, device: torch.device, s: Settings, peak: float, tl) -> dict[str, Any]:
    baseline = reset_peak_memory(device)
    model = make_model(d_model, n_ctx, device)
    tokens = random_batch(batch, n_ctx, model.d_vocab, device)
    ours = model_step(model, device, tokens)
    timed(ours, device, s.warmup_steps)  # the memory of our model's training step alone
    memory = peak_memory(device, baseline)
    steps = {"ours": ours}
    row: dict[str, Any] = {"d_model": d_model, "n_ctx": n_ctx, "batch": batch, "n_layers": N_LAYERS,
                           "n_heads": model.n_heads, "d_head": model.d_head, "d_vocab": model.d_vocab,
                           "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": batch * n_ctx,
                           "flops_per_token": flops_per_token(N_LAYERS, d_model, model.n_heads, model.d_head,
                                                              model.d_vocab, n_ctx),
                           "peak_memory": memory}
    if tl is not None:
        hooked = make_tl_model(model, tl, device)  # same weights as ours at the start
        steps["transformer_lens"] = tl_step(hooked, device, tokens)
    t = time_interleaved(steps, device, s.warmup_steps, s.blocks, s.block_seconds)
    tps = {name: batch * n_ctx / sec for name, sec in t["median_seconds_per_step"].items()}
    achieved = row["flops_per_token"]["total"] * tps["ours"]
    row |= {"steps_per_block": t["steps_per_block"], "blocks": s.blocks,
            "seconds_per_step": t["median_seconds_per_step"]["ours"], "tokens_per_second": tps["ours"],
            "achieved_flops": achieved, "percent_of_peak": 100 * achieved / peak}
    if tl is None:
        row["transformer_lens"] = {"status": TL_MISSING}
    else:
        blocks = t["seconds_per_step"]
        ratios = [tl_s / ours_s for ours_s, tl_s in zip(blocks["ours"], blocks["transformer_lens"])]
        tl_achieved = row["flops_per_token"]["total"] * tps["transformer_lens"]
        row["transformer_lens"] = {"status": "measured", "tokens_per_second": tps["transformer_lens"],
                                   "seconds_per_step": t["median_seconds_per_step"]["transformer_lens"],
                                   "percent_of_peak": 100 * tl_achieved / peak,
                                   "ratio_ours_over_tl": statistics.median(ratios)}
    del steps
    return row
