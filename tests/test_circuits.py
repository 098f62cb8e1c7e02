"""Mechanistic circuit scores, behavioral vs mechanistic classification, probe robustness,
ablations and the recompute command (train/core/circuits.py, the circuit callbacks, analysis/recompute.py).

Hand-built weights with known answers first, then the shared short training runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from train.core import circuits as C
from train.core import names as N
from train.core.callbacks import (AttentionScores, CircuitScores, CopyingScores, HeadAblations,
                             InductionClassification, ProbeRobustness, RunContext, evaluate_checkpoint,
                             prepare_callbacks)
from train.core.config import ConfigError
from train.core.probes import Probes, repeated_random_tokens
from train.core.model import AttnOnlyTransformer
from train.core.rundir import list_checkpoints, read_metrics
from train.core.runs import Run

# -- a hand-built 2-layer model ---------------------------------------------------------------
# Residual stream (d_model 64): token one-hots in dims 0..15 (vocab 16, BOS = 0), position
# one-hots in 16..47 (n_ctx 32), and a "previous token" subspace in 48..63.
V, N_CTX, D, E = 16, 32, 64, 32
TOK, POS, PREV = 0, 16, 48
PERIOD, REPEATS = 5, 4  # the main probe; the impostor's offset is tuned to it
SHARP = 60.0  # attention logits SHARP / sqrt(d_head) ~ 10.6: near-hard attention


def hand_built(impostor_offset: int = PERIOD - 1) -> AttnOnlyTransformer:
    """L0H0: previous-token head (positional QK), copies the token into PREV.
    L0H1: small random weights (a bystander).
    L1H0: induction head: query = own token, key = PREV (K-composition with L0H0), OV copies.
    L1H1: impostor: attends to the fixed offset i - impostor_offset by position only, OV copies."""
    torch.manual_seed(0)
    m = AttnOnlyTransformer(V, N_CTX, n_layers=2, n_heads=2, d_model=D, d_head=E, layernorm=False)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for t in range(V):
            m.W_E[t, TOK + t] = 1.0
            m.W_U[TOK + t, t] = 1.0
        for i in range(N_CTX):
            m.W_pos[i, POS + i] = 1.0
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        for i in range(N_CTX):  # L0H0: query position i -> key position i - 1
            a0.W_K[0, POS + i, i] = 1.0
            if i >= 1:
                a0.W_Q[0, POS + i, i - 1] = SHARP
        for t in range(V):
            a0.W_V[0, TOK + t, t] = 1.0
            a0.W_O[0, t, PREV + t] = 1.0
        for name in ("W_Q", "W_K", "W_V"):
            getattr(a0, name)[1] = 0.01 * torch.randn(D, E)
        a0.W_O[1] = 0.01 * torch.randn(E, D)
        for t in range(V):  # L1H0: query token t matches keys whose previous token is t
            a1.W_Q[0, TOK + t, t] = SHARP
            a1.W_K[0, PREV + t, t] = 1.0
        for i in range(N_CTX):  # L1H1: query position i -> key position i - offset
            a1.W_K[1, POS + i, i] = 1.0
            if i >= impostor_offset:
                a1.W_Q[1, POS + i, i - impostor_offset] = SHARP
        for h in (0, 1):  # both layer-1 heads copy the attended token to the output
            for t in range(V):
                a1.W_V[h, TOK + t, t] = 1.0
                a1.W_O[h, t, TOK + t] = 5.0
    return m.eval()


def hand_probes() -> Probes:
    g = torch.Generator().manual_seed(5)
    allowed = torch.arange(1, V)
    repeated = repeated_random_tokens(16, PERIOD, REPEATS, allowed, g)
    heldout = torch.cat([torch.zeros(64, 1, dtype=torch.long), torch.randint(1, V, (64, N_CTX - 1), generator=g)], 1)
    return Probes(repeated, PERIOD, REPEATS, allowed.clone(), heldout, allowed)


def run_callbacks(model, probes, callbacks) -> dict:
    """One checkpoint's row, through the code training uses (callbacks named by their class)."""
    ctx = RunContext(model, probes)
    return evaluate_checkpoint(prepare_callbacks({type(cb).__name__: cb for cb in callbacks}, ctx), ctx)


def hand_pipeline(model=None) -> dict:
    robust = ProbeRobustness(variants=[[3, 8], [7, 4], [10, 3]], heldout_segments=[[6, 5]], n_probes=16)
    return run_callbacks(model or hand_built(), hand_probes(),
                         [AttentionScores(), CopyingScores(), CircuitScores(), robust, InductionClassification()])


