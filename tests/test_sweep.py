"""Sweeps on real launchers (Hydra's joblib launcher and submitit's local executor): a tiny 2 x 2
sweep each, ending with the job summary; outcomes read from status.json; one GPU per job."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cli_env
from tests.presets import SWEEP_JOB
from tests.wandb_files import read_offline_records
from train.core import rundir
from train.sweep import job_device, job_outcome, summary_lines



def sweep(tmp_path, launcher: str, *grid: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    sweep_dir = tmp_path / launcher
    proc = subprocess.run([sys.executable, "-m", "train", "-m", f"hydra/launcher={launcher}",
                           f"hydra.sweep.dir={sweep_dir}", *SWEEP_JOB, *grid], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    summary = proc.stderr[proc.stderr.index("sweep summary:"):].strip().splitlines()
    return proc, summary


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_processes_and_lists_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, summary = sweep(tmp_path, "parallel", "hydra.launcher.n_jobs=2", "logger=none", "model.n_layers=1,2",
                          "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary[0].startswith("sweep summary: 4 jobs") and "4 finished, 0 failed, 0 interrupted" in summary[0]
    jobs = summary[1:]
    assert [line.split()[1] for line in jobs] == ["0", "1", "2", "3"]
    for line in jobs:
        assert line.split()[2] == "finished"
        run_dir = line.split()[3]
        assert (rundir.read_status(run_dir) or {}).get("state") == rundir.FINISHED
        assert len(rundir.read_metrics(run_dir)) >= 2
    assert "model.n_layers=2" in jobs[3] and "seed=1" in jobs[3]


@pytest.mark.slow
def test_submitit_local_sweep_reports_failed_jobs_with_their_reason(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc, summary = sweep(tmp_path, "slurm_local", "logger=wandb", "logger.mode=offline", "model.n_layers=1,2",
                          "model.d_head=8,0")
    assert proc.returncode == 1  # Hydra's exit code when a job failed
    assert "2 finished, 2 failed, 0 interrupted" in summary[0]
    outcomes = {line.split()[1]: line for line in summary[1:]}
    assert set(outcomes) == {"0", "1", "2", "3"}
    for num in ("1", "3"):  # d_head=0: refused before training, nothing trained
        assert outcomes[num].split()[2] == "failed"
        assert outcomes[num].endswith("error: model.d_head must be positive and finite, got 0")
        assert rundir.read_status(outcomes[num].split()[3]) is None
    for num, layers in (("0", 1), ("2", 2)):
        assert outcomes[num].split()[2] == "finished"
        # wandb: the sweep's runs share one group, and carry the job's overrides as tags
        run = next(r for kind, r in read_offline_records(outcomes[num].split()[3]) if kind == "run")
        assert run.run_group == str(tmp_path / "slurm_local")
        assert {f"model.n_layers={layers}", "model.d_head=8"} <= set(run.tags)


def test_outcome_of_each_status_state(tmp_path):
    cases = {"done": (rundir.FINISHED, None), "broke": (rundir.FAILED, "TrainingError: non-finite loss at step 7"),
             "stopped": (rundir.INTERRUPTED, None), "killed": (rundir.RUNNING, None)}
    for i, (name, (state, error)) in enumerate(cases.items()):
        d = tmp_path / f"{i}_{name}"
        d.mkdir()
        rundir.write_status(d, state, 7, None, error=error)
    (tmp_path / "4_refused").mkdir()
    assert job_outcome(tmp_path / "0_done") == (rundir.FINISHED, "")
    assert job_outcome(tmp_path / "1_broke") == (rundir.FAILED, "TrainingError: non-finite loss at step 7")
    assert job_outcome(tmp_path / "2_stopped")[0] == rundir.INTERRUPTED
    assert job_outcome(tmp_path / "3_killed")[0] == rundir.INTERRUPTED  # status still says running
    assert job_outcome(tmp_path / "4_refused")[0] == rundir.FAILED
    assert "1 finished, 2 failed, 2 interrupted" in summary_lines(tmp_path)[0]


def test_one_gpu_per_job_only_with_auto_and_several_gpus():
    assert [job_device("auto", n, 4) for n in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert job_device("auto", 3, 1) == "auto"
    assert job_device("auto", 3, 0) == "auto"
    assert job_device("cpu", 3, 4) == "cpu"


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_its_own_run(tmp_path, monkeypatch):
    """SLURM requeues a preempted job with the same overrides into the same run directory: it
    continues the unfinished run there instead of refusing the directory."""
    from tests.helpers import train_run

    overrides = [*SWEEP_JOB, "logger=none"]
    train_run(tmp_path, overrides)
    last_step = rundir.read_status(tmp_path)["step"]
    rundir.write_status(tmp_path, rundir.INTERRUPTED, last_step, None)  # as if preempted at its last checkpoint
    with pytest.raises(SystemExit) as refused:  # not requeued: the directory already holds a run
        train_run(tmp_path, overrides)
    assert refused.value.code == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train_run(tmp_path, overrides)
    status = rundir.read_status(tmp_path)
    assert status["state"] == rundir.FINISHED and status["resumed_from_steps"] == [last_step]
