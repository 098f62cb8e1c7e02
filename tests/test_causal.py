"""The causal scores (train/core/causal.py): activation and path patching, their attribution
estimates and the causal label.

Known answers on hand-built weights first (tests/handbuilt.py, and the positional impostor of
tests/test_circuits.py), then two implementations compared, then the shared short training runs."""
from __future__ import annotations

import pytest
import torch

from train.core import causal as K
from train.core import circuits as C
from train.core import metrics as M
from train.core import names as N
from train.core.callbacks import AttentionScores, RunContext, evaluate_checkpoint, prepare_callbacks
from train.core.model import AttnOnlyTransformer
from tests.handbuilt import induction_circuit, repeated_probes
from tests.test_circuits import PERIOD, hand_built, hand_probes, run_callbacks


def causal_row(model, probes, **settings) -> dict:
    return run_callbacks(model, probes, [AttentionScores(), K.CausalScores(every=1, **settings)])


def family(row: dict, metric: str) -> dict[str, float]:
    """{head or pair: value} of one per-head or per-pair metric of a row."""
    return {p[1]: v for k, v in row.items() if (p := N.parse_family_key(k)) is not None and p[0] == metric}


@pytest.fixture(scope="module")
def impostor_row():
    """The hand-built model with the positional impostor on the main probe's period."""
    return causal_row(hand_built(), hand_probes())


# -- the model's separate query/key/value inputs -----------------------------------------------------
@pytest.mark.parametrize("kw", [dict(positional="learned"), dict(positional="shortformer"),
                                dict(positional="rotary"), dict(smeared_keys=True), dict(layernorm=False)])
def test_split_inputs_give_the_layer_of_the_forward_pass(kw):
    torch.manual_seed(0)
    model = AttnOnlyTransformer(40, 24, n_layers=2, n_heads=3, d_model=24, d_head=8, **kw).eval()
    tokens = torch.randint(1, 40, (3, 20))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, return_patterns=True)
        for layer in range(2):
            x = cache.resid_pre[layer]
            per_head = x[:, None].expand(-1, 3, -1, -1)
            for inputs in ((x, x, x), (per_head, per_head, per_head), (x, per_head, x)):
                z, pattern = model.run_layer_split(layer, *inputs)
                assert (z - cache.z[layer]).abs().max() < 1e-5 and (pattern - cache.patterns[layer]).abs().max() < 1e-6
            # Keys read from another stream: the pattern moves, and only the keys' head sees it.
            other = torch.randn_like(x)
            z, pattern = model.run_layer_split(layer, x, torch.stack([other, x, x], 1), x)
            assert (pattern[:, 0] - cache.patterns[layer][:, 0]).abs().max() > 1e-3
            assert (pattern[:, 1:] - cache.patterns[layer][:, 1:]).abs().max() < 1e-6


def test_corrupted_probe_has_the_shape_and_no_repeats():
    probes = hand_probes()
    corrupted = K.corrupted_probe(probes, 7)
    assert corrupted.shape == probes.repeated.shape and (corrupted[:, 0] == probes.bos).all()
    assert torch.equal(corrupted, K.corrupted_probe(probes, 7)) and not torch.equal(corrupted, K.corrupted_probe(probes, 8))
    segments = corrupted[:, 1:].view(len(corrupted), probes.repeats, probes.period)
    assert all(len(set(s.tolist())) == probes.period for s in segments.flatten(0, 1))  # distinct within a segment
    assert set(corrupted[:, 1:].flatten().tolist()) <= set(probes.allowed.tolist())
    assert not (segments[:, 1:] == segments[:, :1]).all(-1).any()  # no segment repeats the first