@pytest.fixture(scope="module")
def hand_row():
    return hand_pipeline()


def test_hand_built_behaves_as_designed(hand_row):
    # The construction itself: L0H0 attends to the previous token, both layer-1 heads prefix-match
    # on the main probe and copy.
    assert hand_row["previous_token/L0H0"] > 0.95
    assert hand_row["previous_token/L0H1"] < 0.2
    assert hand_row["prefix_matching/L1H0"] > 0.95
    assert hand_row["prefix_matching/L1H1"] > 0.95
    assert hand_row["copying/L1H0"] > 0.9 and hand_row["copying/L1H1"] > 0.9


def test_hand_built_induction_head_is_behavioral_and_mechanistic(hand_row):
    assert hand_row["is_behavioral/L1H0"] == 1
    assert hand_row["is_mechanistic/L1H0"] == 1
    # K-composition with the previous-token head far above the random baseline; a perfectly
    # aligned rank-16 circuit scores 1/sqrt(16) = 0.25 before the baseline (~1/sqrt(d_model)).
    base = hand_row["composition_baseline/k"]
    assert base == pytest.approx(1 / math.sqrt(D), rel=0.1)
    k = hand_row["k_composition/L1H0/L0H0"]
    assert k == pytest.approx(0.25 - base, abs=0.01)
    assert k > 0.1
    # Orientation check: the same pair shows no Q- or V-composition (the product is exactly 0).
    assert hand_row["q_composition/L1H0/L0H0"] == pytest.approx(-hand_row["composition_baseline/q"], abs=1e-4)
    assert hand_row["v_composition/L1H0/L0H0"] == pytest.approx(-hand_row["composition_baseline/v"], abs=1e-4)
    assert hand_row["ov_copying/L1H0"] > 0.95
    assert hand_row["qk_prefix_matching/L1H0"] > 0.9
    assert hand_row["k_composition_prev_token/L1H0"] == pytest.approx(k)
    assert hand_row["previous_token_heads"] == ["L0H0"]


def test_hand_built_impostor_is_behavioral_only_and_fragile(hand_row):
    assert hand_row["is_behavioral/L1H1"] == 1
    assert hand_row["is_mechanistic/L1H1"] == 0
    # Positional attention only: no K-composition (below the baseline), no QK prefix-matching trace.
    assert hand_row["k_composition/L1H1/L0H0"] < 0
    assert hand_row["qk_prefix_matching/L1H1"] <= 0
    assert hand_row["ov_copying/L1H1"] > 0.95  # it does copy
    assert hand_row["induction_heads/behavioral"] == 2
    assert hand_row["induction_heads/mechanistic"] == 1
    assert hand_row["induction_heads/both"] == 1
    assert hand_row["induction_heads/disagree"] == 1
    assert hand_row["induction_heads/disagreeing"] == ["L1H1"]
    assert hand_row["induction_heads/both_heads"] == ["L1H0"]
    # Robustness: the impostor collapses on every other period; the real induction head does not.
    for name in ("p3x8", "p7x4", "p10x3", "text_p6x5"):
        assert hand_row[f"prefix_matching_{name}/L1H1"] < 0.3, name
        assert hand_row[f"prefix_matching_{name}/L1H0"] > 0.8, name
    assert hand_row["prefix_matching_min/L1H1"] < 0.3 < 0.9 < hand_row["prefix_matching_max/L1H1"]
    assert hand_row["probe_fragile/L1H1"] == 1
    assert hand_row["probe_fragile/L1H0"] == 0


def test_thresholds_are_written_and_rows_are_json(hand_row):
    for name in ("prefix_matching", "copying", "previous_token", "k_composition", "ov_copying", "qk_prefix_matching"):
        assert f"induction_thresholds/{name}" in hand_row
    text = json.dumps(hand_row, allow_nan=False)  # no NaN / tensors anywhere
    assert json.loads(text)["is_mechanistic/L1H0"] == 1
    assert not any(k.startswith("qk_prefix_matching/L0") for k in hand_row)  # undefined in layer 0


def test_thresholds_change_the_labels():
    row = run_callbacks(hand_built(), hand_probes(),
                        [AttentionScores(), CopyingScores(), CircuitScores(),
                         InductionClassification(k_composition=0.2, copying=1.01)])
    assert row["induction_thresholds/k_composition"] == 0.2
    assert row["is_mechanistic/L1H0"] == 0  # 0.125 above baseline is below 0.2
    assert row["is_behavioral/L1H0"] == 0 and row["is_behavioral/L1H1"] == 0


