"""The tools around training used as a careless or hostile user would, one test per case of the
issue "never lose a user's file, never run a stranger's code" (the README's faults table names
each): where the tools write (a user's directory, a run, a file, a link; the rule:
train/core/outputs.py, tested on its own in tests/test_outputs.py) and what code they run (a
run's tokenizer, a checkpoint's). Victim files (tests/victims.py) must keep their hashes; every
refusal is one line and leaves nothing behind. The tools run in-process (`main(argv)`) on a run
directory made by hand. The token cache and the settings: tests/test_hostile_data.py; damaged
inputs, full disks, signals and the commands' edge: tests/test_hostile_tools.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, compose_config, one_line_error
from tests.presets import SIX_STEPS
from tests.victims import edit_json, export, hashes, leftovers, plant, refused, report
from train.cli import run
from train.core import rundir


# -- deleting what is not ours ----------------------------------------------------------------------
EXPORT_TARGETS = {  # the --out given, and the line that refuses it
    "a_users_directory": (lambda tmp, run: plant(tmp / "mine"), "holds files that are not an export's"),
    "the_run_itself": (lambda tmp, run: run, "is a run directory"),
    "the_parent_of_runs": (lambda tmp, run: tmp, "holds files that are not an export's"),
    "the_runs_checkpoints": (lambda tmp, run: run / rundir.CHECKPOINTS, "lies inside the run"),
    "one_checkpoint": (lambda tmp, run: rundir.list_checkpoints(run)[0], "lies inside the run"),
    "a_file": (lambda tmp, run: plant(tmp, ("notes.txt",)) / "notes.txt", "is not a directory"),
}


@pytest.mark.parametrize("target", list(EXPORT_TARGETS))
def test_export_refuses_an_out_that_is_not_an_export(target, a_run, tmp_path, capsys):
    make, message = EXPORT_TARGETS[target]
    out = make(tmp_path, a_run)
    before = hashes(tmp_path)
    refused(export(a_run, "--out", out), capsys, message)
    assert hashes(tmp_path) == before and not leftovers(tmp_path)


def test_export_never_touches_what_lies_beside_its_out(a_run, tmp_path, capsys):
    """An unrelated DIR.tmp beside --out DIR stays; a second export replaces the first; --force
    writes into a user's directory beside the user's files."""
    beside = plant(tmp_path / "exp.tmp")
    before = hashes(beside)
    assert export(a_run, "--out", tmp_path / "exp") == 0
    assert export(a_run, "--out", tmp_path / "exp") == 0  # its own export: replaced
    mine = plant(tmp_path / "mine")
    users = hashes(mine)
    assert export(a_run, "--out", mine, "--force") == 0
    assert (mine / "model.safetensors").is_file() and all(hashes(mine)[k] == v for k, v in users.items())
    assert hashes(beside) == before and not leftovers(tmp_path)
    capsys.readouterr()


def test_report_refuses_a_users_directory_and_force_keeps_its_files(a_run, tmp_path, capsys):
    out = plant(tmp_path / "mine", ("precious.txt", "figures/my_plot.png"))
    before = hashes(out)
    refused(report(a_run, "--out", out), capsys, "holds files that are not a report's")
    assert hashes(out) == before


def test_report_is_a_file_is_refused(a_run, capsys):
    (a_run / "report").write_text("my notes")
    before = hashes(a_run)
    refused(report(a_run), capsys, "is not a directory")
    assert hashes(a_run) == before


def _startup(run_dir: Path, *overrides: str):
    """The Hydra callback that prepares a start before Hydra writes into the run directory (what
    `python -m train hydra.run.dir=...` runs first), in this process."""
    from hydra import compose, initialize_config_dir

    from train.cli import RunDirCheck

    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SIX_STEPS, *overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    try:
        RunDirCheck().on_run_start(cfg)
    finally:
        HydraConfig.instance().cfg = None  # the job's Hydra config ends with the job


@pytest.mark.parametrize("config", ["good", "refused"])
def test_a_new_run_refuses_a_users_directory_and_deletes_nothing_there(config, tmp_path, capsys):
    """hydra.run.dir at someone's folder (its own `.hydra/` and logs): refused before Hydra writes
    anything, and a refused config's clean-up deletes nothing there."""
    d = plant(tmp_path / "mine", ("precious.txt", ".hydra/config.yaml", "app.log", "__main__.log"))
    before = hashes(d)
    with pytest.raises(SystemExit) as exc:
        _startup(d, *(["optim.lr=-1"] if config == "refused" else []))
    assert exc.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert ("optim.lr must be positive" if config == "refused" else "holds files of its own") in line
    assert hashes(d) == before


