"""The test of the induction-head definitions out of distribution (analysis/definitions.py,
analysis/definitions_report.py).

Known answers: the measures against brute force; on the hand-built model (tests/test_circuits.py)
the mechanistic label (and the causal one, where this tree has the causal callback) predicts which
heads matter off the main probe's period, the behavioural one, which also labels the positional
impostor, does not; synthetic runs whose heads matter only after a phase change."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis import definitions as D
from analysis import definitions_report as R
from train.core import names as N
from train.core.rundir import format_row
from train.core.runs import Run
from tests.helpers import sigmoid
from tests.test_analysis import checkpoints, smooth_loss


def test_measures_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, 30).astype(float)  # many ties
        y = rng.normal(size=30) + x
        positive = y > 1.5
        pairs = [(a, b) for a in x[positive] for b in x[~positive]]
        brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
        assert D.roc_auc(x, positive) == pytest.approx(brute)
        rx = np.array([np.mean(np.flatnonzero(np.sort(x) == v)) for v in x])  # average ranks of ties
        ry = np.argsort(np.argsort(y))
        assert D.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert D.roc_auc(np.array([1.0, 2.0]), np.array([True, True])) is None
    assert D.spearman(np.array([1.0, 1.0]), np.array([0.0, 1.0])) is None
    # an undefined score ranks below every defined one
    obs = [{"defs": {N.QK_PREFIX_MATCHING: v}, "effects": {"s": e}} for v, e in ((math.nan, 0.0), (0.1, 0.5))]
    assert D.evaluate(obs, N.QK_PREFIX_MATCHING, "s", 0.1)["auc"] == 1.0


# -- the hand-built model ------------------------------------------------------------------------
def causal_callbacks() -> dict:
    """The causal callback (train/core/causal.py) where this tree has it, every checkpoint; else {}."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.helpers import CONF_DIR, compose_config

    if "causal" not in OmegaConf.load(f"{CONF_DIR}/callbacks/with_definitions.yaml"):
        return {}
    cfg = compose_config(["callbacks=with_definitions"])
    entry = OmegaConf.to_container(cfg.callbacks.causal, resolve=True) | {"every": 1}
    return {"causal": instantiate(entry)}


@pytest.fixture(scope="module")
def hand_result():
    from train.core.callbacks import (AttentionScores, CircuitScores, CopyingScores, InductionClassification,
                                      RunContext, evaluate_checkpoint, prepare_callbacks)
    from tests.test_circuits import hand_built
    from tests.test_ood import ood_probes, suite

    named = {"attention": AttentionScores(), "copying": CopyingScores(), "circuits": CircuitScores(baseline_samples=32),
             "induction": InductionClassification(), "ood": suite(), **causal_callbacks()}
    ctx = RunContext(hand_built(), ood_probes())
    row = {N.STEP: 0, N.TOKENS: 1000} | evaluate_checkpoint(prepare_callbacks(named, ctx), ctx)
    run = Run(rows=[row], config={"model": {"n_layers": 2}}, label="hand-built")
    return D.analyse([run], D.Settings(), windows={str(run.path): None})


def test_hand_built_mechanistic_label_predicts_the_ood_effects_and_behavioural_does_not(hand_result):
    (group,) = hand_result["groups"].values()
    t = group["table"]["all"]
    labels = [k for k in (N.IS_MECHANISTIC, "is_causal") if k in group["definitions"]]
    for s in ("short", "long", "conflict"):  # off the impostor's period: only the induction head L1H0 matters
        assert t[s][N.IS_BEHAVIORAL]["auc"] == 0.5 and t[s][N.IS_BEHAVIORAL]["precision"] == 0.5
        for label in labels:
            assert t[s][label]["auc"] == 1.0 and t[s][label]["precision"] == 1.0 and t[s][label]["recall"] == 1.0
    (impostor,) = [d for d in group["disagreements"] if d["labelled_by"] == N.IS_BEHAVIORAL
                   and d["not_by"] == N.IS_MECHANISTIC]
    assert impostor["heads"] == {"hand-built: L1H1": 1}
    assert impostor["per_set"]["short"]["share_matter"] == 0.0 and impostor["per_set"]["long"]["share_matter"] == 0.0
    md = R.markdown(hand_result)
    assert "| is_mechanistic | - / - / - / 1.00 | - / - / - / 1.00 |" in md  # short, long: one run, no window