def test_callback_order_in_the_config_does_not_matter():
    """Readers run after the callbacks they read from, whatever order they are listed in."""
    robust = lambda: ProbeRobustness(variants=[[3, 8]], heldout_segments=[], n_probes=16)  # noqa: E731
    listed = [InductionClassification(), robust(), CircuitScores(), CopyingScores(), AttentionScores()]
    reordered = run_callbacks(hand_built(), hand_probes(), listed)
    full = run_callbacks(hand_built(), hand_probes(),
                         [AttentionScores(), CopyingScores(), CircuitScores(), robust(), InductionClassification()])
    assert reordered == full
    assert reordered["is_mechanistic/L1H0"] == 1 and reordered["is_behavioral/L1H1"] == 1


def test_a_missing_need_is_refused_before_anything_runs():
    ctx = RunContext(hand_built(), hand_probes())
    with pytest.raises(ConfigError, match=r"callbacks.induction needs 'prefix_matching', which no configured"):
        prepare_callbacks({"induction": InductionClassification(), "copying": CopyingScores()}, ctx)
    with pytest.raises(ConfigError, match=r"callbacks.circuits \(every 3\) reads 'previous_token' from "
                                          r"callbacks.attention, which runs every 2"):
        prepare_callbacks({"attention": AttentionScores(every=2), "circuits": CircuitScores(every=3)}, ctx)
    with pytest.raises(ConfigError, match="both provide 'copying'"):
        prepare_callbacks({"a": CopyingScores(), "b": CopyingScores()}, ctx)
    # A cadence that divides is fine; optional inputs (the ablation's induction heads) may be
    # absent, or present at only some of the reader's checkpoints.
    prepare_callbacks({"attention": AttentionScores(every=2), "circuits": CircuitScores(every=4),
                       "ablation": HeadAblations(every=5, icl_early=5, icl_late=28)}, ctx)
    ordered = prepare_callbacks({"ablation": HeadAblations(every=10, icl_early=5, icl_late=28),
                                 "induction": InductionClassification(every=3), "attention": AttentionScores(),
                                 "copying": CopyingScores(), "circuits": CircuitScores()}, ctx)
    assert [cb.name for cb in ordered] == ["attention", "copying", "circuits", "induction", "ablation"]


def test_flattened_keys_follow_the_key_format(hand_row):
    """Every row key is a plain name, a per-head key, a per-pair key or a named part (train/core/names.py)."""
    named_parts = {N.COMPOSITION_BASELINE, N.INDUCTION_THRESHOLDS, N.INDUCTION_HEADS}
    for key in hand_row:
        parts = key.split("/")
        assert len(parts) <= 3, key
        if len(parts) == 3:
            assert N.parse_head_key("/".join(parts[:2])) and N.parse_head_name(parts[2]), key
        elif len(parts) == 2:
            assert N.parse_head_key(key) or parts[0] in named_parts, key
    assert N.head_table(hand_row, "is_behavioral") == [[0, 0], [1, 1]]
    assert isinstance(hand_row["is_behavioral/L1H0"], int) and isinstance(hand_row["copying/L1H0"], float)


# -- OV eigen-score ---------------------------------------------------------------------------
def _copy_model(sign: float, layernorm: bool = False, seed: int = 0) -> AttnOnlyTransformer:
    torch.manual_seed(seed)
    m = AttnOnlyTransformer(64, 32, n_layers=1, n_heads=1, d_model=64, d_head=64, layernorm=layernorm)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 64))
        m.blocks[0].attn.W_V[0] = q
        m.blocks[0].attn.W_O[0] = sign * q.T  # W_OV = sign * I
        m.W_U.copy_(m.W_E.T)  # unembedding = embedding: a copying OV circuit maps t to logit t
    return m


@pytest.mark.parametrize("layernorm", [False, True])
def test_ov_eigen_score_copying_anticopying(layernorm):
    assert C.ov_eigen_score(_copy_model(+1.0, layernorm))[0, 0] > 0.9
    assert C.ov_eigen_score(_copy_model(-1.0, layernorm))[0, 0] < -0.9


def test_ov_eigen_score_random_is_near_zero():
    scores = torch.cat([C.ov_eigen_score(AttnOnlyTransformer(64, 32, n_layers=2, n_heads=4, layernorm=ln)).flatten()
                        for ln in (False, True) for _ in range(4)])
    assert scores.abs().mean() < 0.2
    assert abs(float(scores.mean())) < 0.1
    assert scores.abs().max() < 0.6


