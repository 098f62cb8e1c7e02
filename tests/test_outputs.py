"""The one rule for every output path (train/core/outputs.py) on hand-made directories: what a
tool may write into, what it refuses, how it replaces its own outputs and never a user's file,
never through a link; the run directory's checks, lock and start-up clean-up. The tools' own
cases, one per case of the issue: tests/test_hostile.py."""
from __future__ import annotations

import os

import pytest

from tests.victims import hashes, plant
from train.core import outputs, rundir
from train.core.config import ConfigError
from train.core.outputs import OutputError


def _run(root):
    root.mkdir(parents=True)
    (root / rundir.CONFIG_FILE).write_text("model: {}\n")
    (root / rundir.CHECKPOINTS / "step_0000001").mkdir(parents=True)
    return root


@pytest.mark.parametrize("case, expected", [
    ("new", True), ("empty", True), ("marked", True), ("legacy", True),
    ("user_dir", "holds files that are not a report's"), ("file", "is not a directory"),
    ("link", "is a symbolic link"), ("run", "is a run directory"), ("checkpoint", "lies inside the run"),
    ("other_kind", "holds an export, not a report"),
])
def test_check_output_dir(case, expected, tmp_path):
    out = tmp_path / "out"
    if case == "empty":
        out.mkdir()
    elif case == "marked":
        outputs.write_marker(plant(out), "report")
    elif case == "legacy":  # a report written before markers existed
        (out / "figures").mkdir(parents=True)
        (out / "report.html").write_text("<html>")
        (out / "summary.json").write_text("{}")
    elif case == "user_dir":
        plant(out)
    elif case == "file":
        out.write_text("a user's file")
    elif case == "link":
        os.symlink(plant(tmp_path / "elsewhere"), out)
    elif case == "run":
        _run(out)
    elif case == "checkpoint":
        out = _run(tmp_path / "r") / rundir.CHECKPOINTS / "step_0000001"
    elif case == "other_kind":
        outputs.write_marker(plant(out), "export")
    before = hashes(tmp_path)
    if expected is True:
        assert outputs.check_output_dir(out, "report") is True
    else:
        with pytest.raises(OutputError, match=expected):
            outputs.check_output_dir(out, "report")
    assert hashes(tmp_path) == before


def test_force_writes_beside_a_users_files_and_never_into_a_run(tmp_path):
    out = plant(tmp_path / "out")
    (out / "summary.json").write_text("the user's summary")
    before = {k: v for k, v in hashes(out).items() if not k.endswith("summary.json")}
    with outputs.staged(out, "report", force=True) as tmp:
        (tmp / "summary.json").write_text("{}")
        (tmp / "notes").mkdir()
        (tmp / "notes" / "new.md").write_text("new")
    assert (out / "summary.json").read_text() == "{}" and (out / "notes" / "new.md").read_text() == "new"
    assert all(hashes(out)[k] == v for k, v in before.items())  # merged: nothing of the user's deleted
    assert outputs.marker_kind(out) is None  # still not the report's own
    with pytest.raises(OutputError, match="is a run directory"):
        outputs.check_output_dir(_run(tmp_path / "run"), "report", force=True)


def test_own_outputs_are_replaced_whole_and_links_replaced_not_followed(tmp_path):
    out = tmp_path / "out"
    victim = plant(tmp_path / "victim")
    with outputs.staged(out, "report") as tmp:
        (tmp / "figures").mkdir()
        (tmp / "figures" / "old.png").write_text("old")
    assert outputs.marker_kind(out) == "report"
    os.symlink(victim / "precious.txt", out / "summary.json")  # planted links inside the output
    os.symlink(victim / "notes", out / "report.html")
    before = hashes(victim)
    with outputs.staged(out, "report") as tmp:
        (tmp / "figures").mkdir()
        (tmp / "figures" / "new.png").write_text("new")
        (tmp / "summary.json").write_text("{}")
        (tmp / "report.html").write_text("<html>")
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["new.png"]
    assert not (out / "summary.json").is_symlink() and (out / "summary.json").read_text() == "{}"
    assert hashes(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]  # no temporaries left