def test_spearman_known_values():
    a = torch.tensor([0.1, 0.5, 0.3, 2.0])
    assert K.spearman(a, a * 10) == pytest.approx(1.0)
    assert K.spearman(a, -a) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert K.spearman(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(0.8660254)
    # float noise around 0 (below 1e-4 of the largest value) is a tie, not an order
    assert K.spearman(torch.tensor([1.0, 1e-9, -1e-9]), torch.tensor([2.0, -1e-8, 1e-8])) == pytest.approx(1.0)
    assert K.spearman(torch.zeros(3), a[:3]) != K.spearman(torch.zeros(3), a[:3])  # constant: NaN


# -- known answers on hand-built weights ------------------------------------------------------------
def test_hand_built_induction_head_is_causal_through_its_k_path(impostor_row):
    row = impostor_row
    assert family(row, N.IS_CAUSAL) == {"L0H0": 0, "L0H1": 0, "L1H0": 1, "L1H1": 0}
    assert row["causal_k_share/L1H0"] > 0.8
    assert row["activation_patching/L1H0"] > 0.3 and row["activation_patching/L0H0"] > 0.3
    # The K path from the previous-token head carries its attention and its logit; Q and V carry nothing.
    assert row["path_patching_attention_k/L1H0/L0H0"] > 0.8
    assert abs(row["path_patching_attention_q/L1H0/L0H0"]) < 0.01
    assert row["path_patching_logit_k/L1H0/L0H0"] > 3.0
    assert abs(row["path_patching_logit_q/L1H0/L0H0"]) < 0.01 and abs(row["path_patching_logit_v/L1H0/L0H0"]) < 0.01
    assert "path_patching_attention_v/L1H0/L0H0" not in row  # values do not enter the pattern
    assert row["causal_thresholds/k_share"] == 0.5 and "causal_k_share/L0H0" not in row
    # Without the impostor on the probe's period the induction head carries the repeats alone.
    alone = causal_row(hand_built(impostor_offset=9), hand_probes())
    assert alone["activation_patching/L1H0"] > 1.0 and alone["is_causal/L1H0"] == 1


def test_positional_impostor_matters_but_is_not_causal(impostor_row):
    """Behavioural on the main probe, and patching it hurts the repeats, but its attention does not
    come through the K path from a previous-token head."""
    row = impostor_row
    assert row["prefix_matching/L1H1"] > 0.9 and row["activation_patching/L1H1"] > row["causal_thresholds/min_effect"]
    assert abs(row["causal_k_share/L1H1"]) < 0.01 and row["is_causal/L1H1"] == 0
    assert all(abs(v) < 0.01 for k, v in family(row, "path_patching_attention_k").items() if k.startswith("L1H1/"))


def test_patching_a_bystander_moves_nothing(impostor_row):
    # L0H1 of the hand-built model: small random weights.
    row = impostor_row
    assert abs(row["activation_patching/L0H1"]) < 1e-3
    for metric in ("path_patching_attention_q", "path_patching_attention_k", "path_patching_logit_q",
                   "path_patching_logit_k", "path_patching_logit_v"):
        values = {k: v for k, v in family(row, metric).items() if k.endswith("/L0H1")}
        assert len(values) == 2 and all(abs(v) < 1e-3 for v in values.values()), metric
    # Zero-weight heads (uniform attention, no output) in both layers: nothing at all.
    model = induction_circuit(d_vocab=24, n_ctx=32, n_heads=2)
    row = causal_row(model, repeated_probes(24, 7, 4))
    assert row["is_causal/L1H0"] == 1 and row["causal_k_share/L1H0"] > 0.8
    for head in ("L0H1", "L1H1"):
        assert abs(row[f"activation_patching/{head}"]) < 1e-6
        assert all(abs(v) < 1e-6 for k, v in row.items() if k.startswith("path_patching") and head in k), head


def test_exact_and_attribution_patching_agree():
    # The hand-built model (near-hard attention, so the first-order estimates are far too small in
    # size): the same order of heads and the same top pair.
    row = causal_row(hand_built(impostor_offset=9), hand_probes())
    assert row["attribution_agreement/activation"] > 0.75
    assert row["attribution_agreement/path_k"] == pytest.approx(1.0)
    for metric in ("path_patching_attention_k", "path_patching_logit_k"):
        exact, estimate = family(row, metric), family(row, N.attribution(metric))
        assert max(exact, key=exact.get) == max(estimate, key=estimate.get) == "L1H0/L0H0"
    # The value path into the last layer without norms is linear: the estimate is exact.
    exact, estimate = family(row, "path_patching_logit_v"), family(row, "attribution_path_patching_logit_v")
    assert all(estimate[k] == pytest.approx(v, abs=1e-6) for k, v in exact.items())
    # A nearly linear model (small random weights, no norms): values close, ranks equal.
    torch.manual_seed(1)
    model = AttnOnlyTransformer(16, 32, n_layers=2, n_heads=2, d_model=64, d_head=32, layernorm=False, init_std=0.1)
    row = causal_row(model.eval(), hand_probes())
    agreement = [v for k, v in row.items() if k.startswith(N.ATTRIBUTION_AGREEMENT + "/")]
    assert len(agreement) == 6 and min(agreement) > 0.9
    for metric in ("activation_patching", "path_patching_attention_k", "path_patching_attention_q",
                   "path_patching_logit_k", "path_patching_logit_v"):
        exact, estimate = family(row, metric), family(row, N.attribution(metric))
        scale = max(abs(v) for v in exact.values())
        assert scale > 0 and all(abs(estimate[k] - v) < 0.2 * scale for k, v in exact.items()), metric


# -- two implementations compared; other models ---------------------------------------------------
def test_activation_patching_is_the_z_hook_replacement_head_by_head():
    model, probes = hand_built(), hand_probes()
    corrupted = K.corrupted_probe(probes, 2718)
    with torch.no_grad():
        logits, clean = model.run_with_cache(probes.repeated)
        _, bad = model.run_with_cache(corrupted)
        base = K.repeat_losses(logits, probes.repeated, PERIOD, 1)
        batched = K.activation_patching(model, probes.repeated, clean, bad.z, PERIOD, base)
        for l in range(2):
            for h in range(2):
                patched = C.ablated_logits(model, probes.repeated, [(l, h)], bad.z)
                assert batched[l, h] == pytest.approx(float(K.repeat_losses(patched, probes.repeated, PERIOD, 1) - base),
                                                      abs=1e-5)


def test_batched_path_patching_is_the_pair_by_pair_patch():
    """A 3-layer random model with norms: every (later, earlier) pair, input and measure of the
    batched implementation against one patched forward pass per pair, and the K share against the
    previous-token heads patched together."""
    torch.manual_seed(3)
    model = AttnOnlyTransformer(16, 32, n_layers=3, n_heads=2, d_model=32, d_head=8, init_std=0.3).eval()
    probes = hand_probes()
    tokens, mask = probes.repeated, M.prefix_matching_mask(probes.repeated)
    previous = torch.tensor([[True, False], [False, True], [False, False]])
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        _, bad = model.run_with_cache(K.corrupted_probe(probes, 2718))
        drops, share = K.path_patching(model, tokens, clean, bad, PERIOD, mask, previous)

        def patched(l2, delta, c):
            x = clean.resid_pre[l2]
            z0, pattern0 = model.run_layer_split(l2, x, x, x)
            z, pattern = model.run_layer_split(l2, *(x + delta if c == i else x for i in "qkv"))
            prefix0, prefix = (M.masked_attention_score(p[None], mask)[0] for p in (pattern0, pattern))
            return z0, z, prefix0, prefix

        def logit(l2, z):
            return float(K.correct_logits(model.run_from(l2, clean.resid_pre[l2], z=z).logits, tokens, PERIOD, 1))

        for l2 in (1, 2):
            for l1 in range(l2):
                for h1 in range(2):
                    delta = torch.einsum("bpe,ed->bpd", bad.z[l1][:, h1] - clean.z[l1][:, h1], model.blocks[l1].attn.W_O[h1])
                    for c in "qkv":
                        z0, z, prefix0, prefix = patched(l2, delta, c)
                        for h2 in range(2):
                            one = z0.clone()
                            one[:, h2] = z[:, h2]
                            assert drops[("logit", c)][(l2, l1)][h2, h1] == pytest.approx(logit(l2, z0) - logit(l2, one), abs=1e-4)
                            if c != "v":
                                assert drops[("attention", c)][(l2, l1)][h2, h1] == pytest.approx(float(prefix0[h2] - prefix[h2]), abs=1e-5)
            joint = sum(torch.einsum("bpe,ed->bpd", bad.z[l][:, h] - clean.z[l][:, h], model.blocks[l].attn.W_O[h])
                        for l, h in ((0, 0), (1, 1)) if l < l2)
            _, _, prefix0, prefix = patched(l2, joint, "k")
            assert share[l2] == pytest.approx((prefix0 - prefix) / prefix0, abs=1e-5)
        assert torch.isnan(share[0]).all()


def test_hugging_face_models_get_activation_patching_with_one_note():
    from train.core.adapter import adapt
    from tests.test_series import tiny_family

    probes = repeated_probes(64, 8, 3, n=4)
    ctx = RunContext(adapt(tiny_family("gpt2", 0)), probes)
    row = evaluate_checkpoint(prepare_callbacks({"attention": AttentionScores(), "causal": K.CausalScores(every=1)}, ctx),
                              ctx)
    assert len(ctx.notes) == 1 and "callbacks.causal gives activation patching only" in ctx.notes[0]
    assert len(family(row, N.ACTIVATION_PATCHING)) == len(family(row, N.attribution(N.ACTIVATION_PATCHING))) == 8
    assert not any(k.startswith(("path_patching", N.IS_CAUSAL, N.CAUSAL_K_SHARE)) for k in row)
    # the z hook's full forward pass against the per-head replacement of train/core/circuits.py
    corrupted = K.corrupted_probe(probes, 2718)
    with torch.no_grad():
        logits = ctx.model(probes.repeated).logits
        _, bad = ctx.model.run_with_cache(corrupted)
        base = float(K.repeat_losses(logits, probes.repeated, 8, 1))
        patched = C.ablated_logits(ctx.model, probes.repeated, [(1, 2)], bad.z)
    assert row["activation_patching/L1H2"] == pytest.approx(float(K.repeat_losses(patched, probes.repeated, 8, 1)) - base,
                                                             abs=1e-5)


def test_the_default_callbacks_leave_causal_out_and_with_definitions_adds_it():
    from tests.helpers import compose_config

    assert "causal" not in compose_config().callbacks
    cfg = compose_config(["callbacks=with_definitions"])
    assert cfg.callbacks.causal.every == 10 and "ablation" in cfg.callbacks


# -- real short trainings --------------------------------------------------------------------------
@pytest.mark.slow
def test_recompute_labels_the_two_layer_runs_induction_heads_late(two_layer_run, one_layer_run, tmp_path):
    from analysis.recompute import main
    from train.core.rundir import read_metrics

    runs = {}
    for name, run in (("2L", two_layer_run), ("1L", one_layer_run)):
        out = tmp_path / f"{name}.jsonl"
        assert main([str(run), "--callbacks", "causal", "--out", str(out)]) == 0
        runs[name] = [r for r in read_metrics(out) if any(k.startswith(N.IS_CAUSAL) for k in r)]
    two, one = runs["2L"], runs["1L"]
    total = read_metrics(two_layer_run / "metrics.jsonl")[-1]["tokens"]
    labelled = [r for r in two if any(family(r, N.IS_CAUSAL).values())]
    # Late: none at the first scored checkpoints, some layer-1 head from past 40% of the run on.
    assert len(two) >= 4 and labelled and labelled[0]["tokens"] > 0.4 * total and labelled[-1] is two[-1]
    last = family(two[-1], N.IS_CAUSAL)
    assert all(head.startswith("L1") for head, v in last.items() if v)
    assert all(v == 0 for r in one for k, v in r.items() if k.startswith(N.IS_CAUSAL))
    assert not any(k.startswith("path_patching") for r in one for k in r)
    assert two[-1]["attribution_agreement/path_k"] > 0.5
