"""The model: TransformerLens names and shapes, fused and explicit attention agree, causality,
the positional schemes and smeared keys."""
import pytest
import torch

from train.core.model import AttnOnlyTransformer

CONFIGS = [
    dict(positional="learned", layernorm=True),
    dict(positional="learned", layernorm=False),
    dict(positional="shortformer", layernorm=True),
    dict(positional="rotary", layernorm=True),
    dict(positional="learned", layernorm=True, smeared_keys=True),
]


def _model(**kw):
    torch.manual_seed(0)
    args = dict(d_vocab=50, n_ctx=32, n_layers=2, n_heads=3, d_model=24, d_head=8) | kw
    return AttnOnlyTransformer(**args).eval()


def test_transformerlens_names_and_shapes():
    m = _model()
    assert m.W_E.shape == (50, 24) and m.W_pos.shape == (32, 24) and m.W_U.shape == (24, 50)
    attn = m.blocks[1].attn
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(attn, name).shape == (3, 24, 8)
    assert attn.W_O.shape == (3, 8, 24)
    names = set(dict(m.named_parameters()))
    assert {"W_E", "W_pos", "W_U", "blocks.0.attn.W_Q", "blocks.1.attn.W_O"} <= names


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fused_and_explicit_attention_agree(kw):
    m = _model(**kw)
    tokens = torch.randint(0, 50, (4, 32))
    fused = m(tokens).logits
    out = m(tokens, return_patterns=True)
    torch.testing.assert_close(out.logits, fused, atol=1e-5, rtol=1e-4)
    for p in out.patterns:
        assert p.shape == (4, 3, 32, 32)
        torch.testing.assert_close(p.sum(-1), torch.ones(4, 3, 32))
        assert torch.all(p.triu(1) == 0)  # causal


@pytest.mark.parametrize("kw", CONFIGS + [dict(positional="learned", layernorm=True, n_layers=1)],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_patterns_alone_are_the_forward_passs_patterns(kw, monkeypatch):
    """attention_patterns leaves out the last layer's value mixing and output and the unembedding,
    and gives the same numbers as the forward pass; metrics.attention_patterns's CPU chunks too."""
    from train.core import metrics as M

    m = _model(**kw)
    tokens = torch.randint(0, 50, (40, 32))
    with torch.no_grad():
        full = m(tokens, return_patterns=True).patterns
        alone = m.attention_patterns(tokens)
    assert len(alone) == len(full) == m.n_layers
    for a, b in zip(alone, full):
        assert torch.equal(a, b)
    assert torch.equal(M.attention_patterns(m, tokens), torch.stack(full))  # one chunk
    monkeypatch.setattr(M, "PATTERN_CHUNK", 7 * m.n_heads * 32 * 32)  # chunks of 7 sequences, the last of 5
    assert torch.equal(M.attention_patterns(m, tokens), torch.stack(full))


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_future_tokens_do_not_change_earlier_logits(kw):
    m = _model(**kw)
    a = torch.randint(0, 50, (2, 32))
    b = a.clone()
    b[:, 20:] = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(m(a).logits[:, :20], m(b).logits[:, :20])


def test_shortformer_keeps_positions_out_of_the_values():
    m = _model(positional="shortformer")
    tokens = torch.randint(0, 50, (1, 32))
    # With uniform attention (zero Q/K weights), a shortformer layer's output cannot depend on
    # positions, so the logits at a position are those of the mean of the values.
    with torch.no_grad():
        for block in m.blocks:
            block.attn.W_Q.zero_()
            block.attn.W_K.zero_()
        base = m(tokens).logits
        m.W_pos.normal_()
        torch.testing.assert_close(m(tokens).logits, base)


def test_rotary_scores_depend_on_relative_position_only():
    m = _model(positional="rotary")
    q = torch.randn(1, 1, 32, 8)
    k = torch.randn(1, 1, 32, 8)
    # The same query and key vectors at (i, j) and (i + s, j + s) give the same score.
    qs = m.rotary(q.expand(1, 1, 32, 8).clone()[:, :, :1].repeat(1, 1, 32, 1))
    ks = m.rotary(k[:, :, :1].repeat(1, 1, 32, 1))
    s1 = (qs[0, 0, 10] * ks[0, 0, 4]).sum()
    s2 = (qs[0, 0, 20] * ks[0, 0, 14]).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_smeared_keys_mix_in_the_previous_key():
    m = _model(smeared_keys=True, init_std=0.5)
    tokens = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        for block in m.blocks:
            block.attn.smear.fill_(30.0)  # sigmoid(30) ~ 1: no smearing
    plain = _model(init_std=0.5)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "smear" not in k})
    torch.testing.assert_close(m(tokens).logits, plain(tokens).logits, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for block in m.blocks:
            block.attn.smear.fill_(-30.0)  # keys fully replaced by the previous position's
    assert (m(tokens).logits - plain(tokens).logits).abs().max() > 0.1


def test_z_hook_zero_ablation_removes_a_heads_contribution():
    m = _model()
    tokens = torch.randint(0, 50, (2, 32))

    def zero_all(layer, z):
        return torch.zeros_like(z)

    out = m(tokens, z_hook=zero_all).logits
    with torch.no_grad():
        x = m.W_E[tokens] + m.W_pos[:32]
        for block in m.blocks:
            x = x + block.attn.b_O
        expected = m.ln_final(x) @ m.W_U + m.b_U
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_cache_and_running_from_a_layer_give_the_forward_pass(kw):
    """run_with_cache: the residual stream entering each layer and each layer's z, with the forward
    pass's logits; run_from a cached layer (its z given or recomputed) gives them again."""
    m = _model(**kw)
    tokens = torch.randint(0, 50, (3, 32))
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens, return_patterns=True)
        assert torch.equal(logits, m(tokens, return_patterns=True).logits)
        assert len(cache.resid_pre) == len(cache.z) == len(cache.patterns) == 2
        assert torch.equal(cache.resid_pre[0], m.embed(tokens))
        assert cache.z[0].shape == (3, 3, 32, 8)
        # The stream entering layer 1 is layer 0's input plus its heads' z through W_O.
        torch.testing.assert_close(cache.resid_pre[1], cache.resid_pre[0] + m.blocks[0].attn.output(cache.z[0]))
        # z is the pattern-weighted sum of the values (no smearing, positions: values are x W_V + b_V).
        if not kw.get("smeared_keys") and kw["positional"] != "shortformer":
            v = torch.einsum("bpd,hde->bhpe", m.blocks[1].ln1(cache.resid_pre[1]), m.blocks[1].attn.W_V)
            torch.testing.assert_close(cache.z[1], cache.patterns[1] @ (v + m.blocks[1].attn.b_V[:, None]))
        plain, fast = m.run_with_cache(tokens)
        for layer in range(2):
            assert torch.equal(m.run_from(layer, fast.resid_pre[layer]).logits, plain)
            assert torch.equal(m.run_from(layer, fast.resid_pre[layer], z=fast.z[layer]).logits, plain)


