"""scripts/bench.py --quick runs end to end and reports every section (no speed assertions:
the speeds are the benchmark's to print, not the tests' to judge)."""
from __future__ import annotations

import pytest

import importlib.util
import json
import math
import subprocess
import sys

from tests.helpers import ROOT, cli_env


def numbers(node, path=""):
    """(path, value) of every number in a JSON document (bools left out)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_benchmark_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    bad = [(p, v) for p, v in numbers(r) if not (math.isfinite(v) and v >= 0)]
    assert not bad, bad
    assert r["machine"]["torch_threads"] == 1 and r["machine"]["cpu_count"] >= 1

    assert positive(r["matmul_peak"]["peak_flops"]) and r["matmul_peak"]["dtype"] == "float32"
    assert all(positive(v) for v in r["matmul_peak"]["flops_by_size"].values())

    tl_installed = importlib.util.find_spec("transformer_lens") is not None
    assert [(s["d_model"], s["n_ctx"], s["batch"]) for s in r["sizes"]][0] == (64, 64, 64)
    for s in r["sizes"]:
        for key in ("tokens_per_second", "seconds_per_step", "achieved_flops", "percent_of_peak", "params"):
            assert positive(s[key]), (s["d_model"], key, s[key])
        assert positive(s["flops_per_token"]["total"]) and positive(s["peak_memory"]["bytes"])
        tl = s["transformer_lens"]
        if tl_installed:  # the transformer-lens extra (installed in CI)
            assert tl["status"] == "measured", tl
            assert positive(tl["ratio_ours_over_tl"]) and positive(tl["tokens_per_second"])
        else:
            assert tl["status"] == "TransformerLens not installed"

    p = r["probes"]
    for key in ("train_step_seconds", "mean_evaluate_seconds", "mean_in_train_steps", "checkpoints"):
        assert positive(p[key]), key
    assert p["kinds"] and sum(k["checkpoints_in_schedule"] for k in p["kinds"]) == p["checkpoints"]
    assert all(positive(k["evaluate_seconds"]) and positive(k["in_train_steps"]) for k in p["kinds"])

    loop = r["loop"]
    for key in ("run_seconds", "loop_tokens_per_second", "bare_tokens_per_second", "loop_over_step", "steps"):
        assert positive(loop[key]), key

    c = r["compile"]
    for key in ("eager_tokens_per_second", "compiled_tokens_per_second", "gain", "first_call_seconds"):
        assert positive(c[key]), key

    text = proc.stdout
    assert text.startswith("machine: ") and "matmul peak" in text.splitlines()[0]
    assert "| d_model / n_ctx / batch |" in text and "| 64 / 64 / 64 |" in text
    for row in ("| matmul peak", "| probe cost per checkpoint", "| loop / bare step", "| torch.compile gain"):
        assert row in text, row
    assert ("TransformerLens not installed" in text) != tl_installed


def test_benchmark_sections_at_tiny_settings():
    """Each section of the benchmark in this process at the smallest settings (the full `--quick`
    run above is the slow test): the matmul peak, one training-step size, the probe cost, the
    loop against the bare step; their numbers positive and their table rows printed."""
    import dataclasses

    import torch

    from scripts.bench_machine import machine_info, matmul_peak
    from scripts.bench_report import tables
    from scripts.bench_steps import bench_size
    from scripts.bench_timing import settings_for
    from scripts.bench_trainer import bench_loop, bench_probes

    device = torch.device("cpu")
    s = dataclasses.replace(settings_for(device, quick=True), matmul_sizes=(64,), matmul_repeats=1, warmup_steps=1,
                            blocks=1, block_seconds=0.01, probe_repeats=1, step_samples=2, loop_tokens=8192)
    peak = matmul_peak(device, s.matmul_sizes, s.matmul_repeats)
    size = bench_size(32, 16, 4, device, s, peak["peak_flops"], None)
    assert positive(peak["peak_flops"]) and positive(size["tokens_per_second"])
    assert size["transformer_lens"]["status"] != "measured"
    probes, loop = bench_probes(device, s), bench_loop(device, s)
    assert positive(probes["mean_in_train_steps"]) and positive(loop["loop_over_step"])
    # torch.compile is left out here (its first call compiles for seconds): its row shows given numbers
    compiled = {"gain": 2.0, "compiled_tokens_per_second": 2e5, "eager_tokens_per_second": 1e5, "first_call_seconds": 3.0}
    text = tables({"machine": machine_info(device), "matmul_peak": peak, "sizes": [size], "probes": probes,
                   "loop": loop, "compile": compiled})
    assert "| 32 / 16 / 4 |" in text and "| probe cost per checkpoint" in text and "| loop / bare step" in text
    assert "| torch.compile gain (median of paired blocks) | 2.00x | 200 ktok/s vs eager 100 ktok/s" in text


@pytest.mark.slow
def test_quick_whole_run_benchmark_reports_both_sections(tmp_path, capsys):
    """scripts/bench.py --runs --quick in this process: a tiny run on both schedules, and one
    tiny `python -m train threads=auto` whose first lines say what auto chose."""
    from scripts.bench import main

    out = tmp_path / "runs.json"
    assert main(["--runs", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    runs = {x["schedule"]: x for x in r["schedules"]}
    assert list(runs) == ["dense", "fixed", "adaptive"]
    for x in runs.values():
        assert positive(x["run_seconds"]) and 0 < x["callback_share"] < 1 and x["checkpoints"] >= 2
    assert runs["fixed"]["watch_share"] == 0 and 0 < runs["adaptive"]["watch_share"] < 1
    assert runs["dense"]["checkpoints"] > runs["fixed"]["checkpoints"]  # every step of the tiny run
    t = r["threads"]
    assert set(t["median_wall"]) == {"idle"} and set(t["median_wall"]["idle"]) == {"auto"}
    assert positive(t["median_wall"]["idle"]["auto"]) and t["busy_over_idle"] == {}
    (line,) = t["start_lines"]["idle"]["auto"]
    assert line.startswith("device cpu, ") and " (auto: " in line, line
    text = capsys.readouterr().out
    assert "| case | seed | schedule |" in text and "| default | 0 | adaptive |" in text
    assert "| threads (" in text and "| auto |" in text


def test_whole_run_tables_and_resolution():
    """The whole-run sections' arithmetic and tables on given numbers (scripts/bench_runs.py)."""
    from scripts.bench_report import schedule_tables, thread_tables
    from scripts.bench_runs import edge_error, edge_shift, resolution, thread_summary

    window = {"start_tokens": 100.0, "steepest_tokens": 150.0, "end_tokens": 200.0}
    rows = [{"step": i, "tokens": 50 * i, **({"checkpoint/reason": "zoom"} if i in (3, 4) else {})} for i in range(6)]
    res = resolution(rows + [{"event": "nonfinite", "step": 6, "tokens": 300}], window)
    assert res == {"checkpoints": 6, "zoomed": 2, "window": window, "in_window": 3}
    assert edge_shift({"start_tokens": 110.0, "end_tokens": 190.0}, window) == pytest.approx({"start": 0.1, "end": 0.05})
    assert edge_error({"start_tokens": 110.0, "end_tokens": 190.0}, window) == pytest.approx({"start": 0.1, "end": -0.05})
    assert edge_shift(None, window) is None and resolution(rows, None)["in_window"] is None
    run = {"case": "default", "seed": 0, "schedule": "adaptive", "callback_share": 0.08, "watch_share": 0.02,
           "run_seconds": 30.0, "edge_shift": {"start": 0.01, "end": 0.04}, "edge_error": {"start": 0.02, "end": -0.03}}
    assert ("| default | 0 | adaptive | 6 (2) | 8.0% | 2.0% | 30.0 s | 0.000M - 0.000M | 3 | 1.0%, 4.0% | +2.0%, -3.0% |"
            in schedule_tables([run | res]))
    walls = {"idle": {"1": [41.0, 40.0, 39.0], "auto": [30.0]}, "busy": {"1": [44.0], "auto": [45.0]}}
    threads = thread_summary("default", walls, {
        "idle": {"1": ["  device cpu, 1 thread (set)"], "auto": ["  device cpu, 2 threads (auto: x)"]},
        "busy": {"1": ["  device cpu, 1 thread (set)"], "auto": ["  device cpu, 1 thread (auto: y)"]}})
    assert threads["median_wall"]["idle"]["1"] == 40.0 and threads["busy_over_idle"] == pytest.approx({"1": 1.1, "auto": 1.5})
    text = thread_tables(threads)
    assert "| 1 | 40.0 s | 44.0 s | 1.10x |  |" in text
    assert "| auto | 30.0 s | 45.0 s | 1.50x | idle: 2 threads (auto: x); busy: 1 thread (auto: y) |" in text
