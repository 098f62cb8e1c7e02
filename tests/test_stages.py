"""Developmental stages (analysis/stages.py): LLC stage boundaries on sparse synthetic curves,
the previous-token window and its order relative to the induction rise, and the whole
`python -m analysis` path on a synthetic run directory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.__main__ import main
from train.core.phase import PhaseParams, detect_phase_change
from train.core.runs import Run
from analysis.stages import LLC_MEAN, LLC_STD, StageParams, detect_stages, llc_boundaries
from tests.helpers import checkpoint_tokens, sigmoid
from train.core import names as N
from train.core.rundir import format_row


def checkpoints(total=8_000_000, first=10_000, n_log=100, n_linear=50):
    return checkpoint_tokens(total, first, n_log, n_linear)


def lnt(t):
    return np.log(np.maximum(np.asarray(t, dtype=float), 1))


# --------------------------------------------------------------------------- LLC boundaries

def rise_plateau_rise(x):
    return 10 + 20 * sigmoid((x - math.log(4e4)) / 0.4) + 25 * sigmoid((x - math.log(3e6)) / 0.4)


def rise_fall_rise(x):
    return (10 + 20 * sigmoid((x - math.log(4e4)) / 0.4) - 12 * sigmoid((x - math.log(4e5)) / 0.4)
            + 25 * sigmoid((x - math.log(3e6)) / 0.4))


def true_plateau_edges(f, x0, x1, params=StageParams()):
    """ln tokens where |d f / d ln t| of the noise-free curve crosses the plateau threshold."""
    g = np.linspace(x0, x1, 20_000)
    v = f(g)
    slope = np.gradient(v, g)
    thr = params.llc_plateau_frac * (v.max() - v.min()) / (x1 - x0)
    return g[np.flatnonzero(np.diff((np.abs(slope) < thr).astype(int)))]


def sparse_llc(f, seed, noise=0.3, every=10):
    """Every `every`-th checkpoint (as a run that logs the LLC every 10th checkpoint)."""
    t = checkpoints()[::every]
    return t, f(lnt(t)) + np.random.default_rng(seed).normal(0, noise, len(t))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llc_plateau_edges_found_on_sparse_noisy_curve(seed):
    t, llc = sparse_llc(rise_plateau_rise, seed)
    assert len(t) <= 16  # sparse: ~15 LLC points over 6.7 ln tokens
    res = llc_boundaries(t, llc)
    kinds = [b["kind"] for b in res["boundaries"]]
    assert kinds == ["plateau_start", "plateau_end"], res["message"]
    truth = true_plateau_edges(rise_plateau_rise, math.log(t[1]), math.log(t[-1]))
    assert len(truth) == 2
    for b, x_true in zip(res["boundaries"], truth):
        assert abs(math.log(b["tokens"]) - x_true) < 0.6, (b, math.exp(x_true))  # about one LLC-point spacing
    assert [s["trend"] for s in res["stages"]] == ["rising", "flat", "rising"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llc_turning_points_found_on_sparse_noisy_curve(seed):
    t, llc = sparse_llc(rise_fall_rise, seed)
    res = llc_boundaries(t, llc)
    assert [b["kind"] for b in res["boundaries"]] == ["local_max", "local_min"], res["message"]
    g = np.linspace(math.log(t[1]), math.log(t[-1]), 20_000)
    v = rise_fall_rise(g)
    x_max = g[np.argmax(np.where(g < math.log(4e5), v, -np.inf))]
    x_min = g[np.argmin(np.where(g > math.log(4e5), v, np.inf))]
    assert abs(math.log(res["boundaries"][0]["tokens"]) - x_max) < 0.4
    assert abs(math.log(res["boundaries"][1]["tokens"]) - x_min) < 0.4
    assert [s["trend"] for s in res["stages"]] == ["rising", "falling", "rising"]


@pytest.mark.parametrize("seed", range(5))
def test_smooth_power_law_has_no_turning_point(seed):
    t = checkpoints()[::10]
    rng = np.random.default_rng(seed)
    growing = 5 * (np.maximum(t, 1) / 1e4) ** 0.15 * (1 + rng.normal(0, 0.01, len(t)))
    res = llc_boundaries(t, growing)
    assert res["boundaries"] == [], res["message"]
    saturating = 50 - 40 * (np.maximum(t, 1) / 1e4) ** -0.3 + rng.normal(0, 0.1, len(t))
    kinds = [b["kind"] for b in llc_boundaries(t, saturating)["boundaries"]]
    assert not {"local_max", "local_min"} & set(kinds)


def test_llc_too_few_points_flat_and_absent():
    t = checkpoints()
    llc = np.full(len(t), np.nan)
    llc[[10, 40, 80, 120]] = [3.0, 5.0, 4.0, 8.0]
    res = llc_boundaries(t, llc)
    assert res["logged"] and res["n_points"] == 4 and res["boundaries"] == []
    assert res["message"].startswith("too few LLC points")
    res = llc_boundaries(t, np.full(len(t), np.nan))
    assert not res["logged"] and res["message"] == "LLC not logged" and res["boundaries"] == []
    flat = 20 + np.random.default_rng(0).normal(0, 0.2, len(t[::10]))
    res = llc_boundaries(t[::10], flat)
    assert res["boundaries"] == [] and res["message"].startswith("LLC flat within noise")


# --------------------------------------------------------------------------- whole runs

def smooth_loss(t):
    return 1.2 + 3.2 / (1 + (np.asarray(t, dtype=float) / 1.3e5) ** 1.0)


def synthetic_rows(pt_center=3e5, pm_center=1.5e6, llc=rise_plateau_rise, llc_every=10, seed=0):
    """Checkpoint rows of a 2-layer, 2-head run: layer-0 previous-token rise at pt_center, a
    phase change (prefix matching of L1H0, ICL jump, loss bump) at pm_center; the LLC (if any)
    every llc_every-th row."""
    rng = np.random.default_rng(seed)
    t = checkpoints()
    x = lnt(t)
    n = len(t)
    step = sigmoid((x - math.log(pm_center)) / 0.08)
    pt = sigmoid((x - math.log(pt_center)) / 0.15)
    cols = {
        N.LOSS_HELDOUT: smooth_loss(t) - 0.6 * step + rng.normal(0, 0.01, n),
        N.ICL_SCORE: -0.6 - 0.1 * (x - x[1]) / (x[-1] - x[1]) - 0.8 * step + rng.normal(0, 0.04, n),
        N.head_key(N.PREFIX_MATCHING, 1, 0): 0.06 + 0.6 * step + rng.normal(0, 0.01, n),
        N.head_key(N.PREFIX_MATCHING, 1, 1): 0.05 + rng.normal(0, 0.005, n),
        N.head_key(N.PREFIX_MATCHING, 0, 0): 0.05 + rng.normal(0, 0.005, n),
        N.head_key(N.PREFIX_MATCHING, 0, 1): 0.05 + rng.normal(0, 0.005, n),
        N.head_key(N.PREVIOUS_TOKEN, 0, 0): 0.06 + 0.3 * pt + rng.normal(0, 0.005, n),
        N.head_key(N.PREVIOUS_TOKEN, 0, 1): 0.07 + rng.normal(0, 0.005, n),
        N.head_key(N.PREVIOUS_TOKEN, 1, 0): 0.06 + 0.5 * step + rng.normal(0, 0.005, n),  # layer 1: ignored
        N.head_key(N.PREVIOUS_TOKEN, 1, 1): 0.06 + rng.normal(0, 0.005, n),
    }
    rows = []
    for i in range(n):
        row = {N.STEP: i, N.TOKENS: int(t[i])} | {k: float(v[i]) for k, v in cols.items()}
        if llc is not None and i % llc_every == 0:
            row[LLC_MEAN] = float(llc(x[i]) + rng.normal(0, 0.3))
            row[LLC_STD] = 1.0
        rows.append(row)
    return rows


def _stages(rows):
    run = Run(Path("synthetic"), rows)
    phase = detect_phase_change(run.tokens, run.series(N.LOSS_HELDOUT), run.series(N.ICL_SCORE),
                                run.head_series(N.PREFIX_MATCHING), PhaseParams())
    assert phase["phase_change"], phase["message"]
    return detect_stages(run, phase, StageParams())


def test_previous_token_rise_before_induction():
    st = _stages(synthetic_rows(pt_center=3e5, pm_center=1.5e6))
    pt = st["previous_token"]
    assert pt["detected"], pt["reason"]
    assert pt["heads"] == ["L0H0", "L0H1"]
    assert abs(math.log(pt["steepest_tokens"] / 3e5)) < 0.1
    assert st["induction"]["prefix_matching_head"] == "L1H0"
    assert st["previous_token_before_induction"] is True, st["order"]["message"]
    order = st["order"]
    assert order["reference"] == "prefix_matching"
    assert abs(order["steepest_gap_tokens"] - 1.2e6) < 0.15 * 1.2e6
    assert abs(order["steepest_gap_ln_tokens"] - math.log(5)) < 0.15
    assert order["start_gap_tokens"] > 0
    assert "\n" not in order["message"] and "form first" in order["message"]
    # events are ordered by tokens; apart from the LLC's, they start with the previous-token rise
    tokens = [e["tokens"] for e in st["events"]]
    assert tokens == sorted(tokens)
    first = next(e for e in st["events"] if e["source"] != "llc")
    assert first["source"] == "previous_token" and first["kind"] == "start"
    assert [b["kind"] for b in st["llc"]["boundaries"]] == ["plateau_start", "plateau_end"]
    assert {e["source"] for e in st["events"]} >= {"previous_token", "prefix_matching", "icl", "phase_change", "llc"}
    json.dumps(st)  # JSON-ready


def test_previous_token_rise_after_induction():
    st = _stages(synthetic_rows(pt_center=2.5e6, pm_center=4e5, llc=None))
    assert st["previous_token"]["detected"], st["previous_token"]["reason"]
    assert st["previous_token_before_induction"] is False, st["order"]["message"]
    assert st["order"]["steepest_gap_tokens"] < 0
    assert st["llc"]["message"] == "LLC not logged" and st["llc"]["boundaries"] == []
    assert "llc" not in {e["source"] for e in st["events"]}


def test_no_previous_token_rise_gives_none():
    rows = synthetic_rows(llc=None)
    for r in rows:
        r[N.head_key(N.PREVIOUS_TOKEN, 0, 0)] = 0.06
    st = _stages(rows)
    assert not st["previous_token"]["detected"]
    assert st["previous_token_before_induction"] is None
    assert st["order"]["steepest_gap_tokens"] is None


def _write_run(run_dir: Path, rows) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(format_row(r) for r in rows), encoding="utf-8")
    return run_dir


def test_cli_writes_stages_and_figure(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_run(sweep / "with_llc", synthetic_rows())
    _write_run(sweep / "without_llc", synthetic_rows(llc=None, seed=1))
    out = tmp_path / "report"
    assert main([str(sweep), "--no-wandb", "--out", str(out), "--set", "llc_plateau_frac=0.3",
                 "--set", "bandwidth=0.12", "--set", "llc_min_neighbors=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_params"]["llc_plateau_frac"] == 0.3
    assert summary["stage_params"]["llc_min_neighbors"] == 2 and summary["params"]["bandwidth"] == 0.12
    runs = {Path(r["path"]).name: r for r in summary["runs"]}
    with_llc, without = runs["with_llc"]["stages"], runs["without_llc"]["stages"]
    assert [b["kind"] for b in with_llc["llc"]["boundaries"]] == ["plateau_start", "plateau_end"]
    assert with_llc["llc"]["n_points"] == len(checkpoints()[::10]) - 1  # step 0 (0 tokens) is dropped
    assert with_llc["previous_token_before_induction"] is True
    assert without["llc"]["message"] == "LLC not logged"
    assert without["previous_token_before_induction"] is True
    figs = {p.parent.name for p in out.rglob("stages.png")}
    assert figs == {"with_llc", "without_llc"}
    html = (out / "report.html").read_text()
    assert "Previous-token heads before induction" in html and "LLC plateau starts" in html
    assert "LLC not logged" in html


def test_cli_rejects_unknown_stage_key(tmp_path, capsys):
    _write_run(tmp_path / "run", synthetic_rows(llc=None))
    assert main([str(tmp_path / "run"), "--no-wandb", "--set", "llc_nonsense=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "llc_plateau_frac" in err and "\n" not in err
