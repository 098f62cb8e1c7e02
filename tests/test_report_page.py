"""The report (analysis/report.py): one phase-change window per run in every table, figure and
summary; an explanation per verdict; runs grouped by the config values that differ; and the page
itself loaded in headless Chromium without a JavaScript error (skipped where Chromium is not
installed: `apt-get install chromium`)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from analysis import comparison, figures
from analysis.explain import phase_lines
from analysis.report import build_report
from analysis.stages import detect_stages
from tests.handbuilt import blank_model, induction_circuit
from tests.helpers import checkpoint_tokens, compose_config, sigmoid
from train.core import names as N
from train.core.checkpoint import save_checkpoint
from train.core.phase import detect_run, fmt_tokens
from train.core.rundir import format_row
from train.core.runs import Run, load_run

CENTER, D_VOCAB, N_CTX = 1.5e6, 24, 64


def rows(center: float = CENTER, seed: int = 0) -> list[dict]:
    """A 2-layer run's rows: ICL jump, loss bump and L1H0's prefix-matching rise at `center`;
    L0H0's previous-token score rises just before."""
    rng = np.random.default_rng(seed)
    t = checkpoint_tokens(4_000_000, 20_000, 50, 20)
    x = np.log(np.maximum(t, 1))
    step = sigmoid((x - math.log(center)) / 0.08)
    cols = {N.LOSS_HELDOUT: 1.2 + 3.2 / (1 + t / 1.3e5) - 0.6 * step + rng.normal(0, 0.01, len(t)),
            N.ICL_SCORE: -0.6 - 0.8 * step + rng.normal(0, 0.04, len(t)),
            N.head_key(N.PREFIX_MATCHING, 1, 0): 0.06 + 0.6 * step + rng.normal(0, 0.01, len(t)),
            N.head_key(N.PREFIX_MATCHING, 0, 0): 0.05 + rng.normal(0, 0.003, len(t)),
            N.head_key(N.PREVIOUS_TOKEN, 0, 0): 0.1 + 0.8 * sigmoid((x - math.log(center / 1.4)) / 0.1)}
    return [{N.STEP: i, N.TOKENS: int(t[i])} | {k: float(v[i]) for k, v in cols.items()} for i in range(len(t))]


def _spans(ax) -> list[tuple[float, float]]:
    out = []
    for p in ax.patches:
        xs = np.asarray(p.get_xy())[:, 0] if hasattr(p, "get_xy") and np.ndim(p.get_xy()) == 2 else \
            np.array([p.get_x(), p.get_x() + p.get_width()])
        out.append((float(xs.min()), float(xs.max())))
    return out


def test_every_figure_shades_the_one_window_and_the_verdict_is_explained():
    run = Run(rows=rows())
    result = detect_run(run)
    w = (result["window"]["start_tokens"], result["window"]["end_tokens"])
    stages = detect_stages(run, result)
    assert stages["induction"]["prefix_matching"]["end_tokens"] != w[1]  # the head's own rise is another span
    fig = figures.fig_stages(run, result, stages)
    assert all(any(math.isclose(a, w[0]) and math.isclose(b, w[1]) for a, b in _spans(ax)) for ax in fig.axes)
    heads = figures.fig_heads(run, result)
    assert any(math.isclose(a, w[0]) and math.isclose(b, w[1]) for a, b in _spans(heads.axes[0]))
    figures.plt.close("all")
    why = phase_lines(result)
    assert why[0].startswith("ICL jump (the ICL score falls by >= 0.2 nats") and "found: a fall of" in why[0]
    assert "rule: 'yes' when the ICL jump (icl_score)" in why[-1]


@pytest.mark.slow
def test_runs_are_grouped_by_the_config_values_that_differ(tmp_path):
    configs = {"a": ["model.n_layers=2", "seed=0"], "b": ["model.n_layers=2", "seed=1"],
               "c": ["model.n_layers=1", "seed=0"], "t": ["data=text", "data.source=x.txt", "seed=0"]}
    runs = []
    for name, overrides in configs.items():
        (tmp_path / name).mkdir()
        OmegaConf.save(compose_config(overrides), tmp_path / name / "config.yaml", resolve=True)
        runs.append(Run(tmp_path / name, rows=[{N.TOKENS: 0}]))
    groups = {Path(p).name: g for p, g in comparison.config_groups(runs).items()}
    repeats = "data=repeats, data.n_ctx=64, data.vocab_size=64"
    assert groups["a"] == groups["b"] == f"{repeats}, model.n_layers=2"  # seeds are averaged over
    assert groups["c"] == f"{repeats}, model.n_layers=1"
    # not averaged with the synthetic run of seed 0; its own data keys follow from data=text
    assert groups["t"] == "data=text, data.n_ctx=128, data.vocab_size=4096, model.n_layers=2"
    same = comparison.config_groups(runs[:2])
    assert set(same.values()) == {"same config"}