# -- composition scores -----------------------------------------------------------------------
@pytest.mark.parametrize("layernorm", [False, True])
def test_composition_of_random_weights_is_near_zero(layernorm):
    model = AttnOnlyTransformer(64, 32, n_layers=3, n_heads=4, d_model=64, d_head=16, layernorm=layernorm)
    scores = C.composition_scores(model)
    raw = C.composition_scores(model, subtract_baseline=False)
    for kind in C.COMPOSITIONS:
        values = torch.cat([v.flatten() for v in scores[kind].values()])
        assert values.numel() == 3 * 16
        assert values.abs().max() < 0.04, kind
        assert abs(float(values.mean())) < 0.01, kind
        raw_values = torch.cat([v.flatten() for v in raw[kind].values()])
        assert raw_values.mean() > 0.1  # the baseline (~1/sqrt(64)) is what was removed


def test_factored_composition_matches_dense_formula():
    torch.manual_seed(1)
    model = AttnOnlyTransformer(64, 32, n_layers=2, n_heads=3, d_model=32, d_head=8, layernorm=False)
    qk1, ov0, ov1 = C.qk_circuit(model, 1), C.ov_circuit(model, 0), C.ov_circuit(model, 1)
    raw = C.composition_scores(model, subtract_baseline=False)
    for h2 in range(3):
        for h1 in range(3):
            dense = {
                "k": (qk1[h2] @ ov0[h1].T).norm() / (qk1[h2].norm() * ov0[h1].norm()),
                "q": (ov0[h1] @ qk1[h2]).norm() / (qk1[h2].norm() * ov0[h1].norm()),
                "v": (ov0[h1] @ ov1[h2]).norm() / (ov1[h2].norm() * ov0[h1].norm()),
            }
            for kind, value in dense.items():
                assert float(raw[kind][(1, 0)][h2, h1]) == pytest.approx(float(value), rel=1e-4), (kind, h2, h1)


def test_qk_trace_random_is_near_zero_and_layer0_undefined():
    values = []
    for _ in range(4):
        model = AttnOnlyTransformer(64, 32, n_layers=2, n_heads=4)
        qk = C.qk_prefix_matching_trace(model, torch.rand(2, 4))
        assert torch.isnan(qk[0]).all()
        values.append(qk[1])
    values = torch.cat(values)
    assert abs(float(values.mean())) < 0.15
    assert values.abs().max() < 0.7


# -- ablations --------------------------------------------------------------------------------
def test_partial_forward_and_ablation_match_the_model():
    model, probes = hand_built(), hand_probes()
    tokens = probes.heldout[:8]
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, model(tokens).logits)
    means = [z.mean(0, keepdim=True).expand_as(z) for z in cache.z]
    for heads in ([(1, 0)], [(0, 0)], [(0, 1), (1, 1)]):
        for repl in (None, means):
            full = C.ablated_logits(model, tokens, heads, repl)
            # from the cache: the layers before the first ablated head and its layer's queries, keys
            # and values are not recomputed, and the numbers are the full forward pass's
            assert torch.equal(C.ablated_logits(model, tokens, heads, repl, cache), full)
    assert not torch.allclose(C.ablated_logits(model, tokens, [(0, 0)]), logits, atol=1e-3)
    # Zero-ablating every head of layer 1 by hand: the logits of the residual stream after layer 0
    # plus layer 1's output bias.
    zeroed = C.ablated_logits(model, tokens, [(1, 0), (1, 1)], None, cache)
    attn = model.blocks[1].attn
    assert torch.allclose(zeroed, model.unembed(cache.resid_pre[1] + attn.b_O), atol=1e-6)


def test_ablating_the_hand_built_induction_head_hurts_the_repeats():
    probes = hand_probes()
    # The impostor's offset is moved off the probe period so that only L1H0 predicts the repeats.
    row = run_callbacks(hand_built(impostor_offset=9), probes, [HeadAblations(every=1, icl_early=5, icl_late=28)])
    clean = row["ablation/repeat_loss"]
    # Zeroing the bystander (L0H1) changes nothing; zeroing the induction head (L1H0) or the
    # previous-token head feeding it (L0H0) raises the loss on the repeated part.
    assert row["repeat_loss_zero_ablated/L0H1"] == pytest.approx(clean, abs=0.02)
    assert row["repeat_loss_zero_ablated/L1H0"] > clean + 0.2
    assert row["repeat_loss_zero_ablated/L0H0"] > clean + 0.2
    assert "repeat_loss_mean_ablated/L1H0" in row and "icl_removed_mean/L1H0" in row


