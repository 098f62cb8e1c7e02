"""The out-of-distribution suite (train/core/ood.py), its probe building blocks (train/core/probes.py)
and the reserved tokens of the embedded language (train/core/data.py).

Known answers on the hand-built model of tests/test_circuits.py (the textbook induction circuit, a
positional impostor tuned to the main probe's period, a bystander), two implementations compared
(the callback's ablation effects against a direct computation; row chunks against one batch), and
the data setting that keeps tokens out of every repeated segment."""
from __future__ import annotations

import pytest
import torch

from train.core import circuits as C
from train.core import ood as O
from train.core import probes as P
from train.core.language import RepeatsLanguage
from train.core.model import AttnOnlyTransformer, next_token_loss
from tests.test_circuits import PERIOD, V, hand_built, hand_probes, run_callbacks

RESERVED = torch.tensor([13, 14, 15])


def ood_probes() -> P.Probes:
    """The hand-built model's probes, with tokens 13..15 held out of the random probes as reserved."""
    probes = hand_probes()
    probes.allowed, probes.reserved = torch.arange(1, 13), RESERVED
    return probes


def suite(**kw) -> O.OODSuite:
    """The suite on the hand-built model's probes, whose 'training range' is the main period alone."""
    return O.OODSuite(**{"every": 1, "n_probes": 8, "min_period": PERIOD, "max_period": PERIOD} | kw)


def head(row: dict, metric: str, layer: int, h: int) -> float:
    return row[f"{metric}/L{layer}H{h}"]


# -- building blocks ------------------------------------------------------------------------------
def test_induction_targets_and_tiling_by_hand():
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 9, 5, 6]])
    # predictions at i = 4 (of 6: 5 was followed by 6 before) and i = 7 (of 6 again); 9 and the
    # second 5 are not predictable from context, nor is 5 after 9.
    assert P.induction_targets(tokens)[0].nonzero().flatten().tolist() == [4, 7]
    assert P.tiled(torch.tensor([[3, 4, 5]]), 9).tolist() == [[0, 3, 4, 5, 3, 4, 5, 3, 4]]
    g = torch.Generator().manual_seed(0)
    base = P.tiled(P.distinct_draws(4, 5, torch.arange(1, 13), g), 21)
    fuzzed, where = P.substitute(base, 6, 0.25, torch.arange(1, 13), g)
    assert (where[:, :6] == 0).all() and (where.sum(1) == 4).all()  # round(0.25 x 15) positions from 6 on
    assert torch.equal(fuzzed[~where], base[~where])
    for row, w in zip(fuzzed, where):  # substitutes: distinct tokens the row did not hold
        assert len(set(row[w].tolist())) == 4 and not set(row[w].tolist()) & set(row[~w].tolist())


def test_sets_are_built_as_documented():
    probes, length = ood_probes(), 32
    spec = O.Spec(probes, length, 8, min_period=4, max_period=6, fuzz=0.25, conflict_span=2)
    sets, skipped = O.build_sets(spec, ["short", "long", "fuzzy", "reserved", "text", "random", "conflict"], seed=1)
    by_name = {s.name: s for s in sets}
    assert skipped == {"random": "training does not repeat its own text (the run gets `text`)"}
    assert by_name["short"].tokens[:, 1:4].tolist() == by_name["short"].tokens[:, 4:7].tolist()  # period 3
    # period min(31 // 2, 12 probe tokens) = 12
    assert by_name["long"].tokens[:, 1:13].tolist() == by_name["long"].tokens[:, 13:25].tolist()
    for s in sets:
        assert s.tokens.shape == (8, length) and s.targets.any(1).all()
        assert not torch.isin(s.tokens, RESERVED).any() or s.name in ("reserved", "text")
    r = by_name["reserved"]
    assert (torch.isin(r.tokens[:, 1:1 + PERIOD], RESERVED).sum(1) == 3).all()  # min(3, ceil(5 / 2))
    assert torch.equal(r.queries, torch.isin(r.tokens, RESERVED))
    assert torch.isin(r.tokens[:, 1:][r.targets], RESERVED).all()
    c = by_name["conflict"]  # 2 blocks [A][B][A][C][A][C] of 2 tokens: the predictions at 10 and 22
    assert c.targets[0].nonzero().flatten().tolist() == [10, 22]
    assert torch.equal(c.tokens[:, 11], c.tokens[:, 7]) and torch.equal(c.alternatives[:, 10], c.tokens[:, 3])
    assert c.recent[0, 10].nonzero().flatten().tolist() == [7] and c.first[0, 10].nonzero().flatten().tolist() == [3]
    # Each set draws from its own generator: the same tokens whichever others are built.
    again, _ = O.build_sets(spec, ["conflict"], seed=1)
    assert torch.equal(again[0].tokens, c.tokens)
    with pytest.raises(ValueError, match="unknown OOD set"):
        O.OODSuite(sets=["shrot"])


