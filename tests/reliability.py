"""What tests/test_reliability.py and tests/test_resume_input.py share: tiny single-threaded runs
(bit-identical CPU results need the same thread count in every process) and what they check of a
run directory."""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

from tests.helpers import compose_config
from train.cli import run
from train.core import rundir

BASE_CALLBACKS = ("attention", "copying", "heldout")


def drop_extra_callbacks() -> list[str]:
    """Keep the three basic callbacks only (the tests are about the loop, not the scores)."""
    return [f"~callbacks.{name}" for name in compose_config().callbacks if name not in BASE_CALLBACKS]


def snapshot(run_dir: Path) -> dict[str, str]:
    """The SHA-256 of every file under `run_dir`, by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def checkpoints(run_dir: Path) -> list[str]:
    return [d.name for d in rundir.list_checkpoints(run_dir)]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until `predicate()` holds; AssertionError when the training `proc` ends first or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc={proc.returncode}) before the test could stop it:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training did not reach the expected checkpoint in time")
        time.sleep(0.02)


def train_in_process(run_dir: Path, overrides: list[str]) -> Path:
    run(compose_config(overrides), run_dir)
    return run_dir
