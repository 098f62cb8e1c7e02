"""Shared helpers for tests: compose configs with Hydra's compose API and run short trainings."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from train.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()

# A short CPU run that still shows the phase change (about 30 s for 2 layers on 2 cores).
SHORT_RUN = [
    "logger=none",
    "device=cpu",
    "train.total_tokens=2500000",
    "schedule.n_log=30",
    "schedule.n_linear=20",
    "probes.n_heldout=128",
]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    from train.cli import run

    run(compose_config(overrides), Path(run_dir))
    return Path(run_dir)
