"""Shared helpers for tests: compose configs with Hydra's compose API and run short trainings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.core.config import compose, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
register_configs()



def compose_config(overrides: list[str] | None = None):
    return compose(list(overrides or []))


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    from train.cli import run

    run(compose_config(overrides), Path(run_dir))
    return Path(run_dir)


def cli_env() -> dict[str, str]:
    """The environment of a training subprocess: single-threaded (bit-identical CPU results need
    the same thread count in every process), offline, unbuffered."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a subprocess (environment: cli_env)."""
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(err: str) -> str:
    """The error output must be exactly one line 'error: ...' (Hydra's log lines aside)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def checkpoint_tokens(total: int, first: int, n_log: int, n_linear: int):
    """Token counts like the checkpoint schedule's: step 0, log-spaced from `first`, then linear."""
    import numpy as np

    t = np.concatenate([[0], np.geomspace(first, total, n_log), np.linspace(total / n_linear, total, n_linear)])
    return np.unique(np.round(t))


def sigmoid(z):
    import numpy as np

    return 1 / (1 + np.exp(-z))
