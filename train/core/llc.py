"""Local learning coefficient (LLC) of a checkpoint, estimated by SGLD sampling with devinterp.

Definition (Lau et al. 2023; used by Hoogland et al. 2024). With w* the checkpoint's parameters
and L(w) the mean per-prediction loss (cross-entropy of each next-token prediction by default),

    LLC = n_beta * ( E_w[ L(w) ] - L(w*) ),

the expectation under the localized tempered posterior p(w) ~ exp(-n_beta L(w) - localization/2
|w - w*|^2), sampled by SGLD (devinterp's sgmcmc_sgld) on a deep copy of the model:

    w <- w - lr/2 * ( n_beta * grad L_B(w) + localization * (w - w*) ) + N(0, lr)

where L_B is the mean loss of one batch of `batch_size` rows of `tokens`. The rows are shuffled once
(seeded) and that order is cycled; every chain sees the same batches and differs only in its noise
(chain c is seeded with seed + c). Per chain c:

    llc_c = n_beta * ( mean of L_B(w_t) over the num_draws steps after num_burnin_steps burn-in
                       steps  -  L(w*) )

with L(w*) the mean of L_B(w*) over one pass through the cycle's len(tokens) // batch_size
batches (devinterp's init loss; rows past a multiple of batch_size are never used). Burn-in steps
are left out (devinterp's own `compute_llc` averages over them too). When num_draws is a multiple
of len(tokens) // batch_size, the draws see every batch equally often, as L(w*) does.

Default n_beta (n_beta=None): n / ln(n) with n = batch_size * (sequence length - 1), the number
of predictions whose mean is one SGLD step's loss (so that n L_B is the batch's total negative
log-likelihood): Lau et al.'s n beta* = n / log n with n counted in predictions per SGLD batch.
devinterp's `default_nbeta` (rows per step / ln rows) is the same rule when a row holds one
prediction, as in a regression.

Results: `per_chain` holds every chain's llc_c (NaN for a diverged one); a chain diverged when
any of its losses was NaN or Inf (devinterp then stops it). `mean` and `std` (population std,
ddof 0, as devinterp's llc_std) are over the other chains, NaN when none is left;
`diverged_chains` says how many were left out. Known value: d/2 for a regular model with d
parameters at its optimum (tests/test_llc.py checks it on a linear regression).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import random
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (model, rows) -> [batch, seq - 1]


def default_n_beta(batch_size: int, seq_len: int) -> float:
    """n / ln(n), n = batch_size * (seq_len - 1) predictions per SGLD step (module docstring)."""
    n = batch_size * (seq_len - 1)
    if n < 2:
        raise ValueError(f"the default n_beta needs at least 2 predictions per SGLD batch, got {n}")
    return n / math.log(n)


def check_settings(lr: float, n_beta: float | None, localization: float, num_chains: int, num_draws: int,
                   num_burnin_steps: int, batch_size: int) -> None:
    """Raise ValueError (one line) for settings SGLD cannot run with."""
    bad = [f"{name}={value}" for name, value, ok in (
        ("lr", lr, lr > 0), ("n_beta", n_beta, n_beta is None or n_beta > 0),
        ("localization", localization, localization >= 0), ("num_chains", num_chains, num_chains >= 1),
        ("num_draws", num_draws, num_draws >= 1), ("num_burnin_steps", num_burnin_steps, num_burnin_steps >= 0),
        ("batch_size", batch_size, batch_size >= 1)) if not ok]
    if bad:
        raise ValueError(f"LLC settings out of range: {', '.join(bad)} (lr, n_beta > 0; localization, "
                         "num_burnin_steps >= 0; num_chains, num_draws, batch_size >= 1)")


def prediction_losses(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1]: the model's loss on each next-token prediction (train/core/model.py
    next_token_loss, one per prediction)."""
    from train.core.model import next_token_loss

    return next_token_loss(model(tokens).logits, tokens, "none")


def _rng_state(device: str) -> tuple:
    """The global random states devinterp reseeds (CUDA's only when sampling there)."""
    cuda = torch.cuda.get_rng_state_all() if device.startswith("cuda") else None
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def estimate_llc(model: torch.nn.Module, tokens: torch.Tensor, *, lr: float, n_beta: float | None,
                 localization: float, num_chains: int, num_draws: int, num_burnin_steps: int,
                 batch_size: int, seed: int, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """The LLC of `model` at its current parameters on the rows of `tokens` [n_rows, seq_len]
    (definition: module docstring). `loss_fn(model, rows)` gives the per-prediction loss
    [batch, seq_len - 1] (default: prediction_losses). The model is not changed (SGLD runs on a deep
    copy) and the global random states are restored afterwards; the same seed gives the same
    result. Returns {"mean", "std", "per_chain", "diverged_chains", "n_beta", "init_loss",
    "loss_trace" ([chain][draw] mean batch loss)}; warns in one line when more than half the
    chains diverged."""
    from datasets import Dataset
    from devinterp.slt.sampling import sample

    check_settings(lr, n_beta, localization, num_chains, num_draws, num_burnin_steps, batch_size)
    tokens = torch.as_tensor(tokens).detach().cpu()
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [rows, seq_len >= 2], got shape {tuple(tokens.shape)}")
    if not 1 <= batch_size <= tokens.shape[0]:
        raise ValueError(f"batch_size must lie in 1..{tokens.shape[0]} (the number of rows), got {batch_size}")
    if n_beta is None:
        n_beta = default_n_beta(batch_size, tokens.shape[1])
    device = str(next(model.parameters()).device)
    work = copy.deepcopy(model).requires_grad_(True)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    state = _rng_state(device)
    try:
        with tempfile.TemporaryDirectory(prefix="llc_") as tmp, torch.enable_grad(), \
                warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            tree = sample(work, dataset, {}, lr=lr, n_beta=n_beta, localization=localization,
                          num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
                          batch_size=batch_size, num_init_loss_batches=tokens.shape[0] // batch_size,
                          init_seed=seed, device=device, output_path=Path(tmp) / "samples.zarr",
                          loss_fn=loss_fn or prediction_losses)
            ds = tree.dataset
            draws = ds["sampling_loss"].values.astype(np.float64)  # [chain, draw, batch, pos]
            init_loss = float(ds["init_loss"].values.astype(np.float64).mean())
            tree.close()
    finally:
        _set_rng_state(state)
    for w in caught:  # a diverged chain is counted below; anything else is passed on
        if not str(w.message).startswith("Chain failed"):
            warnings.warn(w.message, w.category, stacklevel=2)
    finite = np.isfinite(draws).reshape(num_chains, -1).all(axis=1)
    trace = draws.mean(axis=(2, 3))  # [chain, draw]
    per_chain = n_beta * (trace.mean(axis=1) - init_loss)
    per_chain[~finite] = float("nan")
    kept = per_chain[finite]
    diverged = int((~finite).sum())
    if diverged * 2 > num_chains:
        warnings.warn(f"LLC: {diverged} of {num_chains} SGLD chains diverged (NaN/Inf loss) at lr={lr}, "
                      f"localization={localization}, n_beta={n_beta:.4g}; lower lr or raise localization",
                      RuntimeWarning, stacklevel=2)
    return {"mean": float(kept.mean()) if kept.size else float("nan"),
            "std": float(kept.std()) if kept.size else float("nan"),
            "per_chain": [float(x) for x in per_chain],
            "diverged_chains": diverged,
            "n_beta": float(n_beta),
            "init_loss": init_loss,
            "loss_trace": trace.tolist()}