def test_z_hook_sees_every_layer_and_the_cache_keeps_what_it_returns():
    m = _model()
    tokens = torch.randint(0, 50, (2, 32))
    seen = []

    def halve_layer_1(layer, z):
        seen.append(layer)
        return z / 2 if layer == 1 else z

    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens, z_hook=halve_layer_1)
        assert seen == [0, 1]
        assert torch.equal(logits, m(tokens, z_hook=halve_layer_1).logits)
        clean = m.run_with_cache(tokens)[1]
        torch.testing.assert_close(cache.z[1], clean.z[1] / 2)


@pytest.mark.parametrize("bad", [dict(positional="alibi"), dict(n_layers=0), dict(d_head=-1)])
def test_bad_model_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        _model(**bad)


def test_rotary_needs_an_even_head_size():
    with pytest.raises(ValueError, match="even d_head"):
        AttnOnlyTransformer(d_vocab=10, n_ctx=8, d_model=9, n_heads=1, d_head=9, positional="rotary")


def test_training_steps_are_bit_identical_on_cpu():
    """Same seed, same data: the same weights after training, with the default thread count
    (the embedding's backward must not accumulate in a thread-dependent order)."""
    from train.core.language import RepeatsLanguage

    def train_a_few_steps():
        torch.manual_seed(0)
        m = AttnOnlyTransformer(64, 64, 2, 4, 64, 16, layernorm=True, init_std=0.1)
        opt = torch.optim.AdamW(m.parameters(), 3e-3)
        data = RepeatsLanguage(64, 64)
        for step in range(4):
            x = data.batch(step, 64)
            loss = torch.nn.functional.cross_entropy(m(x).logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(train_a_few_steps(), train_a_few_steps())


def test_the_models_fields_have_one_home():
    """The config schema, checkpoints and the transformers config all hold the constructor's
    arguments (MODEL_FIELDS), with the schema's defaults."""
    import dataclasses
    import inspect

    from train.core.config import ModelConfig
    from train.core.hf_model import AttnOnlyConfig
    from train.core.model import MODEL_FIELDS, model_kwargs

    schema = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "_target_"}
    assert set(schema) == set(MODEL_FIELDS)
    for name, p in inspect.signature(AttnOnlyTransformer).parameters.items():
        if p.default is not inspect.Parameter.empty:
            assert schema[name] == p.default, name
    hf = AttnOnlyConfig(n_layers=3, d_vocab=40)
    assert tuple(hf.model_kwargs()) == MODEL_FIELDS and hf.n_layers == 3 and hf.vocab_size == 40
    assert model_kwargs({"n_layers": 1, "lr": 0.1, "_target_": "x"}) == {"n_layers": 1}