# -- synthetic runs over training -------------------------------------------------------------------
def synthetic_ood_run(run_dir, seed: int, center: float = 1.2e6):
    """A 2-layer run (2 heads a layer) whose L1H0 becomes an induction head at `center` tokens
    (loss bump, ICL jump, prefix-matching rise; labelled by both definitions once formed; ablating
    it then costs 1 nat on every set), and whose L1H1 is labelled behavioural from early on but
    never matters; OOD rows at every 10th checkpoint."""
    rng = np.random.default_rng(seed)
    t = checkpoints()
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(center)) / 0.08)
    rows = []
    for i in range(len(t)):
        row = {N.STEP: i, N.TOKENS: int(t[i]), N.LOSS_HELDOUT: float(smooth_loss(t)[i] - 0.6 * step[i]),
               N.ICL_SCORE: float(-0.6 - 0.8 * step[i] + rng.normal(0, 0.02)),
               "prefix_matching/L1H0": float(0.06 + 0.6 * step[i]), "prefix_matching/L1H1": 0.5,
               "prefix_matching/L0H0": 0.05, "prefix_matching/L0H1": 0.05}
        formed = int(step[i] > 0.5)
        row |= {"is_behavioral/L1H0": formed, "is_mechanistic/L1H0": formed,
                "is_behavioral/L1H1": int(t[i] > 3e5), "is_mechanistic/L1H1": 0}
        if i % 10 == 0:
            for s in ("short", "conflict"):
                row |= {f"ood_ablation_mean_{s}/L{l}H{h}": float(step[i] if (l, h) == (1, 0) else 0.0)
                        for l in range(2) for h in range(2)}
                row[f"ood_loss/{s}"] = 1.0
        rows.append(row)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(format_row(r) for r in rows), encoding="utf-8")
    (run_dir / "config.yaml").write_text(f"model:\n  n_layers: 2\nseed: {seed}\n", encoding="utf-8")
    return run_dir


@pytest.mark.slow
def test_synthetic_runs_before_during_after(tmp_path, capsys):
    for seed in (0, 1):
        synthetic_ood_run(tmp_path / "sweep" / f"s{seed}", seed)
    assert D.main([str(tmp_path / "sweep")]) == 0
    out = tmp_path / "sweep" / "definitions"
    result = json.loads((out / "definitions.json").read_text())
    (group,) = result["groups"].values()
    assert len(group["runs"]) == 2 and all(w is not None for w in group["windows"].values())
    t = group["table"]
    # Before the window no head matters (no AUC); after it L1H0 does, which both labels mark, and
    # the behavioural label also marks L1H1.
    assert t["before"]["short"][N.IS_MECHANISTIC]["n_matter"] == 0 and t["before"]["short"][N.IS_MECHANISTIC]["auc"] is None
    assert t["after"]["short"][N.IS_MECHANISTIC]["auc"] == 1.0 and t["after"]["short"][N.IS_BEHAVIORAL]["auc"] == 0.5
    assert t["after"]["conflict"][N.PREFIX_MATCHING]["spearman"] == pytest.approx(1.0)
    curve = group["curves"][group["runs"][0]]["short"][N.IS_MECHANISTIC]
    assert len(curve) == 11 and curve[0][1] is None and curve[-1][1] == 1.0
    md = (out / "definitions.md").read_text()
    assert "## 2 layers, embedded data" in md and "| is_behavioral | is_mechanistic |" in md
    assert (out / "definitions.png").stat().st_size > 10_000
    html = R.report_section(D.for_report(D.load_runs([tmp_path / "sweep"]), {str(p): {"window": w} for p, w in zip(
        [r.path for r in D.load_runs([tmp_path / "sweep"])], group["windows"].values())}))
    assert "Which definition predicts" in html and "data:image/png;base64," in html


def test_runs_without_ood_rows_are_one_line_errors(tmp_path, capsys):
    from tests.test_analysis import synthetic_run

    synthetic_run(tmp_path / "plain", 2, 0, 1.2e6)
    assert D.main([str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run has rows of the out-of-distribution suite") and err.count("\n") == 1
    assert R.report_section(D.for_report(D.load_runs([tmp_path / "plain"]), {str(tmp_path / "plain"): {"window": None}})) == ""
