"""The local learning coefficient (train/core/llc.py, the `llc` callback, analysis/llc_calibrate.py).

Known answer first: a regular model with d parameters at its optimum has LLC d/2."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from train.core import names as N
from train.core.callbacks import LLCEstimate, RunContext, evaluate_checkpoint, prepare_callbacks
from train.core.language import RepeatsLanguage
from train.core.probes import Probes, repeated_random_tokens
from train.core.llc import default_n_beta, estimate_llc
from train.core.model import AttnOnlyTransformer


@pytest.fixture(autouse=True)
def _one_thread():
    """SGLD on these tiny models is many small ops: one thread is as fast, and is not slowed down
    by other processes on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- known answer: linear regression ----------------------------------------------------------------
def regression(d: int, n: int = 2000, sigma: float = 1.0, seed: int = 0):
    """A well-specified linear regression y = X w0 + N(0, sigma^2) with its least-squares model,
    rows for estimate_llc ([i, i]: one "prediction" per row, of sample i) and the per-sample
    Gaussian negative log-likelihood (constant left out) as the loss."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, generator=g) + sigma * torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y[:, None]).solution.T)

    def loss_fn(m, rows):
        i = rows[:, 1]
        return ((y[i] - m(X[i])[:, 0]) ** 2 / (2 * sigma**2))[:, None]

    return model, torch.arange(n)[:, None].repeat(1, 2), loss_fn


# Settings for the known answer. Full batch (batch_size = n): the SGLD loss is L_n itself. n_beta:
# the default rule, n / ln n = 263 for n = 2000. The loss is exactly quadratic with Hessian
# H ~ I / sigma^2, so the posterior is Gaussian with precision A = n_beta H + localization and
# n_beta (E L - L*) = 1/2 sum n_beta h / (n_beta h + localization) ~ d/2 (-0.4% at localization 1).
# lr * A ~ 0.1: the discretization inflates the variance by 1 / (1 - lr A / 4), about +2.5%, and
# the loss decorrelates in ~20 steps, so 4 x 1000 draws leave a Monte Carlo error of ~5% at d = 4.
REGRESSION = dict(lr=4e-4, n_beta=None, localization=1.0, num_chains=4, num_draws=1000, num_burnin_steps=100,
                  batch_size=2000, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("d", [4, 16])
def test_llc_of_a_regular_model_is_half_its_dimension(d):
    model, rows, loss_fn = regression(d)
    r = estimate_llc(model, rows, loss_fn=loss_fn, **REGRESSION)
    assert r["n_beta"] == pytest.approx(2000 / math.log(2000))
    assert r["diverged_chains"] == 0
    assert r["mean"] == pytest.approx(d / 2, rel=0.2), r


def test_default_n_beta_counts_predictions():
    assert default_n_beta(16, 64) == pytest.approx(16 * 63 / math.log(16 * 63))
    assert default_n_beta(100, 2) == pytest.approx(100 / math.log(100))  # devinterp's default_nbeta


# -- a tiny real model --------------------------------------------------------------------------------
V, CTX = 16, 24
TINY = dict(lr=1e-3, n_beta=None, localization=100.0, num_chains=2, num_draws=20, num_burnin_steps=10,
            batch_size=8, seed=3)


def tiny_model(steps: int = 30) -> tuple[AttnOnlyTransformer, torch.Tensor]:
    """A 2-layer model trained a few dozen steps on the repeats language, and held-out sequences."""
    data = RepeatsLanguage(vocab_size=V, n_ctx=CTX, min_period=3, max_period=8)
    torch.manual_seed(0)
    model = AttnOnlyTransformer(V, CTX, n_layers=2, n_heads=2, d_model=16, d_head=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        tokens = data.batch(step, 16)
        loss = torch.nn.functional.cross_entropy(model(tokens).logits[:, :-1].transpose(1, 2), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data.heldout(32, 0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.mark.slow
def test_estimate_on_a_tiny_model_is_finite_repeatable_and_leaves_the_model(tiny):
    model, tokens = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = estimate_llc(model, tokens, **TINY)
    b = estimate_llc(model, tokens, **TINY)
    assert a == b  # same seed: identical (per chain, trace and all)
    assert math.isfinite(a["mean"]) and math.isfinite(a["std"]) and a["diverged_chains"] == 0
    assert len(a["per_chain"]) == 2 and all(math.isfinite(x) for x in a["per_chain"])
    assert a["n_beta"] == pytest.approx(default_n_beta(8, CTX))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    other = estimate_llc(model, tokens, **(TINY | {"seed": 4}))
    assert other["per_chain"] != a["per_chain"]


@pytest.mark.slow
def test_diverged_chains_are_counted_and_warned_about(tiny):
    model, tokens = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate_llc(model, tokens, **(TINY | {"lr": 1e6, "localization": 0.0}))
    assert r["diverged_chains"] == 2
    assert all(math.isnan(x) for x in r["per_chain"]) and math.isnan(r["mean"])
    lines = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert len(lines) == 1 and "lower lr" in lines[0] and "\n" not in lines[0]
    assert not any(str(w.message).startswith("Chain failed") for w in caught)


# -- the callback, through the path training uses ----------------------------------------------------
def hand_probes(heldout: torch.Tensor) -> Probes:
    g = torch.Generator().manual_seed(5)
    allowed = torch.arange(1, V)
    return Probes(repeated_random_tokens(4, 5, 3, allowed, g), 5, 3, allowed.clone(), heldout, allowed)


@pytest.mark.slow
def test_callback_writes_the_llc_keys(tiny):
    model, tokens = tiny
    cb = LLCEstimate(every=1, n_sequences=16, **TINY)
    ctx = RunContext(model, hand_probes(tokens))
    row = evaluate_checkpoint(prepare_callbacks({"llc": cb}, ctx), ctx)  # under no_grad, as in training
    for key in ("mean", "std", "per_chain", "diverged_chains", "settings/lr", "settings/n_beta",
                "settings/n_sequences"):
        assert f"{N.LLC}/{key}" in row, key
    assert math.isfinite(row["llc/mean"]) and row["llc/diverged_chains"] == 0 and len(row["llc/per_chain"]) == 2
    assert row["llc/settings/lr"] == TINY["lr"] and row["llc/settings/n_sequences"] == 16
    assert row["llc/settings/n_beta"] == pytest.approx(default_n_beta(8, CTX))
    assert row["llc/mean"] == estimate_llc(model, tokens[:16], **TINY)["mean"]


def test_settings_out_of_range_are_refused_in_one_line(tiny):
    model, tokens = tiny
    with pytest.raises(ValueError, match="lr=0") as e:
        estimate_llc(model, tokens, **(TINY | {"lr": 0}))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_chains=0"):
        LLCEstimate(num_chains=0)


def test_callback_needs_a_batch_of_heldout_sequences(tiny):
    from train.core.config import ConfigError

    model, tokens = tiny
    ctx = RunContext(model, hand_probes(tokens))
    with pytest.raises(ConfigError, match="callbacks.llc: batch_size=8"):
        prepare_callbacks({"llc": LLCEstimate(batch_size=8, n_sequences=4)}, ctx)


# -- the calibration command -------------------------------------------------------------------------
@pytest.mark.slow
def test_calibrate_prints_a_table_for_every_combination(tmp_path, capsys):
    from analysis.llc_calibrate import main
    from tests.helpers import train_run
    from tests.presets import EXTRA_CALLBACKS_OFF, SIX_STEPS

    run = train_run(tmp_path / "run", [*SIX_STEPS, *EXTRA_CALLBACKS_OFF])
    capsys.readouterr()
    args = [str(run), "--step", "6", "--lr", "1e-3", "1e6", "--localization", "100", "--draws", "4", "--chains",
            "2", "--burnin", "2", "--batch-size", "4", "--n-sequences", "8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split()[:3] == ["lr", "localization", "n_beta"] and len(lines) == 4
    ok, blown = lines[2].split(), lines[3].split()
    assert float(ok[0]) == 1e-3 and int(ok[5]) == 0 and math.isfinite(float(ok[3]))
    assert float(blown[0]) == 1e6 and int(blown[5]) == 2
    assert main([str(run), "--step", "999999"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and main([str(run), "--localization", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and main([str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: no run directory at {tmp_path / 'none'}"]


def test_with_llc_option_is_the_defaults_plus_llc():
    from omegaconf import OmegaConf

    from tests.helpers import compose_config

    default = OmegaConf.to_container(compose_config().callbacks, resolve=True)
    with_llc = OmegaConf.to_container(compose_config(["callbacks=with_llc"]).callbacks, resolve=True)
    assert list(with_llc) == [*default, "llc"]
    assert {k: v for k, v in with_llc.items() if k != "llc"} == default
    assert with_llc["llc"]["_target_"] == "train.core.callbacks.LLCEstimate"
