"""Resuming copies of a small stopped run: what is refused with one line, exit 2 and nothing
written (damaged checkpoints, pickled code in the resume state, code named in config.yaml, another
config under resume=auto) and what continues (an intact copy, keeping its wandb id; a run killed
before its first checkpoint). Exact resume and stop signals: tests/test_reliability.py.

Every training here is tiny and single-threaded (bit-identical CPU results need the same thread
count in every process)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_config
from tests.helpers import one_line_error as _one_line_error
from tests.presets import SIX_STEPS
from tests.reliability import checkpoints, drop_extra_callbacks, snapshot, train_in_process
from train.core import rundir
from train.cli import run
from train.core.rundir import read_metrics


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, single_thread):
    return train_in_process(tmp_path_factory.mktemp("small") / "run", SIX_STEPS + drop_extra_callbacks())


@pytest.fixture
def stopped_copy(small_run, tmp_path):
    """A copy of the small run that looks stopped early (so it may be resumed)."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "interrupted",
                                                     "wandb_run_id": "abc123xy"}))
    return run_dir


def _newest(run_dir: Path) -> Path:
    return rundir.list_checkpoints(run_dir)[-1]


def _resume_error(run_dir: Path, capsys, overrides: list[str] | None = None) -> str:
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exc:
        run(compose_config(overrides or [f"resume={run_dir}"]), run_dir)
    assert exc.value.code == 2
    line = _one_line_error(capsys.readouterr().err)
    assert snapshot(run_dir) == before  # nothing overwritten, nothing added
    return line


# -- another config, a run killed before its first checkpoint -----------------------------------

@pytest.mark.slow
def test_resume_auto_refuses_a_run_of_another_config(stopped_copy, capsys):
    line = _resume_error(stopped_copy, capsys, [*SIX_STEPS, *drop_extra_callbacks(), "seed=5", "resume=auto"])
    assert "resume=auto" in line and "holds a run of another config" in line and "seed=0 there, 5 here" in line


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(small_run, tmp_path, single_thread):
    """SIGKILL after config.yaml was written but before the first checkpoint (a torn step-0 row
    left): resume= starts it again from step 0 and ends as the uninterrupted run."""
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    shutil.copy(small_run / rundir.CONFIG_FILE, run_dir / rundir.CONFIG_FILE)
    rundir.write_status(run_dir, rundir.RUNNING, 0, None)
    (run_dir / rundir.METRICS_FILE).write_text('{"step": 0, "tokens": 0, "lr": 0.0, "loss/he')
    train_in_process(run_dir, [f"resume={run_dir}"])
    assert read_metrics(run_dir / "metrics.jsonl") == read_metrics(small_run / "metrics.jsonl")
    assert checkpoints(run_dir) == checkpoints(small_run)


# -- bad input: damaged checkpoints --------------------------------------------------------------

def test_resume_of_an_intact_copy_works_and_keeps_the_wandb_id(stopped_copy, monkeypatch, capsys):
    """The control for the damage tests below, and the wandb run id handed back on resume."""
    from train import loggers

    seen = []
    monkeypatch.setattr(loggers.NullLogger, "start", lambda self, d, c, run_id=None: seen.append(run_id) or run_id)
    run(compose_config([f"resume={stopped_copy}"]), stopped_copy)
    assert seen == ["abc123xy"]
    status = json.loads((stopped_copy / "status.json").read_text())
    assert status["state"] == "finished" and status["wandb_run_id"] == "abc123xy"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda d: _truncate(_newest(d) / rundir.MODEL_FILE), "model.safetensors (missing, truncated"),
    "corrupted weights": (lambda d: _garble(_newest(d) / rundir.MODEL_FILE), "model.safetensors (missing, truncated"),
    "truncated state": (lambda d: _truncate(_newest(d) / rundir.STATE_FILE), "cannot read resume state"),
    "corrupted meta": (lambda d: (_newest(d) / rundir.META_FILE).write_text('{"step": 6, "mo'),
                       "unreadable checkpoint metadata"),
    "no resume state": (lambda d: (_newest(d) / rundir.STATE_FILE).unlink(), "has no checkpoint with a resume state"),
    "other model in config": (
        lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("d_model: 32", "d_model: 48")),
        "was written by a different model: d_model=32 (config: 48)"),
    "corrupted metrics": (
        lambda d: (d / "metrics.jsonl").write_text("{bad\n" + (d / "metrics.jsonl").read_text()),
        "metrics.jsonl: line 1 is not valid JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused(stopped_copy, capsys, damage):
    spoil, message = DAMAGE[damage]
    spoil(stopped_copy)
    assert message in _resume_error(stopped_copy, capsys)


def test_weights_of_another_shape_are_refused(stopped_copy, capsys):
    from safetensors.torch import save_file

    from train.core.model import AttnOnlyTransformer

    other = AttnOnlyTransformer(d_vocab=64, n_ctx=64, d_model=48, layernorm=True)  # meta.json still says 32
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(_newest(stopped_copy) / rundir.MODEL_FILE))
    line = _resume_error(stopped_copy, capsys)
    assert "has shape" in line and "48" in line and "the model expects" in line


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_pickled_code_in_resume_state_is_refused(stopped_copy, tmp_path, capsys):
    # The payload is live: an unsafe load would run it.
    probe = tmp_path / "probe_marker"
    torch.save({"x": _Payload(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "pwned_marker"
    state = _newest(stopped_copy) / rundir.STATE_FILE
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "rng": {}, "loss_sum": torch.zeros(()),
                "loss_count": 0}, state)
    line = _resume_error(stopped_copy, capsys)
    assert "cannot read resume state" in line and "refused" in line
    assert "weights_only=False" not in line  # no advice to load it unsafely
    assert not marker.exists()


def test_config_yaml_naming_foreign_code_is_refused(stopped_copy, tmp_path, capsys):
    marker = tmp_path / "pwned_marker"
    config = (stopped_copy / "config.yaml").read_text()
    assert "  copying:\n    _target_: train.core.callbacks.CopyingScores\n" in config
    (stopped_copy / "config.yaml").write_text(config.replace(
        "_target_: train.core.callbacks.CopyingScores\n", f"_target_: os.system\n    command: touch {marker}\n"))
    assert "refusing callbacks.copying._target_='os.system'" in _resume_error(stopped_copy, capsys)
    assert not marker.exists()

