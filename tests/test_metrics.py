"""Behavioral metrics on hand-built weights whose answers are known."""
import torch

from tests.handbuilt import blank_model, induction_circuit, set_previous_offset_head, set_previous_token_head
from train.core import metrics as M
from train.core.language import BOS
from train.core.probes import repeated_random_tokens


def _probes(d_vocab=24, period=10, repeats=4, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return repeated_random_tokens(n, period, repeats, torch.arange(1, d_vocab), g)


def _chance_prefix_matching(tokens):
    """What a uniform-attention head scores: mean over matching queries of (#matches) / (i + 1)."""
    mask = M.prefix_matching_mask(tokens).float()
    counts = mask.sum(-1)
    n_keys = torch.arange(1, tokens.shape[1] + 1).float()
    valid = counts > 0
    return float((counts / n_keys)[valid].mean())


def test_probe_construction_follows_olsson():
    tokens = _probes(period=25, repeats=4, d_vocab=64)
    assert tokens.shape == (8, 101)
    assert (tokens[:, 0] == BOS).all()
    body = tokens[:, 1:].view(8, 4, 25)
    assert (body == body[:, :1]).all()  # four identical repeats
    assert all(len(set(seg.tolist())) == 25 for seg in body[:, 0])  # distinct tokens in a segment


def test_hand_built_induction_circuit_scores_near_one():
    model = induction_circuit()
    tokens = _probes()
    patterns = M.attention_patterns(model, tokens)
    pm = M.prefix_matching_score(patterns, tokens)
    prev = M.previous_token_score(patterns)
    copying = M.copying_score(model, torch.arange(1, 24))
    assert pm[1, 0] > 0.95  # the induction head
    assert copying[1, 0] > 0.95
    assert prev[0, 0] > 0.95  # the previous-token head ...
    assert pm[0, 0] < 0.05  # ... does not prefix-match
    assert copying[0, 0] < 0.05  # and writes nothing the unembedding reads


def test_uniform_head_scores_chance():
    model = induction_circuit()  # head 1 of each layer has zero weights: uniform attention
    tokens = _probes()
    patterns = M.attention_patterns(model, tokens)
    pm = M.prefix_matching_score(patterns, tokens)
    chance = _chance_prefix_matching(tokens)
    assert 0.02 < chance < 0.15
    assert abs(float(pm[1, 1]) - chance) < 1e-4
    assert abs(float(pm[0, 1]) - chance) < 1e-4
    n = tokens.shape[1]
    expected_prev = float((1.0 / torch.arange(2, n + 1).float()).mean())  # 1 / (i + 1) for i >= 1
    assert abs(float(M.previous_token_score(patterns)[0, 1]) - expected_prev) < 1e-4


def test_previous_token_head_is_not_an_induction_head():
    model = blank_model(n_layers=1, n_heads=1)
    set_previous_token_head(model, 0, 0)
    tokens = _probes()
    patterns = M.attention_patterns(model, tokens)
    assert M.previous_token_score(patterns)[0, 0] > 0.95
    assert M.prefix_matching_score(patterns, tokens)[0, 0] < 0.05
    assert M.duplicate_token_score(patterns, tokens)[0, 0] < 0.05


def test_duplicate_token_head():
    # Attending back exactly one period lands on the earlier copy of the same token.
    model = blank_model(n_layers=1, n_heads=1)
    set_previous_offset_head(model, 0, 0, offset=10)
    tokens = _probes(period=10)
    patterns = M.attention_patterns(model, tokens)
    assert M.duplicate_token_score(patterns, tokens)[0, 0] > 0.95
    assert M.prefix_matching_score(patterns, tokens)[0, 0] < 0.05


def test_copying_score_of_random_and_negated_heads():
    torch.manual_seed(0)
    model = induction_circuit()
    tokens = torch.arange(1, 24)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0].neg_()  # an anti-copying head
    assert M.copying_score(model, tokens)[1, 0] < 0.05
    with torch.no_grad():
        for p in (model.blocks[1].attn.W_V, model.blocks[1].attn.W_O):
            p.normal_()
    random_score = float(M.copying_score(model, tokens)[1, 0])
    assert random_score < 0.25  # chance is about 2 / d_vocab: far below a copying head's ~1


def test_icl_indices_scale_with_context():
    assert M.icl_indices(512) == (50, 500)
    assert M.icl_indices(64) == (6, 62)
    try:
        M.icl_indices(64, early=10, late=80)
    except ValueError as e:
        assert "ICL indices" in str(e)
    else:
        raise AssertionError("an ICL index beyond the context must be refused")


def test_per_position_loss_is_low_where_the_circuit_can_copy():
    model = induction_circuit()
    with torch.no_grad():
        model.W_U.mul_(20)  # confident predictions
    tokens = _probes(period=10)
    losses = M.per_position_loss(model, tokens)
    # The first segment cannot be predicted from context; every later repeat can.
    assert losses[1:10].mean() > 2.5
    assert losses[11:].mean() < 0.2
    assert M.icl_score(losses, 5, 35) < -2.0
