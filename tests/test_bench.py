"""scripts/bench.py --quick runs end to end and reports every section (no speed assertions:
the speeds are the benchmark's to print, not the tests' to judge)."""
from __future__ import annotations

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