# -- known answers on hand-built weights --------------------------------------------------------
@pytest.fixture(scope="module")
def hand_rows():
    """The suite on the hand-built model with the impostor tuned to the main period (offset 4) and
    moved off every set's period (offset 6: 7 is no multiple of the periods 4, 5, 15)."""
    return {offset: run_callbacks(hand_built(impostor_offset=offset), ood_probes(), [suite()]) for offset in (4, 6)}


def test_impostor_loses_its_effect_off_its_period_and_the_induction_head_keeps_it(hand_rows):
    tuned, off = hand_rows[4], hand_rows[6]
    for s in ("short", "long", "conflict"):  # periods other than the impostor's offset + 1
        for kind in ("zero", "mean"):
            assert head(tuned, f"ood_ablation_{kind}_{s}", 1, 1) < 0.05  # it copies the wrong token: no help
            assert head(tuned, f"ood_ablation_{kind}_{s}", 1, 0) > 1.0
        assert head(tuned, f"ood_prefix_matching_{s}", 1, 0) > 0.95
        assert head(tuned, f"ood_prefix_matching_{s}", 1, 1) < 0.1
    assert head(tuned, "ood_prefix_matching_fuzzy", 1, 1) > 0.5  # on its own period it still matches
    for s in ("short", "long", "fuzzy", "reserved", "text", "conflict"):
        # Alone (the impostor off every period), the induction head carries every set, reserved
        # tokens included; the bystander L0H1 moves nothing.
        for kind in ("zero", "mean"):
            assert head(off, f"ood_ablation_{kind}_{s}", 1, 0) > 1.0, s
            assert abs(head(off, f"ood_ablation_{kind}_{s}", 0, 1)) < 0.02, s
            assert abs(head(tuned, f"ood_ablation_{kind}_{s}", 0, 1)) < 0.02, s
    assert head(off, "ood_conflict_recent", 1, 0) == pytest.approx(0.5, abs=0.01)  # both copies alike
    assert "ood_conflict_recent/L0H0" not in off  # the previous-token head attends to neither


def test_effects_equal_a_direct_computation():
    """The callback's effects (from the cache, one batch of all sets) against the full forward pass
    with the z hook on one set alone, with the mean taken over that set's rows."""
    model, probes = hand_built(), ood_probes()
    row = run_callbacks(model, probes, [suite(sets=["short", "fuzzy"])])
    spec = O.Spec(probes, 32, 8, PERIOD, PERIOD, 0.25, 2)
    (fuzzy,) = O.build_sets(spec, ["fuzzy"], seed=2718)[0]

    def loss(logits):
        return float(next_token_loss(logits.detach(), fuzzy.tokens, "none")[fuzzy.targets].mean())

    clean = loss(model(fuzzy.tokens).logits)
    assert row["ood_loss/fuzzy"] == pytest.approx(clean, abs=1e-5)
    _, cache = model.run_with_cache(fuzzy.tokens)
    means = [z.mean(0, keepdim=True).expand_as(z) for z in cache.z]
    for layer, h in ((0, 0), (1, 0), (1, 1)):
        assert head(row, "ood_ablation_zero_fuzzy", layer, h) == pytest.approx(
            loss(C.ablated_logits(model, fuzzy.tokens, [(layer, h)])) - clean, abs=1e-4)
        assert head(row, "ood_ablation_mean_fuzzy", layer, h) == pytest.approx(
            loss(C.ablated_logits(model, fuzzy.tokens, [(layer, h)], means)) - clean, abs=1e-4)


