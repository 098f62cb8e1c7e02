"""Config composition with Hydra's compose API: every file in conf/, typed-schema errors, and a
multirun sweep launched as a subprocess."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from tests.helpers import CONF_DIR, compose_config
from train.callbacks import Callback
from train.model import AttnOnlyTransformer

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_file_composes_and_builds(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = instantiate(cfg.model)
    assert isinstance(model, AttnOnlyTransformer)
    assert model.d_vocab == cfg.data.vocab_size and model.n_ctx == cfg.data.n_ctx
    data = instantiate(cfg.data)
    batch = data.batch(0, 2)
    assert batch.shape == (2, cfg.data.n_ctx)
    for cb_cfg in cfg.callbacks.values():
        assert isinstance(instantiate(cb_cfg), Callback)
    instantiate(cfg.logger)


def test_groups_mirror_the_code():
    assert {"model", "data", "optim", "callbacks", "logger", "experiment"} <= set(GROUPS)


def test_misspelled_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.n_layer=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["model.n_layers=two"])


def test_experiments_change_what_they_say():
    assert compose_config(["experiment=one_layer"]).model.n_layers == 1
    cfg = compose_config(["experiment=smeared_keys_1l"])
    assert cfg.model.n_layers == 1 and cfg.model.smeared_keys
    assert compose_config(["experiment=shortformer"]).model.positional == "shortformer"


def test_multirun_sweep_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "train", "-m", "model.n_layers=1,2", "experiment=smoke", "device=cpu", "logger=none",
           "train.total_tokens=60000", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 2
    layers = sorted(OmegaConf.load(r / "config.yaml").model.n_layers for r in runs)
    assert layers == [1, 2]
    for r in runs:
        assert (r / "metrics.jsonl").read_text().count("\n") >= 5


def test_quick_start_command_writes_a_dated_run_directory(tmp_path):
    """`python -m train` with no run directory given: Hydra's default outputs/DATE/TIME."""
    cmd = [sys.executable, "-m", "train", "experiment=smoke", "device=cpu", "logger=none", "train.total_tokens=60000"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "outputs").glob("*/*/metrics.jsonl"))
    assert len(runs) == 1
    assert "run directory:" in proc.stdout
