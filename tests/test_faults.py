"""Faults from outside the code: run directories shared by others (saved configs that name code),
token files of the wrong kind, runaway learning rates, a file system that fails mid-run, jobs
that start together, validation errors, runs too short to analyse. Each test reproduces one
row of the README's list of faults and checks what the fault leaves behind. Preemption and
SLURM-style requeue: tests/test_reliability.py.

Trainings here are tiny and single-threaded (bit-identical CPU results need the same thread
count in every process)."""
from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import ROOT, cli_env, compose_config, one_line_error
from tests.presets import FAULTS
from train.core import rundir
from train.cli import EXIT_FAULT, EXIT_IO, EXIT_USAGE, run
from train.core.rundir import read_metrics

# A one-layer model small enough that its metrics rows, not its checkpoints, are the largest
# file: 60 steps of 1024 tokens, about 45 checkpoints.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, single_thread) -> Path:
    """The uninterrupted tiny run."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run(compose_config(FAULTS), run_dir)
    return run_dir


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# -- saved configs are data ----------------------------------------------------------------------
# Each payload: (where in the saved config, the node that replaces it there). SRC and DST are
# filled in with real paths; each payload, built by Hydra, writes DST.
PAYLOADS = {
    "copyfile through a module attribute": (
        "callbacks.attention", {"_target_": "train.core.checkpoint.shutil.copyfile", "_args_": ["SRC", "DST"]}),
    "builtins.open": ("data", {"_target_": "builtins.open", "_args_": ["DST", "w"]}),
    "builtins.exec": ("model", {"_target_": "builtins.exec", "_args_": ["open('DST', 'w').close()"]}),
    "os.system": ("logger", {"_target_": "os.system", "_args_": ["echo x > DST"]}),
    "nested in a callback's settings": (
        "callbacks.heldout.icl_early", {"_target_": "os.system", "_args_": ["echo x > DST"]}),
    "allowed target with Hydra's _args_": (
        "callbacks.copying", {"_target_": "train.core.callbacks.CopyingScores", "_args_": [1]}),
}
OFFENDING_KEY = {"copyfile through a module attribute": "callbacks.attention._target_",
                 "builtins.open": "data._target_", "builtins.exec": "model._target_", "os.system": "logger._target_",
                 "nested in a callback's settings": "callbacks.heldout.icl_early._target_",
                 "allowed target with Hydra's _args_": "callbacks.copying._args_"}


def _payload(name: str, src: Path, dst: Path) -> tuple[str, dict]:
    where, node = PAYLOADS[name]
    text = json.dumps(node).replace("SRC", str(src)).replace("DST", str(dst))
    return where, json.loads(text)


def _tampered_config(name: str, src: Path, dst: Path) -> dict:
    config = OmegaConf.to_container(compose_config(["logger=none", "device=cpu"]), resolve=True)
    where, node = _payload(name, src, dst)
    *parents, last = where.split(".")
    parent = config
    for key in parents:
        parent = parent[key]
    parent[last] = node
    return config


@pytest.fixture
def victim(tmp_path) -> tuple[Path, Path]:
    src, dst = tmp_path / "attacker.txt", tmp_path / "precious.txt"
    src.write_text("attacker")
    dst.write_text("precious")
    return src, dst


@pytest.mark.parametrize("name", [n for n in PAYLOADS if "_args_" not in n])
def test_payloads_are_live(name, tmp_path):
    """Called, each payload's target does write its file (so the refusals below mean something)."""
    import pydoc

    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("attacker")
    _, node = _payload(name, src, dst)
    result = pydoc.locate(node["_target_"])(*node["_args_"])  # a dotted path, as Hydra resolves it
    if hasattr(result, "close"):
        result.close()
    assert dst.exists()


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_resume_never_builds_what_a_saved_config_names(name, tmp_path, victim, capsys):
    src, dst = victim
    run_dir = tmp_path / "shared_run"
    run_dir.mkdir()
    (run_dir / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(_tampered_config(name, src, dst)))
    rundir.write_status(run_dir, rundir.INTERRUPTED, 0, None)
    before = _files(run_dir)
    with pytest.raises(SystemExit) as exc:
        run(compose_config([f"resume={run_dir}"]), run_dir)
    assert exc.value.code == EXIT_USAGE
    line = one_line_error(capsys.readouterr().err)
    assert f"refusing {OFFENDING_KEY[name]}" in line
    assert dst.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "attacker.txt", "precious.txt", "shared_run"]
    assert _files(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_recompute_never_builds_what_a_checkpoint_names(name, tiny_run, tmp_path, victim, capsys):
    from analysis.recompute import main as recompute

    src, dst = victim
    run_dir = tmp_path / "shared_run"
    ckpt = rundir.list_checkpoints(tiny_run)[-1]
    target = rundir.checkpoint_dir(run_dir, rundir.checkpoint_step(ckpt))
    target.mkdir(parents=True)
    (target / rundir.MODEL_FILE).write_bytes((ckpt / rundir.MODEL_FILE).read_bytes())
    meta = rundir.read_meta(ckpt)
    (target / rundir.META_FILE).write_text(json.dumps({**meta, "config": _tampered_config(name, src, dst)}))
    assert recompute([str(run_dir)]) == EXIT_USAGE
    assert f"refusing {OFFENDING_KEY[name]}" in one_line_error(capsys.readouterr().err)
    assert dst.read_text() == "precious" and not (run_dir / rundir.RECOMPUTED_FILE).exists()


@pytest.mark.slow
def test_recompute_refuses_a_cuda_device_that_is_not_there(tiny_run, capsys):
    from analysis.recompute import main as recompute

    device = f"cuda:{torch.cuda.device_count()}"
    assert recompute([str(tiny_run), "--device", device]) == EXIT_USAGE
    assert f"--device {device}" in one_line_error(capsys.readouterr().err)
    assert not (tiny_run / rundir.RECOMPUTED_FILE).exists()


# -- bad input: one line, exit 2, nothing left behind ---------------------------------------------

def _token_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "tokens.npy"
    if kind == "float":
        np.save(path, np.random.default_rng(0).random(4096))  # cast to int: all zeros
    elif kind == "bool":
        np.save(path, np.ones(4096, dtype=bool))
    elif kind == "object":
        np.save(path, np.array([1, "a"] * 2048, dtype=object), allow_pickle=True)
    elif kind == "text":
        path = tmp_path / "tokens.txt"
        path.write_text("1 2 3 4\n" * 1024)
    return path


BAD_INPUT = {  # name: (overrides, a part of the message)
    "float tokens": (lambda p: ["data=tokens", f"data.path={_token_file(p, 'float')}"], "holds float64 values; token ids must be integers"),
    "bool tokens": (lambda p: ["data=tokens", f"data.path={_token_file(p, 'bool')}"], "holds bool values; token ids must be integers"),
    "object tokens": (lambda p: ["data=tokens", f"data.path={_token_file(p, 'object')}"], "holds Python objects, not token ids"),
    "text file as tokens": (lambda p: ["data=tokens", f"data.path={_token_file(p, 'text')}"], "not a .npy file"),
    "infinite lr": (lambda p: ["optim.lr=inf"], "optim.lr must be positive and finite, got inf"),
    "nan lr": (lambda p: ["optim.lr=nan"], "optim.lr must be positive and finite, got nan"),
    "negative lr": (lambda p: ["optim.lr=-0.001"], "optim.lr must be positive and finite"),
    "vocabulary too small for the probes": (lambda p: ["data.vocab_size=8"], "data.vocab_size=8 leaves"),
    "CUDA device that is not there": (lambda p: [f"device=cuda:{torch.cuda.device_count()}"], "CUDA device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_no_directory(case, tmp_path, capsys):
    overrides, message = BAD_INPUT[case]
    run_dir = tmp_path / "outputs" / "run"
    with pytest.raises(SystemExit) as exc:
        run(compose_config(["logger=none", "device=cpu", *overrides(tmp_path)]), run_dir)
    assert exc.value.code == EXIT_USAGE
    line = one_line_error(capsys.readouterr().err)
    assert message in line
    assert "weights_only" not in line and "pickled data" not in line
    assert not (tmp_path / "outputs").exists()  # the stub its start made is gone, parents included


@pytest.mark.slow
def test_cli_error_after_hydra_started_leaves_nothing(tmp_path):
    """Through the command line Hydra writes `.hydra/` and its log before the job runs; a job
    that then fails on its data removes them, and the dated default directory too."""
    tokens = _token_file(tmp_path, "float")
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "train", "logger=none", "device=cpu", "data=tokens",
                           f"data.path={tokens}"],
                          cwd=cwd, env=cli_env() | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
    assert "holds float64 values" in one_line_error(proc.stderr)
    assert list(cwd.iterdir()) == []


def test_default_run_directory_is_unique_per_process():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert re.fullmatch(rf"outputs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{os.getpid()}", str(cfg.hydra.run.dir))


@pytest.mark.slow
def test_jobs_started_together_in_one_directory(tmp_path):
    """Two jobs handed the same directory at the same moment: one trains, the other is refused
    and writes nothing there (Hydra's record keeps the winner's seed). A third job whose
    interpolated directory resolves to that run is refused before Hydra writes anything."""
    run_dir = tmp_path / "shared"
    short = [*FAULTS, "train.total_tokens=8192"]
    procs = {seed: subprocess.Popen([sys.executable, "-m", "train", *short, f"seed={seed}", f"hydra.run.dir={run_dir}"],
                                    cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    ended = {seed: (p.communicate(timeout=300)[1], p.returncode) for seed, p in procs.items()}
    assert sorted(rc for _, rc in ended.values()) == [0, EXIT_USAGE], ended
    winner, loser = sorted(ended, key=lambda seed: ended[seed][1])
    assert re.search(r"in use by another training process|already holds a run", one_line_error(ended[loser][0]))
    assert OmegaConf.load(run_dir / rundir.CONFIG_FILE).seed == winner
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed == winner
    assert f"seed={winner}" in (run_dir / ".hydra" / "overrides.yaml").read_text()

    before = _files(run_dir)
    proc = subprocess.run([sys.executable, "-m", "train", *short, "hydra.run.dir=${oc.env:SHARED_RUN}"], cwd=ROOT,
                          env=cli_env() | {"SHARED_RUN": str(run_dir)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert f"{run_dir} already holds a run (finished" in one_line_error(proc.stderr)
    assert _files(run_dir) == before


# -- divergence ----------------------------------------------------------------------------------

def test_divergence_stops_the_run_with_an_event(tmp_path, capsys, single_thread):
    run_dir = tmp_path / "lr100"
    with pytest.raises(SystemExit) as exc:
        run(compose_config(FAULTS + ["optim.lr=100"]), run_dir)
    assert exc.value.code == EXIT_FAULT
    assert "diverged: held-out loss" in one_line_error(capsys.readouterr().err)
    rows = read_metrics(run_dir)
    event, checkpoints = rows[-1], rows[:-1]
    line = math.log(40) + 1.0  # ln(vocab_size) + the default margin
    assert event["event"] == "divergence" and event["step"] == checkpoints[-1]["step"]
    assert checkpoints[0]["loss/heldout"] < line  # the guard fired on the loss, not at once
    assert all(r["loss/heldout"] > line for r in checkpoints[-3:])  # 3 checkpoints in a row
    status = json.loads((run_dir / rundir.STATUS_FILE).read_text())
    assert status["state"] == "failed" and status["step"] == event["step"]


@pytest.mark.slow
def test_the_tiny_run_stays_below_the_divergence_line(tiny_run):
    line = math.log(40) + 1.0
    assert max(r["loss/heldout"] for r in read_metrics(tiny_run)) < line


# -- the file system fails mid-run ----------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_stops_with_exit_4_and_the_run_resumes(tiny_run, tmp_path, single_thread, capsys):
    """A file-size limit (RLIMIT_FSIZE) makes writes past it fail as on a full disk, in a real
    subprocess; the limit is set so that checkpoints fit and metrics.jsonl breaks mid-row."""
    ref_rows = read_metrics(tiny_run)
    ends = np.cumsum([len(rundir.format_row(r)) for r in ref_rows])
    largest_other = max(p.stat().st_size for p in tiny_run.rglob("*") if p.is_file() and p.name != rundir.METRICS_FILE)
    k = int(np.searchsorted(ends, largest_other)) + 3  # rows 0..k fit; row k + 1 breaks
    assert k + 2 < len(ref_rows)
    limit = int(ends[k]) + 100

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run_dir = tmp_path / "full"
    proc = subprocess.run([sys.executable, "-m", "train", *FAULTS, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == EXIT_IO, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert f"cannot write {run_dir / rundir.METRICS_FILE}" in line and f"resume={run_dir}" in line
    status = json.loads((run_dir / rundir.STATUS_FILE).read_text())
    assert status["state"] == "failed" and status["step"] == ref_rows[k]["step"]  # the last good step
    assert rundir.checkpoint_step(rundir.resume_point(run_dir)) == ref_rows[k]["step"]

    run(compose_config([f"resume={run_dir}"]), run_dir)
    assert read_metrics(run_dir) == ref_rows  # the torn row dropped, the rest as if nothing happened


# -- analysis of very short runs -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n_rows", [1, 2])
def test_analysis_of_one_or_two_checkpoints_says_what_it_cannot_show(two_layer_run, tmp_path, n_rows, capsys):
    from analysis.__main__ import main

    run_dir = tmp_path / "short"
    run_dir.mkdir()
    (run_dir / rundir.CONFIG_FILE).write_bytes((two_layer_run / rundir.CONFIG_FILE).read_bytes())
    (run_dir / rundir.METRICS_FILE).write_text("".join(rundir.format_row(r) for r in read_metrics(two_layer_run)[:n_rows]))
    assert main([str(run_dir), "--no-wandb"]) == 0
    out = capsys.readouterr().out
    assert f"cannot tell: {n_rows - 1} usable checkpoint" in out and "detection needs 5" in out
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["runs"][0]["phase_change"] is False and summary["runs"][0]["n_checkpoints"] == n_rows


@pytest.mark.slow
def test_analysis_error_leaves_no_partial_report(two_layer_run, tmp_path, capsys):
    from analysis.__main__ import main

    good, bad = tmp_path / "sweep" / "good", tmp_path / "sweep" / "bad"
    for d in (good, bad):
        d.mkdir(parents=True)
        (d / rundir.CONFIG_FILE).write_bytes((two_layer_run / rundir.CONFIG_FILE).read_bytes())
    (good / rundir.METRICS_FILE).write_bytes((two_layer_run / rundir.METRICS_FILE).read_bytes())
    (bad / rundir.METRICS_FILE).write_text(json.dumps({"step": 0, "tokens": 0}) + "\n")  # no loss, no ICL score
    assert main([str(tmp_path / "sweep"), "--no-wandb"]) == EXIT_USAGE
    assert "has neither loss/heldout nor icl_score" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["bad", "good"]  # no report/, no leftovers


# -- the README's list of faults -------------------------------------------------------------------

def test_readme_list_of_faults_names_tests_that_exist():
    """Each row of the faults table (docs/faults.md) names the test that reproduces it; the exit
    codes it gives are the command line's."""
    text = (ROOT / "docs" / "faults.md").read_text()
    section = text.split("## Faults and what each leaves behind")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "| ---"))]
    assert len(rows) >= 20
    for fault, exit_code, _, test in rows:
        path, _, name = test.strip("`").partition("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{fault}: no test {test}"
        assert set(re.findall(r"-?\d+", exit_code)) <= {"0", "1", "2", "3", "4", "130", "143", "-9"}, fault
    for code, meaning in ((EXIT_USAGE, "bad input"), (EXIT_FAULT, "a numerical fault"), (EXIT_IO, "the file system failed")):
        assert f"{code} {meaning}" in " ".join(text.split())
