"""The hostile-user cases of damaged inputs and of the process (each a row of the README's faults table):
checkpoint metadata and metrics rows that gave tracebacks, keys by_config cannot group by, full
disks, reads that would block, configs that expand without bound, stop signals during start-up
and from launchers, and the one-line catch at every command's edge. The few that need a real
process (signals, file-size limits) are marked slow."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_env, compose_config, one_line_error
from tests.presets import FAULTS, SIX_STEPS
from tests.victims import edit_json, export, hashes, refused, report
from train.cli import run
from train.core import names as N
from train.core import outputs, rundir


# -- tracebacks that are one line now ---------------------------------------------------------------
META_DAMAGE = {
    "n_layers_a_string": (lambda m: m["model"].update(n_layers="two"), "model.n_layers='two' is not a positive integer"),
    "no_tokens": (lambda m: m.pop("tokens"), "tokens=None is not a token count"),
    "huge_d_vocab": (lambda m: m["model"].update(d_vocab=10 ** 12), "far larger than its weights file"),
}


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_damaged_checkpoint_metadata_is_one_line(damage, a_run, tmp_path, capsys):
    from analysis.recompute import main as recompute

    change, message = META_DAMAGE[damage]
    for ckpt in rundir.list_checkpoints(a_run):
        edit_json(ckpt / rundir.META_FILE, change)
    before = hashes(a_run)
    refused(recompute([str(a_run), "--callbacks", "copying"]), capsys, message)
    refused(export(a_run, "--out", tmp_path / "exp"), capsys, message)
    assert hashes(a_run) == before and not (tmp_path / "exp").exists()


def test_deeply_nested_metadata_is_one_line(a_run, capsys):
    from analysis.recompute import main as recompute

    meta = rundir.list_checkpoints(a_run)[0] / rundir.META_FILE
    meta.write_text(meta.read_text()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(recompute([str(a_run)]), capsys, "nests too deeply")


@pytest.mark.slow
def test_odd_metrics_rows_still_give_a_report(made_run, tmp_path, capsys):
    """A row whose step is a string, and rows of values near the largest float (plots overflowed):
    read as a run's rows are (beyond float32's range: not a number), and reported."""
    for case in ("step_a_string", "values_1e308"):
        run_dir = Path(shutil.copytree(made_run, tmp_path / "sweep" / case))
        rows = rundir.read_metrics(run_dir)
        for row in rows[1:]:
            if case == "step_a_string":
                row[N.STEP] = "abc"
            else:
                row[N.LOSS_HELDOUT], row[N.ICL_SCORE] = 1e308, -1e308
        (run_dir / rundir.METRICS_FILE).write_text("".join(rundir.format_row(r) for r in rows))
    assert report(tmp_path / "sweep") == 0
    assert (tmp_path / "sweep" / "report" / "report.html").is_file() and "Traceback" not in capsys.readouterr().err


def test_by_config_checks_its_keys_before_writing(a_run, tmp_path, capsys):
    from analysis.by_config import main

    refused(main([str(tmp_path), "--key", "no.such.key"]), capsys, "--key no.such.key: no run's config.yaml has it")
    refused(main([str(tmp_path), "--key", "data"]), capsys, "a section or a list")
    assert not (tmp_path / "by_config").exists()


@pytest.mark.slow
def test_by_config_places_a_key_of_names_along_its_axis(a_run, tmp_path, capsys):
    from analysis.by_config import main

    shutil.copytree(a_run, tmp_path / "other")
    assert main([str(tmp_path), "--key", "data.repeat.form"]) == 0
    assert sorted(p.name for p in (tmp_path / "by_config").iterdir()) == [outputs.MARKER, "by_config.md", "by_config.png"]
    assert "| tile | 1/2" not in capsys.readouterr().out  # both runs in one group


def test_recompute_counts_what_each_callback_did(a_run, capsys):
    from analysis.recompute import main as recompute

    assert recompute([str(a_run), "--callbacks", "copying"]) == 0
    captured = capsys.readouterr()
    assert "(copying at 3 of 3)" in captured.out and "step 6 (3/3): copying" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["analysis", "recompute"])
def test_a_full_disk_in_the_tools_is_one_line_and_leaves_nothing(tool, a_run, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) fails writes as a full disk does, in a real process (the
    export stages its files the same way: tests/test_outputs.py)."""
    argv = {"analysis": ["analysis", str(a_run), "--no-wandb", "--out", str(tmp_path / "out")],
            "recompute": ["analysis.recompute", str(a_run), "--callbacks", "copying", "--out", str(tmp_path / "re.jsonl")]}
    before = hashes(a_run)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    proc = subprocess.run([sys.executable, "-m", *argv[tool]], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "File too large" in one_line_error(proc.stderr)
    assert hashes(a_run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_a_run_whose_first_checkpoint_fails_says_it_has_none(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train", *SIX_STEPS, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300,  # checkpoints of ~100 kB
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert proc.returncode == 4 and "nothing was trained" in one_line_error(proc.stderr)
    status = rundir.read_status(run_dir)
    assert status["state"] == rundir.FAILED and status["step"] is None and not rundir.list_checkpoints(run_dir)


# -- inputs that block or blow up ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["token_file", "config_yaml"])
def test_a_fifo_is_refused_not_read(kind, a_run, tmp_path, capsys):
    """A read from a FIFO blocks until someone writes into it: refused before it is opened."""
    if kind == "token_file":
        os.mkfifo(tmp_path / "tokens.npy")
        overrides, run_dir = ["logger=none", "device=cpu", "data=tokens", f"data.path={tmp_path / 'tokens.npy'}"], tmp_path / "r"
    else:
        (a_run / rundir.CONFIG_FILE).unlink()
        os.mkfifo(a_run / rundir.CONFIG_FILE)
        edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
        overrides, run_dir = [f"resume={a_run}"], a_run
    with pytest.raises(SystemExit) as exc:
        run(compose_config(overrides), run_dir)
    assert exc.value.code == 2
    assert "regular file" in one_line_error(capsys.readouterr().err)


def test_a_config_of_billions_of_aliased_nodes_is_refused(a_run, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    (a_run / rundir.CONFIG_FILE).write_text(bomb)
    shutil.rmtree(a_run / rundir.CHECKPOINTS)
    edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
    with pytest.raises(SystemExit) as exc:
        run(compose_config([f"resume={a_run}"]), a_run)
    assert exc.value.code == 2 and "YAML nodes (aliases)" in one_line_error(capsys.readouterr().err)


def _signal_when(proc: subprocess.Popen, ready, signals: list[int], gap: float = 0.05, timeout: float = 120) -> float:
    start = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.05)
    sent = time.monotonic()
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(gap)
    proc.wait(timeout=timeout)
    return time.monotonic() - sent


@pytest.mark.slow
def test_bpe_training_stops_at_sigterm_and_leaves_nothing(tmp_path):
    """A BPE on 20 MB of one repeated word runs for a long time inside the tokenizers library;
    SIGTERM ends it within seconds (exit 143), with no cache entry and no run directory."""
    corpus = tmp_path / "one.txt"
    corpus.write_text(("aaaa " * 200 + "\n\n") * 20_000)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "logger=none", "device=cpu", "data=text",
                             f"data.source={corpus}", f"data.cache_dir={cache}", "data.vocab_size=4096",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE, text=True)
    took = _signal_when(proc, lambda: cache.is_dir() and any(p.name.count(".tmp-") for p in cache.iterdir()),
                        [signal.SIGTERM], gap=1.0)
    err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "while building the token cache" in one_line_error(err) and took < 10
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [] and not run_dir.exists()


@pytest.mark.slow
def test_a_sigterm_repeated_by_a_launcher_counts_once(tmp_path, monkeypatch, capsys):
    """`kill -- -PGID` (SLURM) reaches the run directly and again through `uv run`: both within a
    moment count as one stop, which writes its checkpoint (exit 143, not 'a second signal'). The
    handler is the command line's in every launch mode (train/signals.py)."""
    from train.loop import Trainer
    from train.signals import STOP

    clean_loss = Trainer.loss

    def twice_at_step_2(self, tokens):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return clean_loss(self, tokens)

    monkeypatch.setattr(Trainer, "loss", twice_at_step_2)
    installed = STOP.installed
    STOP.install()
    try:
        with pytest.raises(SystemExit) as exc:
            run(compose_config(FAULTS), tmp_path / "run")
    finally:
        if not installed:
            STOP.uninstall()
    assert exc.value.code == 128 + signal.SIGTERM
    assert rundir.read_status(tmp_path / "run")["state"] == rundir.INTERRUPTED
    assert rundir.resume_point(tmp_path / "run") is not None
    capsys.readouterr()


# -- the edge of every command ------------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_the_traceback_waits_for_debug(tmp_path, capsys, monkeypatch):
    from train.core import edge

    @edge.command
    def main(argv):
        if argv and argv[0] == "disk":
            raise OSError(28, "No space left on device", str(tmp_path / "out"))
        raise KeyError("a bug")

    monkeypatch.delenv(edge.DEBUG_ENV, raising=False)
    assert main([]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "unexpected KeyError: 'a bug'" in line and f"--debug or {edge.DEBUG_ENV}=1" in line
    assert main(["disk"]) == 4
    assert f"No space left on device: {tmp_path / 'out'}" in one_line_error(capsys.readouterr().err)
    assert main(["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
