"""The model adapter (train/core/adapter.py): Hugging Face causal LMs seen as the project's model.

Known answers from the models' own modules (tiny random GPT-2, GPT-NeoX, Llama, Qwen2 and Mistral
models: patterns, z and attention outputs recomputed from the adapter's cache and weights), and two
implementations compared: the project's model against its GPT-2 / GPT-NeoX export through the
adapter, on every default callback."""
from __future__ import annotations

import importlib

import pytest
import torch

from analysis.export import export_run
from train.core import adapter as A
from train.core import callbacks as CB
from train.core import metrics as M
from train.core import names as N
from train.core.model import AttnOnlyTransformer
from tests.helpers import compose_config
from tests.test_circuits import hand_built, hand_probes
from tests.test_series import FAMILIES, fake_run, run_probes, tiny_family, tokens


def test_what_the_probes_cannot_serve_is_skipped_with_one_note():
    """Without held-out text or the probes' token set, the callbacks that need them are left out
    (one note); the previous-token score is taken on the repeated-token probes."""
    probes = hand_probes()
    probes.heldout, probes.allowed = None, None
    ctx = CB.RunContext(hand_built(), probes)
    named = {"attention": CB.AttentionScores(), "heldout": CB.HeldoutLoss(), "copying": CB.CopyingScores(),
             "robustness": CB.ProbeRobustness(variants=[[3, 8]], heldout_segments=[], n_probes=16),
             "ablation": CB.HeadAblations(every=1, icl_early=5, icl_late=28)}
    ordered = CB.prepare_callbacks(named, ctx)
    assert [cb.name for cb in ordered] == ["attention", "copying"]
    assert ctx.notes == ["AttnOnlyTransformer: skipped callbacks.heldout (no held-out text), callbacks.robustness "
                         "(no probe token set (allowed)), callbacks.ablation (no held-out text)"]
    row = CB.evaluate_checkpoint(ordered, ctx)
    patterns = M.attention_patterns(ctx.model, probes.repeated)
    assert row["previous_token/L0H0"] == pytest.approx(float(M.previous_token_score(patterns)[0, 0]))
    assert not any(k.startswith(("loss/", "prefix_matching_min", "ablation")) for k in row)


def test_the_projects_model_is_its_own_adapter():
    from train.core.hf_model import AttnOnlyConfig, AttnOnlyForCausalLM

    model = AttnOnlyTransformer(16, 8, n_layers=1)
    assert A.adapt(model) is model and model.capabilities == A.CAPABILITIES
    wrapped = AttnOnlyForCausalLM(AttnOnlyConfig(d_vocab=16, n_ctx=8, n_layers=1))
    assert A.adapt(wrapped) is wrapped.model


def own_attention(model, kind: str, layer: int):
    """(the norm before attention, the attention module) of a family's layer."""
    if kind == "gpt2":
        block = model.transformer.h[layer]
        return block.ln_1, block.attn
    if kind == "gpt_neox":
        block = model.gpt_neox.layers[layer]
        return block.input_layernorm, block.attention
    block = model.model.layers[layer]
    return block.input_layernorm, block.self_attn


