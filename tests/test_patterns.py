import pytest
"""Attention patterns for the report, on hand-built checkpoints with known patterns: uniform
attention before the window, the textbook induction circuit after it (the induction head attends
to the token after the previous occurrence, its partner to the previous position)."""
import json

import numpy as np
from omegaconf import OmegaConf

from analysis.patterns import attention_section, collect, interactive_view, moment_checkpoints, partner
from train.core.runs import Run
from tests.handbuilt import blank_model, induction_circuit
from tests.helpers import compose_config
from train.core import names as N
from train.core.checkpoint import save_checkpoint

D_VOCAB, N_CTX = 24, 64


def test_partner_is_the_previous_token_head_that_the_induction_head_reads():
    row = {N.head_key(N.PREVIOUS_TOKEN, 0, 0): 0.9, N.head_key(N.PREVIOUS_TOKEN, 0, 1): 0.6,
           N.head_key(N.PREVIOUS_TOKEN, 1, 1): 0.99,  # same layer as the induction head: never a partner
           N.pair_key(N.composition("k"), (1, 0), (0, 0)): 0.05, N.pair_key(N.composition("k"), (1, 0), (0, 1)): 0.4}
    assert partner(row, "L1H0") == "L0H1"  # 0.6 x 0.4 beats 0.9 x 0.05
    no_composition = {k: v for k, v in row.items() if "composition" not in k}
    assert partner(no_composition, "L1H0") == "L0H0"
    assert partner(row, "L0H0") is None


def handbuilt_run(tmp_path):
    """A run directory with three checkpoints: blank (uniform attention), half-strength and full
    induction circuit (tests/handbuilt.py), at 1k, 2k and 4k tokens."""
    d_model, d_head = 3 * D_VOCAB + N_CTX, N_CTX
    cfg = compose_config([f"data.vocab_size={D_VOCAB}", f"model.d_model={d_model}", f"model.d_head={d_head}",
                          "model.n_heads=2", "model.layernorm=false", "probes.n_heldout=16"])
    config = OmegaConf.to_container(cfg, resolve=True)
    for step, model in ((1, blank_model(D_VOCAB, N_CTX)), (2, induction_circuit(D_VOCAB, N_CTX, scale=3.0)),
                        (4, induction_circuit(D_VOCAB, N_CTX))):
        save_checkpoint(tmp_path, model, {"step": step, "tokens": 1000 * step, "kind": "scheduled",
                                          "model": config["model"], "config": config})
    row = {N.TOKENS: 4000, N.head_key(N.PREVIOUS_TOKEN, 0, 0): 0.95, N.head_key(N.PREVIOUS_TOKEN, 0, 1): 0.02}
    result = {"window": {"start_tokens": 1500, "steepest_tokens": 2100, "end_tokens": 3000},
              "induction_heads": ["L1H0"]}
    return Run(tmp_path, [row], config), result


@pytest.mark.slow
def test_patterns_before_and_after_the_window(tmp_path):
    run, result = handbuilt_run(tmp_path)
    assert {m: c.path.name for m, c in moment_checkpoints(run, result["window"]).items()} == {
        "before": "step_0000001", "during": "step_0000002", "after": "step_0000004"}
    data = collect(run, result)
    assert data["heads"] == ["L1H0", "L0H0"] and data["moments"] == {"before": 1000, "during": 2000, "after": 4000}
    probe = data["inputs"]["probe"]
    tokens = probe["tokens"]
    period = next(p for p in range(2, len(tokens)) if tokens[1 + p] == tokens[1])
    n = len(tokens)
    after = {h: np.array(probe["patterns"]["after"][h]) for h in data["heads"]}
    before = np.array(probe["patterns"]["before"]["L1H0"])
    assert np.allclose(after["L1H0"].sum(1), 1, atol=0.01)
    queries = range(1 + period, n)  # tokens seen before
    # the induction head attends to the positions right after the earlier copies of its token
    targets = {q: [j for j in range(1, q + 1) if tokens[j - 1] == tokens[q]] for q in queries}
    assert all(after["L1H0"][q, targets[q]].sum() > 0.9 for q in queries)
    assert all(after["L0H0"][q].argmax() == q - 1 for q in range(1, n))  # the previous position
    assert np.allclose(before[n - 1], 1 / n, atol=1e-3)  # zero weights: uniform over the prefix
    during = np.array(probe["patterns"]["during"]["L1H0"])
    mass = lambda a: np.mean([a[q, targets[q]].sum() for q in queries])
    assert mass(before) < mass(during) < mass(after["L1H0"])  # the pattern forms across the window
    held = data["inputs"]["held-out"]
    assert len(held["tokens"]) == N_CTX and len(set(held["tokens"])) < N_CTX  # a sequence with repeats

    figs, view = attention_section(run, result, tmp_path / "figures", "patterns-run")
    assert set(figs) == {"attention_probe", "attention_heldout"} and all(p.stat().st_size > 0 for p in figs.values())
    assert "http" not in view and "src=" not in view  # nothing to fetch: works offline
    payload = view[view.index("const d=") + len("const d="): view.index(",root=")]
    assert json.loads(payload.replace("<\\/", "</")) == data  # the view shows exactly these patterns


def test_nothing_to_show_without_a_window(tmp_path):
    run, result = handbuilt_run(tmp_path)
    assert collect(run, {**result, "window": None}) is None
    assert attention_section(run, {**result, "induction_heads": []}, tmp_path / "f", "x") == ({}, "")
    assert interactive_view({"heads": [], "moments": {}, "inputs": {}}, "a").count("<script>") == 1