def test_row_chunks_give_the_scores_of_one_batch(monkeypatch):
    model, probes = hand_built(), ood_probes()
    one = run_callbacks(model, probes, [suite()])
    monkeypatch.setattr(O, "LOGITS_BUDGET", 3 * model.n_layers * model.n_heads * 32 * 32)  # 3 rows a chunk
    chunked = run_callbacks(model, probes, [suite()])
    assert set(chunked) == set(one)
    for key, value in one.items():
        assert chunked[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_longer_context_only_for_rotary_positions():
    torch.manual_seed(0)
    rotary = AttnOnlyTransformer(V, 16, n_layers=2, n_heads=2, d_model=16, d_head=8, positional="rotary").eval()
    longer = O.longer_context_model(rotary, 2, 10000.0)
    tokens = torch.randint(1, V, (2, 32))
    # The same weights and angles: the first 16 positions give the model's own logits.
    assert torch.allclose(longer(tokens).logits[:, :16], rotary(tokens[:, :16]).logits, atol=1e-5)
    assert O.longer_context_model(rotary, 2, 500.0) is None  # not the model's rotary base
    learned = AttnOnlyTransformer(V, 16, n_layers=2, n_heads=2, d_model=16, d_head=8)
    assert O.longer_context_model(learned, 2, 10000.0) is None
    s = O.long_context_set(ood_probes(), 4, 16, 2, seed=0)
    assert s.tokens.shape == (4, 32) and not s.queries[:, :16].any() and not s.targets[:, :15].any()
    row = run_callbacks(rotary, ood_probes(), [suite(sets=["long_context"])])
    assert "ood_loss/long_context" in row and "ood_ablation_mean_long_context/L1H1" in row


def test_sets_that_do_not_apply_are_left_out_with_a_note():
    from train.core.callbacks import RunContext, prepare_callbacks

    probes = hand_probes()  # no reserved tokens
    ctx = RunContext(hand_built(), probes)
    prepare_callbacks({"ood": suite(min_period=2, max_period=20)}, ctx)
    assert ctx.notes == ["callbacks.ood: left out the OOD sets short (period 1 is below 2); long (no period above "
                         "20 repeats twice in 32 tokens); reserved (no reserved tokens (data.reserved_tokens=0)); "
                         "random (training does not repeat its own text (the run gets `text`)); long_context (only "
                         "the project's models with rotary positions run a longer context)"]


# -- the data setting --------------------------------------------------------------------------
def test_reserved_tokens_stay_out_of_repeated_segments_only():
    plain, reserved = RepeatsLanguage(), RepeatsLanguage(reserved_tokens=8)
    assert torch.equal(plain.batch(3, 64), RepeatsLanguage(reserved_tokens=0).batch(3, 64))
    batch = reserved.batch(3, 256)[:, 1:]
    periodic = torch.stack([(batch[:, p:] == batch[:, :-p]).all(1) for p in range(4, 21)]).any(0)
    assert periodic.sum() > 100 and (batch[periodic] < 56).all()  # no id 56..63 in a repeated segment
    assert (batch[~periodic] >= 56).any()  # but in the chain's text
    # Apart from the replaced ids, the same sequences as without the setting.
    keep = torch.cat([torch.arange(56), torch.arange(1, 9)])
    assert torch.equal(keep[plain.batch(3, 256)[:, 1:]][periodic], batch[periodic])
    probes = P.build_probes(reserved, 64)
    assert probes.reserved.tolist() == list(range(56, 64)) and not torch.isin(probes.allowed, probes.reserved).any()
    assert P.build_probes(plain, 64).reserved is None


@pytest.mark.slow
def test_reserved_tokens_are_checked():
    from tests.helpers import compose_config
    from train.core.config import ConfigError, validate

    cfg = compose_config(["experiment=definitions"])
    assert cfg.data.reserved_tokens == 8 and "ood" in cfg.callbacks
    validate(cfg)
    cfg.data.reserved_tokens = 40
    with pytest.raises(ConfigError, match=r"data.reserved_tokens must lie in \[0, 31\]"):
        validate(cfg)


# -- through training, recompute and the Hugging Face adapter ------------------------------------
@pytest.mark.slow
def test_training_logs_the_suite_and_recompute_gives_the_same_rows(tmp_path, single_thread):
    from analysis.recompute import recompute
    from tests.helpers import train_run
    from tests.presets import DEFINITIONS_SMOKE
    from train.core import names as N
    from train.core.rundir import read_metrics

    run = train_run(tmp_path / "run", DEFINITIONS_SMOKE)
    rows = [r for r in read_metrics(run) if N.EVENT not in r]
    with_ood = [i for i, r in enumerate(rows) if "ood_loss/short" in r]
    assert with_ood == [0, 10] and len(rows) == 13
    last = rows[10]
    sets = sorted(k.split("/")[1] for k in last if k.startswith("ood_loss/"))
    assert sets == ["conflict", "fuzzy", "long", "reserved", "short", "text"]
    assert len([k for k in last if k.startswith("ood_ablation_mean_")]) == 6 * 8
    again, _ = recompute(run, ["ood"], out=tmp_path / "ood.jsonl")
    for i in with_ood:
        ood = {k: v for k, v in rows[i].items() if k.startswith("ood_")}
        assert {k: v for k, v in again[i].items() if k.startswith("ood_")} == pytest.approx(ood, abs=1e-6)


@pytest.mark.slow
def test_a_gpt2_export_scores_as_the_project_model(tmp_path):
    """The suite through the Hugging Face adapter (full forward passes with the z hook, no cache)
    gives the project's model's rows (from the cache), up to float rounding."""
    from transformers import AutoModelForCausalLM

    from analysis.export import export_run
    from train.core import adapter as A
    from tests.test_series import fake_run, run_probes

    run, model = fake_run(tmp_path / "run", ["probes.n_heldout=24"])
    out = export_run(run, tmp_path / "out", "hf", "gpt2")[0]
    hf = A.adapt(AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval())
    rows = [run_callbacks(m, run_probes(run), [O.OODSuite(every=1, n_probes=4)]) for m in (model, hf)]
    assert set(rows[0]) == set(rows[1]) and "ood_ablation_mean_conflict/L1H3" in rows[0]
    for key, value in rows[0].items():
        assert rows[1][key] == pytest.approx(value, abs=1e-4), key
