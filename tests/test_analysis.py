"""Phase-change detection (synthetic and real runs), figures, report and CLI errors."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.__main__ import main
from train.core.phase import burn_in_end, detect_bump, detect_jump, detect_phase_change, smooth
from train.core.runs import load_run
from tests.helpers import checkpoint_tokens, sigmoid
from train.core import names as N
from train.core.rundir import format_row, read_metrics

REPO = Path(__file__).resolve().parents[1]


def checkpoints(total=4_000_000, first=20_000, n_log=70, n_linear=40):
    return checkpoint_tokens(total, first, n_log, n_linear)


def smooth_loss(t):
    """Initial plateau near ln(64), a fast drop, then a convex power-law tail (no bump)."""
    return 1.2 + 3.2 / (1 + (np.asarray(t, dtype=float) / 1.3e5) ** 1.0)


def test_sigmoid_icl_jump_found_within_tolerance():
    rng = np.random.default_rng(0)
    t = checkpoints()
    center, width = 1.6e6, 0.07  # width in ln tokens
    icl = -0.7 - 0.8 * sigmoid((np.log(np.maximum(t, 1)) - math.log(center)) / width) + rng.normal(0, 0.04, len(t))
    win = detect_jump(smooth(t, icl), -1, 0.2, x_from=math.log(3e5))
    assert win.detected, win.reason
    assert abs(math.log(win.steepest / center)) < 0.1
    # the window brackets the 10%-90% stretch of the step, and is not much wider than it
    lo, hi = center * math.exp(-2.2 * width), center * math.exp(2.2 * width)
    assert win.start <= lo * 1.05 and win.end >= hi / 1.05
    assert math.log(win.end / win.start) < 1.0
    assert 0.55 < win.size < 0.95


def test_sigmoid_loss_bump_and_full_detection():
    rng = np.random.default_rng(1)
    t = checkpoints()
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(1.5e6)) / 0.08)
    loss = smooth_loss(t) - 0.6 * step + rng.normal(0, 0.01, len(t))
    icl = -0.6 - 0.1 * (x - x[1]) / (x[-1] - x[1]) - 0.8 * step + rng.normal(0, 0.04, len(t))
    heads = {"L0H0": 0.05 + rng.normal(0, 0.003, len(t)), "L1H0": 0.06 + 0.6 * step + rng.normal(0, 0.01, len(t))}
    res = detect_phase_change(t, loss, icl, heads)
    assert res["phase_change"], res["message"]
    assert res["induction_heads"] == ["L1H0"]
    bump = res["loss_bump"]
    assert bump["detected"] and abs(math.log(bump["steepest_tokens"] / 1.5e6)) < 0.15
    assert 0.3 < bump["size"] < 0.9
    w = res["window"]
    assert w["start_tokens"] < 1.5e6 < w["end_tokens"]
    assert all(res["coincide"].values())
    # burn-in ends after the initial drop and before the phase change
    assert 2e5 < res["burn_in_end_tokens"] < 1.0e6


def test_smooth_power_law_reports_none():
    rng = np.random.default_rng(2)
    t = checkpoints()
    x = np.log(np.maximum(t, 1))
    loss = smooth_loss(t) + rng.normal(0, 0.01, len(t))
    icl = -0.6 - 0.4 * (1 - (np.maximum(t, 2e4) / 2e4) ** -0.3) + rng.normal(0, 0.05, len(t))  # slow drift
    heads = {"L0H0": 0.05 + 0.02 * (x - x[1]) / (x[-1] - x[1]) + rng.normal(0, 0.003, len(t))}
    res = detect_phase_change(t, loss, icl, heads)
    assert not res["phase_change"], res["message"]
    assert res["message"].startswith("no phase change")
    assert not res["icl_jump"]["detected"] and not res["loss_bump"]["detected"]
    assert res["induction_heads"] == []


def test_burn_in_excludes_initial_drop():
    t = checkpoints()
    sm = smooth(t, smooth_loss(t))
    end = math.exp(burn_in_end(sm))
    assert 2e5 < end < 1.5e6
    # the steepest descent of the whole curve is the initial drop, before the burn-in end
    assert math.exp(sm.grid[int(np.argmin(sm.slope))]) < end
    assert not detect_bump(sm, x_from=burn_in_end(sm)).detected


def _detect(run_dir: Path):
    run = load_run(run_dir)
    return detect_phase_change(run.tokens, run.series("loss/heldout"), run.series("icl_score"),
                               run.head_series("prefix_matching"))


@pytest.mark.slow
def test_real_two_layer_run_has_phase_change(two_layer_run):
    res = _detect(two_layer_run)
    assert res["phase_change"], res["message"]
    assert res["icl_jump"]["detected"], res["icl_jump"]["reason"]
    assert res["induction_heads"] and all(h.startswith("L1") for h in res["induction_heads"])
    w = res["window"]
    assert 2e5 < w["start_tokens"] <= w["steepest_tokens"] <= w["end_tokens"] <= 2.5e6


@pytest.mark.slow
def test_real_one_layer_run_has_none(one_layer_run):
    res = _detect(one_layer_run)
    assert not res["phase_change"], res["message"]
    assert res["induction_heads"] == []
    assert not res["icl_jump"]["detected"]


def _copy_run(src: Path, dst: Path, extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.yaml", "status.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    lines = (src / "metrics.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        row = {k: v for k, v in json.loads(line).items() if not k.startswith(drop)} if drop else json.loads(line)
        if extra:
            row.update({k: f(i) for k, f in extra.items()})
        out.append(json.dumps(row))
        if i == 3:
            out.append(json.dumps({"event": "nonfinite", "step": row.get("step")}))
    (dst / "metrics.jsonl").write_text("\n".join(out) + "\n")
    return dst


@pytest.mark.slow
def test_report_from_sweep_dir(two_layer_run, one_layer_run, tmp_path, capsys):
    sweep = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    n = len((two_layer_run / "metrics.jsonl").read_text().splitlines())
    labels = {"is_behavioral/L1H0": lambda i: int(i > n // 2), "is_mechanistic/L1H0": lambda i: int(i > n // 3),
              "is_behavioral/L0H0": lambda i: 0}
    _copy_run(two_layer_run, sweep / "0_model.n_layers=2", labels)
    _copy_run(one_layer_run, sweep / "1_model.n_layers=1", drop=("is_behavioral/", "is_mechanistic/"))
    assert main([str(tmp_path / "multirun"), "--no-wandb"]) == 0
    out = tmp_path / "multirun" / "report"
    summary = json.loads((out / "summary.json").read_text())
    by_layers = {r["n_layers"]: r for r in summary["runs"]}
    assert set(by_layers) == {1, 2}
    assert by_layers[2]["phase_change"] and not by_layers[1]["phase_change"]
    assert by_layers[2]["window"]["start_tokens"] < by_layers[2]["window"]["end_tokens"]
    pngs = {p.name for p in out.rglob("*.png")}
    assert {"loss.png", "icl.png", "heads.png", "per_position_loss.png", "labels.png",
            "pca_per_token_loss.png", "compare.png"} <= pngs
    # only the run with label keys (they are dropped from the 1-layer copy)
    assert [p.parent.name for p in out.rglob("labels.png")] == ["2L-learned-s0"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 10
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and "<script" not in html
    assert "no phase change" in html
    printed = capsys.readouterr().out
    assert "no phase change" in printed and "report.html" in printed
    # re-running does not pick up the report directory as a run
    assert main([str(tmp_path / "multirun"), "--no-wandb"]) == 0
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 2


@pytest.mark.slow
def test_wandb_attach_failure_never_fails(two_layer_run, tmp_path, monkeypatch, capsys):
    run_dir = _copy_run(two_layer_run, tmp_path / "run")
    (run_dir / "status.json").write_text(json.dumps({"state": "finished", "wandb_run_id": "abc123"}))
    (run_dir / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    import wandb

    def boom(*a, **k):
        raise RuntimeError("no wandb here")

    monkeypatch.setattr(wandb, "init", boom)
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "wandb: skipped" in err and "no wandb here" in err
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "bad_param", "wandb_offline"])
def test_bad_input_one_line_error(case, tmp_path, capsys, monkeypatch):
    if case == "missing":
        argv = [str(tmp_path / "nope")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv = [str(tmp_path / "empty")]
    elif case == "garbage":
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
        argv = [str(tmp_path / "g")]
    elif case == "bad_param":
        argv = [str(tmp_path), "--set", "nonsense=1"]
    else:
        monkeypatch.setenv("WANDB_MODE", "offline")
        argv = ["--wandb", "ent/proj/abc", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_subprocess_missing_dir_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", str(tmp_path / "missing")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_recomputed_keys_join_the_runs_rows(tmp_path):
    """Keys added later by `analysis.recompute` (e.g. the LLC) join the rows of the same step;
    the training-time values win where both have a key."""
    from train.core.rundir import format_row

    rows = [{"step": s, "tokens": 100 * s, "icl_score": -0.1 * s} for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(format_row(r) for r in rows))
    later = [{"step": s, "tokens": 100 * s, "icl_score": 9.0, "llc/mean": float(s)} for s in (0, 2)]
    (tmp_path / "recomputed.jsonl").write_text("".join(format_row(r) for r in later))
    run = load_run(tmp_path)
    assert run.series("icl_score").tolist() == pytest.approx([0.0, -0.1, -0.2, -0.3])
    llc = run.series("llc/mean")
    assert llc[0] == 0.0 and llc[2] == 2.0 and math.isnan(llc[1]) and math.isnan(llc[3])


def synthetic_run(run_dir: Path, n_layers: int, seed: int, center: float | None) -> Path:
    """A run directory with a config.yaml and the rows of a run whose induction head L{n_layers - 1}H0
    forms at `center` tokens (loss bump, ICL jump, prefix-matching rise), or never (None)."""
    rng = np.random.default_rng(seed)
    t = checkpoints()
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(center)) / 0.08) if center else np.zeros(len(t))
    cols = {N.LOSS_HELDOUT: smooth_loss(t) - 0.6 * step + rng.normal(0, 0.01, len(t)),
            N.ICL_SCORE: -0.6 - 0.1 * (x - x[1]) / (x[-1] - x[1]) - 0.8 * step + rng.normal(0, 0.04, len(t)),
            N.head_key(N.PREFIX_MATCHING, n_layers - 1, 0): 0.06 + 0.6 * step + rng.normal(0, 0.01, len(t)),
            N.head_key(N.PREFIX_MATCHING, 0, 1): 0.05 + rng.normal(0, 0.003, len(t))}
    run_dir.mkdir(parents=True)
    rows = [{N.STEP: i, N.TOKENS: int(t[i])} | {k: float(v[i]) for k, v in cols.items()} for i in range(len(t))]
    (run_dir / "metrics.jsonl").write_text("".join(format_row(r) for r in rows), encoding="utf-8")
    (run_dir / "config.yaml").write_text(f"model:\n  n_layers: {n_layers}\nseed: {seed}\n", encoding="utf-8")
    return run_dir


def test_by_config_groups_synthetic_runs(tmp_path, capsys):
    """analysis.by_config on three synthetic runs: grouped by model.n_layers, the 2-layer runs have their
    phase changes near where they were made (1.2M and 1.8M tokens, median between), the 1-layer run none."""
    from analysis.by_config import main as by_config

    sweep = tmp_path / "sweep"
    synthetic_run(sweep / "a", 2, 0, 1.2e6)
    synthetic_run(sweep / "b", 2, 1, 1.8e6)
    synthetic_run(sweep / "c", 1, 0, None)
    assert by_config([str(sweep), "--key", "model.n_layers"]) == 0
    rows = [r.split("|")[1:-1] for r in (sweep / "by_config" / "by_config.md").read_text().splitlines()[2:]]
    assert [c.strip() for c in rows[0][:4]] == ["1", "0/1", "none", "none"]
    assert rows[1][0].strip() == "2" and rows[1][1].strip() == "2/2"
    steepest = [float(v.strip().rstrip("M")) * 1e6 for v in rows[1][2].split(",")]
    assert abs(math.log(steepest[0] / 1.2e6)) < 0.15 and abs(math.log(steepest[1] / 1.8e6)) < 0.15
    assert 1.2e6 < float(rows[1][3].strip().rstrip("M")) * 1e6 < 1.8e6
    assert (sweep / "by_config" / "by_config.png").stat().st_size > 10_000
    capsys.readouterr()


@pytest.mark.slow
def test_sweep_table_groups_runs_by_config_values(two_layer_run, one_layer_run, tmp_path, capsys):
    """analysis.sweep on the real 1- and 2-layer runs, grouped by model.n_layers: the 2-layer group
    has its phase change at the same tokens `analysis` finds, the 1-layer group has none."""
    from analysis.by_config import main as sweep_main

    sweep = tmp_path / "sweep"
    shutil.copytree(two_layer_run, sweep / "a", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(one_layer_run, sweep / "b", ignore=shutil.ignore_patterns("checkpoints"))
    assert sweep_main([str(sweep), "--key", "model.n_layers", "--key", "seed"]) == 0
    rows = (sweep / "by_config" / "by_config.md").read_text().splitlines()[2:]  # after the header and its rule
    expected = _detect(two_layer_run)["window"]["steepest_tokens"]
    assert rows[0].startswith("| 1 | 0 | 0/1 | none | none |")
    assert rows[1].startswith(f"| 2 | 0 | 1/1 | {expected / 1e6:.2f}M | {expected / 1e6:.2f}M |")
    # the last-layer max prefix matching at each run's end: the 2-layer run's induction heads, none in 1 layer
    final = {n: float(r.split("|")[6]) for n, r in zip((1, 2), rows)}
    last = read_metrics(two_layer_run / "metrics.jsonl")[-1]
    assert abs(final[2] - max(v for k, v in last.items() if k.startswith("prefix_matching/L1H"))) < 0.006
    assert final[2] > 0.5 > 0.2 > final[1]
    assert (sweep / "by_config" / "by_config.png").stat().st_size > 10_000
    assert sweep_main([str(tmp_path / "nothing"), "--key", "seed"]) == 2
    assert "error:" in capsys.readouterr().err
