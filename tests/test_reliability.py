"""Reliability: exact resume after SIGKILL / SIGTERM (also SLURM-style requeue cycles and a
signal during the last step), numerical faults, a finished run refused, and wandb without a
network. Resuming damaged or foreign run directories: tests/test_resume_input.py; bad config
values and command lines: tests/test_errors.py.

Every training here is tiny and single-threaded (bit-identical CPU results need the same thread
count in every process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import cli as _cli
from tests.helpers import cli_env as _env
from tests.helpers import compose_config
from tests.helpers import one_line_error as _one_line_error
from tests.presets import ADAPTIVE_TINY, SIX_STEPS, TINY
from tests.reliability import checkpoints, drop_extra_callbacks, snapshot, train_in_process, wait_for
from train.core import checkpoint as ckpt
from train.core import rundir
from train.cli import run
from train.core.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]


# -- exact resume ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, single_thread):
    """The uninterrupted run."""
    return train_in_process(tmp_path_factory.mktemp("reference") / "run", TINY + drop_extra_callbacks())


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, single_thread):
    """The same run, SIGKILLed after 6 checkpoints, resumed through the CLI and stopped with
    SIGTERM, then resumed again to the end. Returns what was seen along the way."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    seen: dict = {"run_dir": run_dir}
    cmd = [sys.executable, "-m", "train", *TINY, *drop_extra_callbacks(), f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(checkpoints(run_dir)) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    seen["kill_rc"] = proc.returncode
    seen["killed_status"] = json.loads((run_dir / "status.json").read_text())
    seen["killed_checkpoints"] = checkpoints(run_dir)
    seen["hydra_record"] = snapshot(run_dir / ".hydra")
    # What a kill in the middle of a write leaves: a torn last metrics line and a half-written
    # checkpoint directory.
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 999999, "tokens": 1, "loss/hel')
    (run_dir / "checkpoints" / "step_0099999.tmp").mkdir()
    (run_dir / "checkpoints" / "step_0099999.tmp" / "meta.json").write_text("{")

    # Resume through the CLI (Hydra's run dir comes from resume=), then SIGTERM it between
    # checkpoints.
    n_before = len(seen["killed_checkpoints"])
    proc = subprocess.Popen([sys.executable, "-m", "train", f"resume={run_dir}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(checkpoints(run_dir)) >= max(10, n_before + 2), proc)  # step 30; next is 40
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    seen["term_rc"], seen["term_err"] = proc.returncode, err
    seen["term_status"] = json.loads((run_dir / "status.json").read_text())
    seen["term_checkpoints"] = {d.name: (rundir.read_meta(d)["kind"], (d / rundir.STATE_FILE).is_file())
                                for d in rundir.list_checkpoints(run_dir)}
    seen["stale_tmp_left"] = (run_dir / "checkpoints" / "step_0099999.tmp").exists()

    # And to the end, in process.
    train_in_process(run_dir, [f"resume={run_dir}"])
    return seen


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_is_bit_identical(reference, interrupted):
    run_dir = interrupted["run_dir"]
    assert interrupted["kill_rc"] == -signal.SIGKILL
    assert interrupted["killed_status"]["state"] == "running"  # killed hard: no chance to clean up
    killed_seconds = interrupted["killed_status"]["wall_seconds"]  # written at every checkpoint
    assert killed_seconds > 0
    ref_rows, rows = read_metrics(reference / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert len(ref_rows) == 15
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # no duplicates, no torn line
    assert rows == ref_rows  # every value, bit for bit (JSON floats round-trip exactly)
    assert checkpoints(run_dir) == checkpoints(reference)  # the interrupt checkpoint is gone again
    for name in checkpoints(reference):
        a = (reference / "checkpoints" / name / rundir.MODEL_FILE).read_bytes()
        b = (run_dir / "checkpoints" / name / rundir.MODEL_FILE).read_bytes()
        assert a == b, f"weights differ at {name}"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and len(status["resumed_from_steps"]) == 2
    assert status["wall_seconds"] > killed_seconds  # the SIGKILLed segment counts
    assert not interrupted["stale_tmp_left"]


@pytest.mark.slow
def test_adaptive_density_resumes_with_the_same_rows_and_checkpoints(tmp_path, single_thread, adaptive_run):
    """Under adaptive checkpoint density a run SIGKILLed, resumed, stopped by SIGTERM between
    watches (weights kept for lead-in checkpoints go into the interrupt checkpoint) and resumed
    again takes the same checkpoints for the same reasons, with the same rows and weights, as an
    uninterrupted run (`adaptive_run`, tests/conftest.py)."""
    overrides, reference = ADAPTIVE_TINY + drop_extra_callbacks(), adaptive_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(checkpoints(run_dir)) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    # the run's first lines: where it writes, then device and threads, data, model, tokens, schedule
    assert out.startswith(f"training in {run_dir}\n  device cpu, 1 thread (auto: OMP_NUM_THREADS=1)\n"), out
    assert "adaptive checkpoints: 14 base" in out
    proc = subprocess.Popen([sys.executable, "-m", "train", f"resume={run_dir}"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "step_0000040").is_dir(), proc)  # lead-ins at 44, 50 come at 52
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stop = int(next(line for line in err.splitlines() if line.startswith("received SIGTERM")).split("at step ")[1]
               .split(";")[0])
    kept = ckpt.load_train_state(rundir.checkpoint_dir(run_dir, stop))["watch"]["kept"]
    if 44 <= stop < 52:  # weights kept since the watch at 44 for the lead-ins decided at 52 are in the state
        assert 44 in {int(k) for k in kept}, (stop, list(kept))
    train_in_process(run_dir, [f"resume={run_dir}"])
    ref_rows, rows = read_metrics(reference / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert {r["checkpoint/reason"] for r in ref_rows} == {"base", "zoom", "lead-in", "tail"}
    assert rows == ref_rows
    assert checkpoints(run_dir) == checkpoints(reference)
    for name in checkpoints(reference):
        a = (reference / "checkpoints" / name / rundir.MODEL_FILE).read_bytes()
        assert a == (run_dir / "checkpoints" / name / rundir.MODEL_FILE).read_bytes(), name


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(interrupted):
    err = interrupted["term_err"]
    assert interrupted["term_rc"] == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("received SIGTERM at step "))
    step = int(line.split("at step ")[1].split(";")[0])
    assert interrupted["term_status"]["state"] == "interrupted" and interrupted["term_status"]["step"] == step
    kind, has_state = interrupted["term_checkpoints"][f"step_{step:07d}"]
    assert has_state  # resumable from exactly where it stopped
    assert kind in ("interrupt", "scheduled")
    assert step > int(interrupted["killed_checkpoints"][-1][5:])


@pytest.mark.slow
def test_resume_leaves_the_runs_hydra_record_alone(interrupted):
    run_dir = interrupted["run_dir"]
    assert snapshot(run_dir / ".hydra") == interrupted["hydra_record"]
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "resume=" not in overrides and "train.total_tokens=300000" in overrides


@pytest.mark.slow
def test_slurm_style_requeue_cycle_ends_as_an_uninterrupted_run(reference, tmp_path, single_thread):
    """A preempted job requeued again and again runs the same command (resume=auto), here with
    real subprocesses and signals: SIGKILL during start-up (nothing trained: the command then
    starts afresh), SIGTERM during start-up (kept until the first checkpoint), SIGTERM
    mid-training, SIGTERM while a checkpoint is being written; each SIGTERM exits 143. The
    metrics and weights equal the uninterrupted run's."""
    run_dir = tmp_path / "requeued"
    job = [*TINY, *drop_extra_callbacks(), "resume=auto", f"hydra.run.dir={run_dir}"]

    def launch():
        return subprocess.Popen([sys.executable, "-m", "train", *job], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def stop(proc, predicate, sig=signal.SIGTERM, poll=0.02):
        deadline = time.monotonic() + 300
        while not predicate():
            assert proc.poll() is None, f"ended (rc={proc.returncode}) before the signal:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(poll)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err

    # 1. Killed hard while starting (the lock taken, nothing trained): no run is left.
    rc, _ = stop(launch(), lambda: (run_dir / rundir.LOCK_FILE).exists(), signal.SIGKILL, poll=0.005)
    assert rc == -signal.SIGKILL and not any((run_dir / m).exists() for m in rundir.RUN_MARKERS)

    # 2. SIGTERM during start-up (Hydra has just written its record; nothing is built yet).
    launched = time.time()
    hydra_record = run_dir / ".hydra" / "hydra.yaml"
    rc, err = stop(launch(), lambda: hydra_record.exists() and hydra_record.stat().st_mtime >= launched - 1)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "received SIGTERM at step 0" in err and "Traceback" not in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"

    # 3. Mid-training.
    rc, err = stop(launch(), lambda: len(checkpoints(run_dir)) >= 4)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert f"resuming {run_dir} from step 0" in err

    # 4. While a checkpoint is being written (its temporary directory exists), or soon after.
    n = len(checkpoints(run_dir))
    tmp_dirs = lambda: any(p.name.endswith(rundir.TMP_SUFFIX) for p in (run_dir / "checkpoints").iterdir())
    rc, err = stop(launch(), lambda: tmp_dirs() or len(checkpoints(run_dir)) >= n + 3, poll=0.001)
    assert rc == 128 + signal.SIGTERM, err[-2000:]

    train_in_process(run_dir, job[:-1])  # the same config, in process, to the end
    assert read_metrics(run_dir / "metrics.jsonl") == read_metrics(reference / "metrics.jsonl")
    assert checkpoints(run_dir) == checkpoints(reference)
    for name in checkpoints(reference):
        assert (reference / "checkpoints" / name / rundir.MODEL_FILE).read_bytes() == \
            (run_dir / "checkpoints" / name / rundir.MODEL_FILE).read_bytes(), name
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["resumed_from_steps"][0] == 0
    assert len(status["resumed_from_steps"]) == 3

# -- numerical faults ---------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys, single_thread, monkeypatch):
    from train.loop import Trainer

    clean_loss = Trainer.loss

    def nan_at_step_9(self, tokens):  # the fault: a non-finite loss at step 9
        loss = clean_loss(self, tokens)
        return loss * float("nan") if self.step == 9 else loss

    monkeypatch.setattr(Trainer, "loss", nan_at_step_9)
    run_dir = tmp_path / "nan"
    overrides = SIX_STEPS + drop_extra_callbacks() + ["train.total_tokens=49152"]
    with pytest.raises(SystemExit) as exc:
        run(compose_config(overrides), run_dir)
    assert exc.value.code == 3
    line = _one_line_error(capsys.readouterr().err)
    assert "non-finite loss at step 9" in line
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["event"] == "nonfinite" and last["step"] == 9
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "step 9" in status["error"]
    newest = rundir.list_checkpoints(run_dir)[-1]
    assert int(newest.name[5:]) < 9 and (newest / rundir.STATE_FILE).is_file()
    model, _ = ckpt.load_model(newest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_deferred_finiteness_check_skips_updates_and_stops_at_the_next_checkpoint(tmp_path, capsys, single_thread,
                                                                                  monkeypatch):
    """The CUDA path, run on the CPU: no host sync per step; fused AdamW skips the update of the
    non-finite step and of every step after it, and the run stops at the next checkpoint naming
    the step, with no checkpoint written from it on."""
    from train.loop import Trainer

    clean_loss = Trainer.loss

    def nan_at_step_9(self, tokens):
        loss = clean_loss(self, tokens)
        return loss * float("nan") if self.step == 9 else loss

    monkeypatch.setattr(Trainer, "loss", nan_at_step_9)
    monkeypatch.setattr(Trainer, "defer_checks", True)
    seen = []
    clean_step = Trainer.train_step

    def remember(self, tokens):  # the weights before each step
        seen.append([p.detach().clone() for p in self.model.parameters()])
        return clean_step(self, tokens)

    monkeypatch.setattr(Trainer, "train_step", remember)
    run_dir = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        run(compose_config(SIX_STEPS + drop_extra_callbacks() + ["train.total_tokens=49152"]), run_dir)
    assert exc.value.code == 3
    assert "non-finite loss or gradient norm at step 9" in _one_line_error(capsys.readouterr().err)
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["event"] == "nonfinite" and last["step"] > 9
    assert len(seen) > 11 and not all(torch.equal(a, b) for a, b in zip(seen[8], seen[9]))  # updates before 9
    assert all(torch.equal(a, b) for later in seen[10:] for a, b in zip(seen[9], later))  # none from 9 on
    assert int(rundir.list_checkpoints(run_dir)[-1].name[5:]) < 9


# -- the command line refuses a finished run ----------------------------------------------------

@pytest.mark.slow
def test_cli_refuses_a_finished_run_dir_and_resuming_it(reference):
    before = snapshot(reference)
    proc = _cli("logger=none", f"hydra.run.dir={reference}")
    assert proc.returncode == 2
    assert "already holds a run (finished" in _one_line_error(proc.stderr)
    proc = _cli(f"resume={reference}")
    assert proc.returncode == 2
    assert "already finished" in _one_line_error(proc.stderr)
    assert snapshot(reference) == before  # Hydra's .hydra/ and log included: nothing written


@pytest.mark.slow
def test_a_signal_during_the_last_step_still_finishes(tmp_path, single_thread, monkeypatch):
    """SIGTERM while the last step runs: the run completes its final checkpoint and is finished
    (exit 0), not interrupted (a preempted job must not be requeued for nothing)."""
    from train.loop import Trainer

    clean_loss = Trainer.loss

    def term_in_last_step(self, tokens):
        if self.step == self.total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return clean_loss(self, tokens)

    monkeypatch.setattr(Trainer, "loss", term_in_last_step)
    run_dir = tmp_path / "last"
    row = run(compose_config(SIX_STEPS + drop_extra_callbacks()), run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and row["step"] == status["step"] == 6
    assert all(rundir.read_meta(d)["kind"] == "scheduled" for d in rundir.list_checkpoints(run_dir))


# -- wandb without a network --------------------------------------------------------------------

@pytest.mark.slow
def test_wandb_unreachable_falls_back_offline_quickly(tmp_path, monkeypatch, capsys):
    from train.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    logger = WandbLogger(project="reliability")
    t0 = time.perf_counter()
    run_id = logger.start(tmp_path, {"name": "t"})
    seconds = time.perf_counter() - t0
    logger.log({"tokens": 1, "loss/heldout": 1.0})
    logger.finish(0)
    assert "logging offline instead" in capsys.readouterr().err
    assert logger.mode_used == "offline" and run_id
    assert seconds < 30, f"wandb.init held training up for {seconds:.1f} s"
    # Resuming hands the same id back.
    again = WandbLogger(project="reliability")
    assert again.start(tmp_path, {"name": "t"}, run_id) == run_id
    again.finish(0)
