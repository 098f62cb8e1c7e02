"""Several processes through torchrun (train/distributed.py): two CPU ranks (gloo) train what one
process trains, only rank 0 writes (one run directory), a SIGTERM to one rank stops both at the
same step with a resumable checkpoint, and a bad config is one error line. The launcher-free
parts (environment, batch split, Hydra arguments of the other ranks, repeated signals) are
tested in process."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import cli_env, compose_config
from tests.presets import ADAPTIVE_TINY, DISTRIBUTED
from tests.reliability import drop_extra_callbacks
from train import distributed as D
from train.core import rundir
from train.cli import run
from train.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# 146 steps of 4096 tokens, 19 checkpoints: long enough to be stopped part-way.
TOLERANCE = 1e-4  # relative and absolute: the gradient all-reduce sums in another order


def _torchrun(*args: str, cwd: Path, tmpdir: Path, popen: bool = False):
    """`torchrun --standalone --nproc_per_node=2 -m train ARGS` with the venv's Python, one thread
    per rank, TMPDIR (where the other ranks' Hydra points) set to `tmpdir`."""
    env = dict(cli_env(), TMPDIR=str(tmpdir), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _rank_exit_codes(err: str) -> dict[int, int]:
    """Each rank's exit code from torchrun's failure report."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", err)
    return {int(rank): int(code) for rank, code in found}


def _close(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return a == b


def _assert_rows_agree(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys(), row["step"]
        bad = [k for k in ref if not _close(row[k], ref[k])]
        assert not bad, f"step {ref['step']}: {[(k, row[k], ref[k]) for k in bad[:3]]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, single_thread):
    """The run in one process (the same global batch)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(compose_config(DISTRIBUTED), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The same run under torchrun with two ranks, in the default run directory of its cwd."""
    where = tmp_path_factory.mktemp("two_ranks")
    (where / "cwd").mkdir()
    (where / "tmp").mkdir()
    proc = _torchrun(*DISTRIBUTED, cwd=where / "cwd", tmpdir=where / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return where, proc


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(single, two_ranks):
    where, proc = two_ranks
    run_dirs = [p.parent for p in (where / "cwd").rglob(rundir.METRICS_FILE)]
    assert len(run_dirs) == 1, run_dirs  # rank 0's, and nothing else
    rows, reference = rundir.read_metrics(run_dirs[0]), rundir.read_metrics(single)
    assert len(reference) == 19 and any(k.startswith("prefix_matching/") for k in reference[-1])
    _assert_rows_agree(rows, reference)  # losses, held-out loss, ICL score, every head score
    assert rundir.read_status(run_dirs[0])["state"] == "finished"
    assert [d.name for d in rundir.list_checkpoints(run_dirs[0])] == [d.name for d in rundir.list_checkpoints(single)]
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_adaptive_density_decides_the_same_under_torchrun(tmp_path, adaptive_run):
    """Under adaptive checkpoint density rank 0 decides at every watch and the other rank follows:
    the same checkpoints, for the same reasons, with the rows of one process (`adaptive_run`,
    tests/conftest.py)."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    proc = _torchrun(*ADAPTIVE_TINY, *drop_extra_callbacks(), cwd=tmp_path / "cwd", tmpdir=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "cwd").rglob(rundir.METRICS_FILE)]
    rows, reference = rundir.read_metrics(run_dir), rundir.read_metrics(adaptive_run)
    assert {r["checkpoint/reason"] for r in reference} == {"base", "zoom", "lead-in", "tail"}
    assert [(r["step"], r["checkpoint/reason"]) for r in rows] == [(r["step"], r["checkpoint/reason"]) for r in reference]
    _assert_rows_agree(rows, reference)


@pytest.mark.slow
def test_other_ranks_create_no_directory(two_ranks):
    where, _ = two_ranks
    # Their Hydra "run directory" is TMPDIR itself, without a .hydra/ record or a log; torchrun
    # keeps its own logs in torchelastic_* there.
    assert [p.name for p in (where / "tmp").iterdir() if not p.name.startswith("torchelastic_")] == []
    assert len(list((where / "cwd").rglob(".hydra"))) == 1


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_the_run_resumes(single, tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "tmp").mkdir()
    proc = _torchrun(*DISTRIBUTED, f"hydra.run.dir={run_dir}", cwd=ROOT, tmpdir=tmp_path / "tmp", popen=True)
    deadline = time.monotonic() + 150
    while len(rundir.list_checkpoints(run_dir)) < 8:
        assert proc.poll() is None, f"ended (rc={proc.returncode}) before the signal:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoints in time"
        time.sleep(0.02)
    ranks = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[next(int(v[5:]) for v in environ if v.startswith(b"RANK="))] = int(pid)
    os.kill(ranks[1], signal.SIGTERM)  # not rank 0: it learns of the signal from rank 1
    _, err = proc.communicate(timeout=120)
    assert _rank_exit_codes(err) == {0: 143, 1: 143}, err[-3000:]
    step = int(re.search(r"received SIGTERM at step (\d+);", err).group(1))
    assert err.count("received SIGTERM at step") == 1  # said once, by rank 0
    status = rundir.read_status(run_dir)
    assert status["state"] == "interrupted" and status["step"] == step
    newest = rundir.list_checkpoints(run_dir)[-1]
    assert rundir.checkpoint_step(newest) == step and (newest / rundir.STATE_FILE).is_file()
    assert step < 146

    proc = _torchrun(f"resume={run_dir}", cwd=ROOT, tmpdir=tmp_path / "tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {run_dir} from step {step}" in proc.stderr
    _assert_rows_agree(rundir.read_metrics(run_dir), rundir.read_metrics(single))
    assert [d.name for d in rundir.list_checkpoints(run_dir)] == [d.name for d in rundir.list_checkpoints(single)]
    assert rundir.read_status(run_dir)["resumed_from_steps"] == [step]


REFUSED = {
    "batch": ("train.batch_size=63", "train.batch_size=63 does not split over 2 processes (WORLD_SIZE); "
                                     "use a multiple of 2"),
    "value": ("model.n_layers=0", "model.n_layers must be positive and finite, got 0"),  # refused before Hydra's job
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_run_is_one_error_line_and_every_rank_exits_2(tmp_path, case):
    override, message = REFUSED[case]
    (tmp_path / "tmp").mkdir()
    proc = _torchrun(*DISTRIBUTED, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT, tmpdir=tmp_path / "tmp")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"], proc.stderr[-3000:]  # said once, by rank 0
    # Both exit 2 themselves: neither is left waiting for torchrun to kill it (-15, or -9 after 30 s).
    assert _rank_exit_codes(proc.stderr) == {0: 2, 1: 2}, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# -- in process -------------------------------------------------------------------------------------

def test_world_from_the_launchers_environment():
    assert D.world_from_env({}) == D.SINGLE
    assert D.world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == D.SINGLE
    world = D.world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.size, world.rank, world.local_rank, world.enabled, world.main) == (4, 3, 1, True, False)
    with pytest.raises(ConfigError, match="RANK=4 do not fit"):
        D.world_from_env({"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="not integers"):
        D.world_from_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})


def test_each_rank_trains_its_block_of_the_global_batch():
    import torch
    from hydra.utils import instantiate

    batch = instantiate(compose_config(DISTRIBUTED).data).batch(7, 64)
    shares = [batch[D.World(rank=r, size=4).rows(64)] for r in range(4)]
    assert [len(s) for s in shares] == [16] * 4
    assert torch.equal(torch.cat(shares), batch)
    with pytest.raises(ConfigError, match="train.batch_size=64 does not split over 3 processes"):
        D.World(rank=0, size=3).rows(64)


@pytest.fixture
def precheck():
    """train/__main__.py's `precheck`; importing the module installs the stop-signal handler,
    which is taken out again (other tests signal this process)."""
    from train.signals import STOP

    installed = STOP.installed
    from train.__main__ import precheck

    if not installed:
        STOP.uninstall()
    return precheck


def test_other_ranks_give_hydra_no_directory_of_their_own(precheck):
    import tempfile

    follower = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    argv = precheck(["logger=none", "hydra.run.dir=/somewhere", "resume=/runs/r"], follower)
    assert "hydra.run.dir=/somewhere" not in argv and "hydra.run.dir=/runs/r" not in argv
    assert argv[-3:] == [f"hydra.run.dir={tempfile.gettempdir()}", "hydra.output_subdir=null",
                         "hydra/job_logging=none"]
    leader = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert precheck(["logger=none", "hydra.run.dir=/somewhere"], leader) == ["logger=none", "hydra.run.dir=/somewhere"]
    with pytest.raises(SystemExit) as exc:
        precheck(["-m", "seed=0,1"], follower)
    assert exc.value.code == 2


def test_a_repeated_signal_counts_once():
    """The same signal again within the window (torchrun, uv or SLURM forwarding the job's
    SIGTERM) counts once, in every launch mode (train/signals.py); another signal stops at once."""
    from train.signals import StopSignal

    stop = StopSignal(window=60)
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded by the launcher
        time.sleep(0.05)
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