@pytest.mark.parametrize("kind", FAMILIES)
def test_adapter_matches_the_models_own_attention(kind):
    """From the adapter's cache and weights alone: softmax((ln1(x) W_Q)(ln1(x) W_K)^T / sqrt(d_head))
    (with the family's own rotary embedding) gives the model's patterns, the patterns times ln1(x) W_V
    the z the hook sees, z W_O the attention module's output; ln_final and W_U the logits."""
    model = tiny_family(kind, 0)
    hf = A.adapt(model)
    assert hf.capabilities == {A.LOGITS, A.PATTERNS, A.Z, A.WEIGHTS} and hf.note is None
    x = tokens(64, 2, 24)
    outputs = {}
    hooks = [own_attention(model, kind, l)[1].register_forward_hook(
        lambda module, args, out, l=l: outputs.__setitem__(l, out[0])) for l in range(2)]
    with torch.no_grad():
        logits, cache = hf.run_with_cache(x, return_patterns=True)
    for h in hooks:
        h.remove()
    rope = lambda q, k: (q, k)  # noqa: E731
    if kind != "gpt2":
        own = importlib.import_module(type(model).__module__)
        cos, sin = (model.gpt_neox if kind == "gpt_neox" else model.model).rotary_emb(cache.resid_pre[0], torch.arange(24)[None])
        rope = lambda q, k: own.apply_rotary_pos_emb(q, k, cos, sin)  # noqa: E731
    with torch.no_grad():
        for l in range(2):
            block = hf.blocks[l]
            resid = block.ln1(cache.resid_pre[l])
            q, k, v = (torch.einsum("bpd,hde->bhpe", resid, getattr(block.attn, w)) for w in ("W_Q", "W_K", "W_V"))
            q, k = rope(q, k)
            scores = (q @ k.transpose(-1, -2)) / hf.d_head ** 0.5 + torch.full((24, 24), float("-inf")).triu(1)
            assert (scores.softmax(-1) - cache.patterns[l]).abs().max() < 1e-5, (kind, l)
            assert (cache.patterns[l] @ v - cache.z[l]).abs().max() < 1e-5, (kind, l)
            written = torch.einsum("bhpe,hem->bpm", cache.z[l], block.attn.W_O)
            assert (written - outputs[l]).abs().max() < 1e-5, (kind, l)
    # The final norm and unembedding: logits of the last residual stream.
    h = torch.randn(2, 32)
    final = (model.transformer.ln_f if kind == "gpt2" else model.gpt_neox.final_layer_norm if kind == "gpt_neox"
             else model.model.norm)
    with torch.no_grad():
        assert (hf.ln_final(h) @ hf.W_U - model.get_output_embeddings()(final(h))).abs().max() < 1e-5


def test_z_hook_ablates_through_the_output_projection():
    """Zeroing every head's z of a Llama layer leaves the attention output at zero (no o_proj bias),
    so the logits are those of the model with that layer's o_proj weights zeroed."""
    model = tiny_family("llama", 0)
    hf = A.adapt(model)
    x = tokens(64, 2, 16)
    with torch.no_grad():
        ablated = hf(x, z_hook=lambda layer, z: z * 0 if layer == 1 else z).logits
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        assert (ablated - model(x).logits).abs().max() < 1e-6
        assert (hf(x).logits - ablated).abs().max() < 1e-6  # the hook is gone after the call


@pytest.mark.slow
@pytest.mark.parametrize("layout,overrides", [("gpt2", []), ("neox", ["model.positional=rotary"])])
def test_standard_layouts_score_as_the_project_model(tmp_path, layout, overrides):
    """The project's model and its GPT-2 / GPT-NeoX export through the Hugging Face adapter: the same
    cache (residual streams, z), weights and rows of every default callback, up to float rounding."""
    from transformers import AutoModelForCausalLM

    run, model = fake_run(tmp_path / "run", ["probes.n_heldout=24", *overrides])
    out = export_run(run, tmp_path / "out", "hf", layout)[0]
    hf = A.adapt(AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval())
    assert isinstance(hf, A.HFAdapter) and A.RUN_FROM not in hf.capabilities
    probes = run_probes(run)
    with torch.no_grad():
        ours, cache = model.run_with_cache(probes.heldout[:4], return_patterns=True)
        theirs, hf_cache = hf.run_with_cache(probes.heldout[:4], return_patterns=True)
    assert (ours - theirs).abs().max() < 1e-4
    for name in ("resid_pre", "z", "patterns"):
        for a, b in zip(getattr(cache, name), getattr(hf_cache, name), strict=True):
            assert (a - b).abs().max() < 1e-5, name
    for l in range(model.n_layers):
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            assert torch.equal(getattr(model.blocks[l].attn, name), getattr(hf.blocks[l].attn, name)), name
    cfg = compose_config(["callbacks.ablation.every=1", "callbacks.ablation.n_heldout=16"])
    rows = []
    for m in (model, hf):
        ctx = CB.RunContext(m, probes)
        rows.append(CB.evaluate_checkpoint(CB.prepare_callbacks(CB.instantiate_callbacks(cfg.callbacks), ctx), ctx))
        assert ctx.notes == []
    assert set(rows[0]) == set(rows[1]) and N.head_key(N.ablated(N.REPEAT_LOSS, "mean"), 1, 3) in rows[0]
    for key, value in rows[0].items():
        close = isinstance(value, float) or key == N.PER_POSITION_LOSS
        assert rows[1][key] == (pytest.approx(value, abs=1e-4) if close else value), key