def test_an_error_while_building_leaves_the_output_as_it_was(tmp_path):
    out = plant(tmp_path / "out")
    outputs.write_marker(out, "report")
    before = hashes(tmp_path)
    with pytest.raises(RuntimeError):
        with outputs.staged(out, "report") as tmp:
            (tmp / "precious.txt").write_text("half")
            raise RuntimeError("disk full")
    assert hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case, expected", [("rows", None), ("user_file", "not a file this project wrote"),
                                            ("link", "is a symbolic link"), ("in_checkpoints", "checkpoints of the run")])
def test_check_output_file(case, expected, tmp_path):
    path = tmp_path / "re.jsonl"
    if case == "rows":
        path.write_text('{"step": 0, "tokens": 0}\n')
    elif case == "user_file":
        path.write_text("my notes\n")
    elif case == "link":
        os.symlink(plant(tmp_path / "v") / "precious.txt", path)
    else:
        path = _run(tmp_path / "r") / rundir.CHECKPOINTS / "step_0000001" / "re.jsonl"
    if expected is None:
        outputs.check_output_file(path)
    else:
        with pytest.raises(OutputError, match=expected):
            outputs.check_output_file(path)
    if case == "user_file":
        outputs.check_output_file(path, force=True)


@pytest.mark.parametrize("case, expected", [
    ("new", None), ("empty", None), ("stale_stub", None), ("user_dir", "holds files of its own"),
    ("user_hydra_record", "holds files of its own"), ("link", "is a symbolic link"), ("run", "already holds a run"),
])
def test_check_new_run_dir(case, expected, tmp_path):
    d = tmp_path / "run"
    if case == "empty":
        d.mkdir()
    elif case == "stale_stub":  # a start killed before its config.yaml: its lock, Hydra's record and log
        (d / ".hydra").mkdir(parents=True)
        (d / ".lock").touch()
        (d / "__main__.log").write_text("")
    elif case == "user_dir":
        plant(d)
    elif case == "user_hydra_record":  # someone's Hydra app ran here: no lock of this project's
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("mine: 1\n")
        (d / "app.log").write_text("")
    elif case == "link":
        os.symlink(tmp_path, d)
    elif case == "run":
        _run(d)
    before = hashes(tmp_path)
    if expected is None:
        outputs.check_new_run_dir(d)
    else:
        with pytest.raises(ConfigError, match=expected):
            outputs.check_new_run_dir(d)
    assert hashes(tmp_path) == before
    if case == "user_hydra_record":  # a sweep job's own directory, which Hydra wrote its record into
        outputs.check_new_run_dir(d, hydra_record=True)


def test_stub_clean_up_removes_only_what_this_process_made(tmp_path):
    users = plant(tmp_path / "users")
    (users / ".hydra").mkdir()
    (users / "app.log").write_text("the user's log")
    before = hashes(users)
    outputs.remove_stub(users)  # never locked by this process: untouched
    assert hashes(users) == before
    made = tmp_path / "a" / "b" / "run"
    outputs.acquire_lock(made)
    (made / ".hydra").mkdir()
    (made / "__main__.log").write_text("")
    outputs.release_lock(made)
    outputs.remove_stub(made)
    assert not (tmp_path / "a").exists()  # the stub, the directory and the parents it made
    empty = tmp_path / "empty"
    empty.mkdir()
    outputs.acquire_lock(empty)
    outputs.release_lock(empty)
    outputs.remove_stub(empty)
    assert empty.is_dir() and not list(empty.iterdir())  # someone's empty directory stays


def test_atomic_writes_never_write_through_a_planted_temporary(tmp_path):
    victim = plant(tmp_path / "v")
    before = hashes(victim)
    for pid in (os.getpid(),):  # the name the old writer used
        os.symlink(victim / "precious.txt", tmp_path / f".status.json.{pid}.tmp")
    rundir.write_json_atomic(tmp_path / "status.json", {"state": "running"})
    assert hashes(victim) == before and rundir.read_status(tmp_path) == {"state": "running"}