def test_ablations_in_row_chunks_give_the_scores_of_one_batch(monkeypatch):
    """A large vocabulary makes the ablations run in chunks of rows (their logits within
    LOGITS_BUDGET): the same scores as one batch, up to float rounding."""
    import train.core.callbacks as callbacks

    probes = hand_probes()
    model = hand_built(impostor_offset=9)
    one = run_callbacks(model, probes, [HeadAblations(every=1, icl_early=5, icl_late=28)])
    monkeypatch.setattr(callbacks, "LOGITS_BUDGET", 3 * probes.repeated.shape[1] * model.d_vocab)  # 3 rows a chunk
    chunked = run_callbacks(model, probes, [HeadAblations(every=1, icl_early=5, icl_late=28)])
    assert set(chunked) == set(one)
    for key, value in one.items():
        assert chunked[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# -- real short trainings ---------------------------------------------------------------------
def _final_model_and_probes(run_dir):
    run = Run(run_dir)
    return run.load_model()[0], run.probes()


@pytest.mark.slow
def test_two_layer_run_has_a_behavioral_and_mechanistic_head(two_layer_run):
    rows = [r for r in read_metrics(two_layer_run / "metrics.jsonl") if "event" not in r]
    last = rows[-1]
    assert last["induction_heads/both"] >= 1
    both = last["induction_heads/both_heads"]
    assert both and all(name.startswith("L1") for name in both)
    assert rows[0]["induction_heads/both"] == 0  # not at initialisation
    for name in both:
        assert last[f"is_behavioral/{name}"] == 1 and last[f"is_mechanistic/{name}"] == 1
    # Ablations ran at their cadence, and every row has the classification.
    assert any("ablation/icl_score" in r for r in rows) and not all("ablation/icl_score" in r for r in rows)
    assert all("induction_heads/disagree" in r for r in rows)

    # Causal check on the final checkpoint: ablating the induction heads removes most of the ICL score.
    model, probes = _final_model_and_probes(two_layer_run)
    ctx = RunContext(model, probes)
    ctx.scores = {N.INDUCTION_HEADS: {"both_heads": last["induction_heads/both_heads"]}}
    cb = HeadAblations(every=1, n_heldout=None)
    cb.setup(ctx)
    with torch.no_grad():
        row = cb(ctx)
    assert row["ablation/icl_score"] < -0.5
    assert row["ablation/icl_removed_zero_induction_heads"] > 0.6
    assert row["ablation/icl_removed_mean_induction_heads"] > 0.6
    # ... far more than ablating any single layer-0 head that is not a previous-token head.
    others = [f"L0H{h}" for h in range(model.n_heads) if f"L0H{h}" not in last["previous_token_heads"]]
    for name in others:
        assert row[f"icl_removed_zero/{name}"] < 0.3


@pytest.mark.slow
def test_one_layer_run_has_no_induction_head(one_layer_run):
    rows = [r for r in read_metrics(one_layer_run / "metrics.jsonl") if "event" not in r]
    assert all(r["induction_heads/both"] == 0 and r["induction_heads/mechanistic"] == 0 for r in rows)
    assert rows[-1]["induction_heads/behavioral"] == 0
    assert not any(k.startswith("k_composition") for k in rows[-1])  # no earlier layer to compose with


@pytest.mark.slow
def test_recompute_reproduces_the_training_labels(two_layer_run, tmp_path, capsys):
    from analysis.recompute import main

    out = tmp_path / "re.jsonl"
    assert main([str(two_layer_run), "--callbacks", "circuits", "induction", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "first behavioral at" in printed
    trained = {r["step"]: r for r in read_metrics(two_layer_run / "metrics.jsonl") if "event" not in r}
    again = read_metrics(out)
    assert len(again) == len(list_checkpoints(two_layer_run))
    for r in again:
        t = trained[r["step"]]
        assert r["tokens"] == t["tokens"]
        labels = [k for k in r if k.startswith(("is_behavioral/", "is_mechanistic/"))]
        assert labels and all(r[k] == t[k] for k in labels), r["step"]
        assert r["k_composition/L1H0/L0H1"] == pytest.approx(t["k_composition/L1H0/L0H1"], abs=1e-5)
        # The chosen callbacks and those they need (attention, copying), nothing else.
        assert r["prefix_matching/L1H0"] == pytest.approx(t["prefix_matching/L1H0"], abs=1e-5)
        assert not any(k.startswith(("loss/", "icl_", "prefix_matching_min/", "ablation/")) for k in r)


def test_recompute_missing_run_is_one_line_error(tmp_path, capsys):
    from analysis.recompute import main

    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run directory") and "\n" not in err and "Traceback" not in err