def test_series_refuses_an_out_with_a_status_of_someone_elses(a_run, tmp_path, capsys):
    from analysis.series import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / rundir.STATUS_FILE).write_text('{"mine": true}')
    before = hashes(out)
    refused(main([str(a_run), "--out", str(out)]), capsys, "is a run directory")  # status.json: a run's file
    assert hashes(out) == before


# -- links and planted code ---------------------------------------------------------------------------
def test_report_never_writes_through_a_link(a_run, tmp_path, capsys):
    target = plant(tmp_path / "elsewhere", ("figures/keep.png", "summary.json"))
    os.symlink(target, a_run / "report")
    before = hashes(target)
    refused(report(a_run), capsys, "is a symbolic link")
    assert hashes(target) == before


def test_by_config_never_writes_through_a_link(a_run, tmp_path, capsys):
    from analysis.by_config import main

    target = plant(tmp_path / "elsewhere")
    os.symlink(target, tmp_path / "by_config")
    before = hashes(target)
    refused(main([str(tmp_path), "--key", "seed"]), capsys, "is a symbolic link")
    assert hashes(target) == before


def test_resume_refuses_a_run_whose_checkpoints_are_a_link(a_run, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    shutil.move(a_run / rundir.CHECKPOINTS, target)
    os.symlink(target, a_run / rundir.CHECKPOINTS)
    plant(target, ("step_0000099.tmp/precious.txt",))  # what a resume would delete as a half-written checkpoint
    edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
    before = hashes(target, a_run)
    with pytest.raises(SystemExit) as exc:
        run(compose_config([f"resume={a_run}"]), a_run)
    assert exc.value.code == 2
    assert "is a symbolic link" in one_line_error(capsys.readouterr().err)
    assert hashes(target, a_run) == before


def _tokenizer_dir(root: Path) -> Path:
    from train.core.text import train_bpe

    train_bpe(iter(["the tokenizer of a text run " * 50]), 300).save(root / rundir.TOKENIZER_DIR)
    return root / rundir.TOKENIZER_DIR


@pytest.mark.parametrize("planted", ["model_code", "link_out"])
def test_export_saves_the_tokenizer_again_and_carries_nothing_planted(planted, a_run, tmp_path, capsys):
    from analysis.export import MODELING_FILE, ExportError, write_tokenizer
    from train.core.runs import Run

    tokenizer = _tokenizer_dir(a_run)
    out = tmp_path / "out"
    out.mkdir()
    if planted == "model_code":  # it would replace the export's model code, run by trust_remote_code=True
        (tokenizer / MODELING_FILE).write_text("open('PWNED', 'w')\n")
        write_tokenizer(Run(a_run), out)
        assert not (out / MODELING_FILE).exists() and (out / "tokenizer.json").is_file()
    else:  # a link would copy an outside file's content into the export
        secret = plant(tmp_path / "secret", ("key.txt",)) / "key.txt"
        os.symlink(secret, tokenizer / "notes.txt")
        with pytest.raises(ExportError, match="holds notes.txt, a link or directory"):
            write_tokenizer(Run(a_run), out)
        assert list(out.iterdir()) == []


def _evil_tokenizer(directory: Path, trap: Path) -> Path:
    """A checkpoint directory whose tokenizer names code of its own; the code, if run, writes `trap`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                       "vocab_size": 64}))
    (directory / "evil_tok.py").write_text(f"open({str(trap)!r}, 'w').close()\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    return directory


def test_series_refuses_code_a_tokenizer_names_unless_trusted(tmp_path, capsys):
    from analysis.series import main

    _evil_tokenizer(tmp_path / "m" / "step1", tmp_path / "PWNED")
    before = hashes(tmp_path)
    refused(main([str(tmp_path / "m"), "--out", str(tmp_path / "s")]), capsys, "give --trust-remote-code to run it")
    assert hashes(tmp_path) == before and not (tmp_path / "s").exists()


def test_a_training_tokenizer_that_names_code_is_refused(tmp_path):
    from train.core.config import ConfigError
    from train.core.text import pretrained_tokenizer

    _evil_tokenizer(tmp_path, tmp_path / "PWNED")
    with pytest.raises(ConfigError, match="names code of its own"):
        pretrained_tokenizer(str(tmp_path))
    assert not (tmp_path / "PWNED").exists()