def report_run(tmp_path: Path) -> Path:
    """A run directory: the rows above and hand-built checkpoints (uniform attention, half and
    full induction circuit) before, during and after the window."""
    d_model, d_head = 3 * D_VOCAB + N_CTX, N_CTX
    cfg = compose_config([f"data.vocab_size={D_VOCAB}", f"model.d_model={d_model}", f"model.d_head={d_head}",
                          "model.n_heads=2", "model.layernorm=false", "probes.n_heldout=16"])
    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir = tmp_path / "run"
    for step, tokens, model in ((1, 800_000, blank_model(D_VOCAB, N_CTX)),
                                (2, 1_500_000, induction_circuit(D_VOCAB, N_CTX, scale=3.0)),
                                (3, 3_000_000, induction_circuit(D_VOCAB, N_CTX))):
        save_checkpoint(run_dir, model, {"step": step, "tokens": tokens, "kind": "scheduled",
                                         "model": config["model"], "config": config})
    (run_dir / "metrics.jsonl").write_text("".join(format_row(r) for r in rows()), encoding="utf-8")
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run_dir = report_run(tmp)
    summary = build_report([load_run(run_dir)], tmp / "report", attach_wandb=False, log=lambda m: None)
    return tmp / "report", summary


@pytest.mark.slow
def test_the_report_uses_one_window_everywhere(report):
    out, summary = report
    row = summary["runs"][0]
    window = row["window"]
    assert json.loads((out / "summary.json").read_text())["runs"][0]["window"] == window
    assert row["stages"]["induction"]["phase_change"] == window
    page = (out / "report.html").read_text()
    span = f"{fmt_tokens(window['start_tokens'])} and {fmt_tokens(window['end_tokens'])} tokens"
    assert f"phase change between {span}" in page
    assert "<td class='yes'>yes</td>" in page and "rule: &#x27;yes&#x27; when the ICL jump" in page
    assert "pv-lab" in page and "scale" in page  # the interactive view, with its colour scale


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): the page is "
                                             "not loaded in a browser here")
def test_the_report_page_loads_without_a_javascript_error(report, tmp_path):
    out, _ = report
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    dom = proc.stdout
    n_tokens = dom.count('class="pv-tok"')
    assert n_tokens >= 3 * 2 * 17  # the script ran: every moment x head row holds the probe's tokens
    assert dom.count('class="pv-lab"') == 3 * 2 and "BOS" in dom


@pytest.mark.slow
def test_repeated_offline_analyses_leave_one_segment_with_the_final_window(tmp_path, monkeypatch, capsys):
    """Training logs offline (provisional phase_change/*); each `python -m analysis` writes the
    final entries into one analysis segment, replacing the previous one; `wandb sync RUN_DIR/wandb`
    is the one line that uploads them all."""
    from analysis.__main__ import main
    from tests.wandb_files import find_run_file, read_offline_summary
    from train.live import LiveDetection
    from train.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = WandbLogger(mode="offline")
    run_id = logger.start(run_dir, {"name": "synthetic"})
    live = LiveDetection(10, logger, lambda line: None)
    for row in rows():
        logger.log(row)
        live.update(row)
    live.finish()
    logger.finish()
    assert f"wandb sync {run_dir / 'wandb'}" in capsys.readouterr().err
    (run_dir / "metrics.jsonl").write_text("".join(format_row(r) for r in rows()), encoding="utf-8")
    (run_dir / "status.json").write_text(json.dumps({"state": "finished", "wandb_run_id": run_id}))
    assert read_offline_summary(find_run_file(run_dir / "wandb"))["phase_change/provisional"] is True
    for _ in range(2):
        assert main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2  # training's and the latest analysis's
    err = capsys.readouterr().err
    assert err.count(f"wandb sync {run_dir / 'wandb'}") == 2
    final = read_offline_summary(find_run_file(segments[-1]))
    window = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"][0]["window"]
    assert final["phase_change/provisional"] is False and final["phase_change/verdict"] == "yes"
    assert [final[f"phase_change/{k}"] for k in ("start_tokens", "steepest_tokens", "end_tokens")] == [
        window["start_tokens"], window["steepest_tokens"], window["end_tokens"]]
