"""One-line errors for bad input (no traceback, exit 2, nothing written): config values checked
in process, and the real command line (no torch import: these are fast)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import cli, compose_config, one_line_error
from train.cli import run


# -- bad input: config values (in process: validation runs before anything is built) -----------

BAD_CONFIGS = [
    (["model.n_layers=0"], "model.n_layers must be positive"),
    (["model.d_model=-8"], "model.d_model must be positive"),
    (["model.n_heads=0"], "model.n_heads must be positive"),
    (["data.n_ctx=0"], "data.n_ctx must be positive"),
    (["train.batch_size=0"], "train.batch_size must be positive"),
    (["train.total_tokens=-5"], "train.total_tokens must be positive"),
    (["train.total_tokens=1000"], "less than one batch"),
    (["probes.n_heldout=0"], "probes.n_heldout must be positive"),
    (["probes.n_heldout_mixture=0"], "probes.n_heldout_mixture must be positive"),
    (["model.positional=rotary", "model.d_head=15"], "rotary needs an even model.d_head"),
    (["probes.icl_late=70"], "probes.icl_late=70 lies outside the context"),
    (["probes.icl_early=-1"], "probes.icl_early=-1 lies outside the context"),
    (["probes.repeats=40"], "is longer than the context data.n_ctx=64"),
    (["model.positional=alibi"], "unknown model.positional 'alibi'"),
    (["data=tokens", "data.path=/nonexistent/tokens.npy"], "data.path does not exist: /nonexistent/tokens.npy"),
    (["data=tokens"], "data=tokens needs data.path=FILE"),
    (["optim.lr_schedule=step"], "unknown optim.lr_schedule 'step'"),
    (["device=tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_value_is_one_line_error(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run(compose_config(["logger=none", *overrides]), run_dir)
    assert exc.value.code == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not run_dir.exists()  # rejected before the run directory was even created


def test_unreadable_data_file_is_one_line_error(tmp_path, capsys):
    """Caught while building the data (inside Hydra's instantiate), reported without its wrapper."""
    bad = tmp_path / "tokens.npy"
    bad.write_bytes(b"this is not a numpy file")
    with pytest.raises(SystemExit) as exc:
        run(compose_config(["logger=none", "device=cpu", "data=tokens", f"data.path={bad}"]), tmp_path / "run")
    assert exc.value.code == 2
    assert f"cannot read tokens from {bad}: not a .npy file" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # the directory its start made is gone again


def test_dropping_a_callback_others_need_is_one_line_error(tmp_path, capsys):
    """The classification reads the attention scores: dropping them fails before training."""
    with pytest.raises(SystemExit) as exc:
        run(compose_config(["logger=none", "device=cpu", "callbacks.attention=null"]), tmp_path / "run")
    assert exc.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert "callbacks.circuits needs 'previous_token', which no configured callback provides" in line
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "status.json").exists()


def test_d_model_need_not_equal_heads_times_d_head():
    """W_O maps n_heads * d_head back to d_model, so the sizes are independent (documented)."""
    from hydra.utils import instantiate

    from train.core.config import validate

    cfg = compose_config(["model.d_model=30", "model.n_heads=3", "model.d_head=7"])
    validate(cfg)
    model = instantiate(cfg.model)
    logits = model(torch.zeros(2, 10, dtype=torch.long)).logits
    assert logits.shape == (2, 10, cfg.data.vocab_size) and torch.isfinite(logits).all()


# -- bad input through the real command line (no torch import: these are fast) ----------------

def test_cli_bad_value_exits_2_without_traceback(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("logger=none", "model.positional=rotary", "model.d_head=7", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert "even model.d_head" in one_line_error(proc.stderr)
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("override,message", [("model.n_layer=3", "no key 'n_layer' in model; did you mean n_layers?"),
                                              ("model.n_layers=two", "could not be converted to Integer"),
                                              ("data.path=tokens.npy", "data.path belongs to data=tokens")])
@pytest.mark.slow
def test_cli_composition_error_exits_2_without_traceback(tmp_path, override, message):
    proc = cli("logger=none", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert message in one_line_error(proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_resume_of_a_missing_dir(tmp_path):
    proc = cli(f"resume={tmp_path / 'nothing'}")
    assert proc.returncode == 2
    assert "resume: no run directory at" in one_line_error(proc.stderr)
    assert not (tmp_path / "nothing").exists()  # Hydra did not create it


@pytest.mark.slow
def test_cli_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = cli("logger=none", f"hydra.run.dir={blocker / 'run'}")
    assert proc.returncode == 2
    assert "cannot write to the output directory" in one_line_error(proc.stderr)
    assert blocker.read_text() == "not a directory"
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = cli("logger=none", f"hydra.run.dir={locked / 'run'}")
        assert proc.returncode == 2 and "cannot write" in one_line_error(proc.stderr)
