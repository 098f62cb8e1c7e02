"""Where a tool may write: the one rule for every output path (a run directory, an export, a
report, a by_config table, a series, recomputed rows).

* A tool writes only into a directory it creates, an empty one, or one that carries its marker
  (`MARKER`, a small JSON file naming the kind of output: `report`, `export`, ...); directories
  written before markers existed are recognised by their files (`KINDS`). Anything else is
  refused with one line: a file, a symbolic link, a run directory or a part of one, another
  kind's output, a directory holding other files. `force` (the tools' `--force`) writes into
  such a directory anyway, never into a run: files of the names the tool writes are replaced,
  nothing else is touched, and no marker is left.
* Outputs are built in a fresh temporary directory beside the target (`staged`) and moved in
  when complete, each entry by one rename: an error leaves the target as it was, and nothing the
  tool did not create is ever deleted.
* No symbolic link is followed out of a directory the tool owns: the target itself may not be
  one, and an entry that is one is replaced as a link (the rename replaces the link, not what it
  points to).

A single output file (`check_output_file`) may replace only a file that holds this project's
rows (`looks_ours`), unless forced; it is written under a temporary name and renamed
(train/core/rundir.py write_text_atomic). No torch."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from train.core.config import ConfigError
from train.core.rundir import (CHECKPOINTS, CONFIG_FILE, FINISHED, LOCK_FILE, METRICS_FILE, RUN_MARKERS, STATUS_FILE,
                               TOKENIZER_DIR, read_status)

MARKER = ".induction-tracker.json"
# kind -> (the names it writes, glob patterns; one of the files that says it is one, glob patterns):
# how a directory of that kind written before markers existed is recognised.
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "report": (("summary.json", "report.html", "figures", "wandb_history"), ("report.html",)),
    "by_config": (("by_config.md", "by_config.png"), ("by_config.md",)),
    "series": (("series.json", "metrics.jsonl", "status.json"), ("series.json",)),
    "export": (("induction_tracker.json", "*.json", "*.safetensors", "*.py", "*.txt", "*.model", "tokenizer",
                "step_*"), ("induction_tracker.json", "step_*/induction_tracker.json")),
}


class OutputError(ValueError):
    """An output path a tool may not write to: one line, nothing written."""


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def marker_kind(directory: Path) -> str | None:
    """The kind named by a directory's marker (None: no marker, or not a readable one)."""
    path = Path(directory) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read(4096))
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def write_marker(directory: Path, kind: str) -> None:
    (Path(directory) / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def _legacy(directory: Path, kind: str, names: list[str]) -> bool:
    """A directory of `kind` written before markers existed: only names the kind writes, and one
    of the files that say what it is."""
    allowed, required = KINDS.get(kind, ((), ()))
    if not required or not all(any(fnmatch.fnmatchcase(n, p) for p in allowed) for n in names):
        return False
    return any(any(True for _ in directory.glob(pattern)) for pattern in required)


def run_part(path: Path) -> Path | None:
    """The run directory that `path` is, or whose checkpoints it is or lies in (None: neither). A
    directory with a marker is an output of its kind, not a run (a series holds a run's files)."""
    def is_run(d: Path) -> bool:
        return d.is_dir() and marker_kind(d) is None and any((d / n).exists() or (d / n).is_symlink()
                                                                 for n in RUN_MARKERS)

    path = Path(path).absolute()
    if is_run(path):
        return path
    for p in (path, *path.parents):
        if p.name == CHECKPOINTS and is_run(p.parent):
            return p.parent
    return None


def check_output_dir(path: Path, kind: str, force: bool = False, what: str | None = None) -> bool:
    """May output of `kind` be written to directory `path` (module docstring)? True: the
    directory is new, empty or the kind's own (its entries may be replaced whole); False: it is
    not, and `force` lets the tool write into it (replace files of its names, delete nothing).
    OutputError otherwise. `what` names the path in messages (default: the path). Creates nothing."""
    path = Path(path)
    what = what or str(path)
    if path.is_symlink():
        raise OutputError(f"{what} is a symbolic link (to {os.readlink(path)}); give the directory itself")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} exists and is not a directory; give a directory for the {kind}")
    names = sorted(os.listdir(path)) if path.exists() else []
    found = marker_kind(path) if names else None
    if names and (found == kind or (found is None and MARKER not in names and _legacy(path, kind, names))):
        return True
    run = run_part(path)
    if run is not None:
        where = "is a run directory" if run == path.absolute() else f"lies inside the run {run}"
        raise OutputError(f"{what} {where}; write the {kind} to a directory of its own")
    if not names:
        return True
    if found is not None:
        raise OutputError(f"{what} holds {_a(found)}, not {_a(kind)}; write the {kind} to a directory of its own")
    if force:
        return False
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise OutputError(f"{what} exists and holds files that are not {_a(kind)}'s ({shown}); choose a new or empty "
                      f"directory, or add --force to write into it (files of the same names are replaced, "
                      f"nothing else is touched)")


def claim(path: Path, kind: str, force: bool = False, what: str | None = None) -> Path:
    """`check_output_dir`, then create the directory (with its marker) when it is the kind's own;
    returns it. For outputs written in place (a series' rows, appended as they come)."""
    own = check_output_dir(path, kind, force, what)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if own and marker_kind(path) != kind:
        write_marker(path, kind)
    return path


def fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new directory `parent/PREFIX<random>SUFFIX`, created here (the usual permissions)."""
    while True:
        path = Path(parent) / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_aside(path: Path) -> Path:
    aside = fresh_dir(path.parent, f".{path.name}.", ".old")
    os.rename(path, aside / "x")
    return aside


def _publish_entry(new: Path, target: Path, own: bool) -> None:
    """Move `new` to `target`: a file (or a link) by one rename over whatever is there as a link or
    file; a directory whole when `own` (the old one moved aside first, then deleted: it was
    ours), merged entry by entry otherwise (nothing deleted)."""
    if not new.is_dir() or new.is_symlink():
        if target.is_dir() and not target.is_symlink():
            raise OutputError(f"{target} is a directory; the {new.name} written here is a file")
        os.replace(new, target)
        return
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        if not own:
            raise OutputError(f"{target} exists and is not a directory; the {new.name} written here is one")
        target.unlink()  # a link or file of ours where a directory goes: only the link goes
    if not target.exists():
        os.rename(new, target)
    elif own:
        aside = _move_aside(target)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        for item in sorted(new.iterdir()):
            _publish_entry(item, target / item.name, own)


def publish(tmp: Path, path: Path, kind: str, force: bool = False) -> None:
    """Move the finished output in `tmp` into `path` (checked again: it may have changed since)."""
    own = check_output_dir(path, kind, force)
    if not path.exists():
        write_marker(tmp, kind)
        os.rename(tmp, path)
        return
    if own and marker_kind(path) != kind:
        write_marker(path, kind)
    for item in sorted(tmp.iterdir()):
        _publish_entry(item, path / item.name, own)


@contextlib.contextmanager
def staged(path: Path, kind: str, force: bool = False, what: str | None = None) -> Iterator[Path]:
    """A fresh temporary directory beside `path` to build the output in (checked first: nothing is
    created for a refused path); on success its entries are published into `path`; on any
    error it is removed and `path` stays as it was."""
    path = Path(path).absolute()
    check_output_dir(path, kind, force, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(path.parent, f".{path.name}.", ".partial")
    try:
        yield tmp
        publish(tmp, path, kind, force)
    except OSError as e:  # a full disk, a quota: name the output (not its temporary) where it failed
        name = str(e.filename or tmp)
        shown = str(path) + name[len(str(tmp)):] if name.startswith(str(tmp)) else name
        raise OSError(e.errno, e.strerror or str(e), shown) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def looks_ours(path: Path) -> bool:
    """A file whose first line is a JSON object with a `step`: rows this project wrote."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline(1 << 20)
        row = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and "step" in row


def check_output_file(path: Path, force: bool = False, ours: Callable[[Path], bool] = looks_ours,
                      what: str | None = None) -> None:
    """May a tool write file `path`? Not a link, not a directory, not inside a run's checkpoints,
    and, when it exists, a file of this project's (`ours`) or `force`."""
    path = Path(path)
    what = what or str(path)
    if path.is_symlink():
        raise OutputError(f"{what} is a symbolic link (to {os.readlink(path)}); give the file itself")
    if path.exists() and not path.is_file():
        raise OutputError(f"{what} exists and is not a regular file")
    run = run_part(path.parent)
    if run is not None and run != path.parent.absolute():
        raise OutputError(f"{what} lies inside the checkpoints of the run {run}; write it elsewhere")
    if path.exists() and not force and not ours(path):
        raise OutputError(f"{what} exists and is not a file this project wrote; choose another name, or add "
                          f"--force to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"{what}: no directory {path.parent}")


# -- run directories ---------------------------------------------------------------------------------
# What a start writes before it knows whether the run can go ahead: the lock (first, before
# anything else), Hydra's record and its log (`*.log`). A directory holding only these, the lock
# among them, is the stub of a start of this project's (one killed during start-up, say).
STUB_NAMES = (".hydra", LOCK_FILE)


def _stub_entry(name: str) -> bool:
    return name in STUB_NAMES or name.endswith(".log")


def check_writable(run_dir: Path) -> None:
    """Check that files can be written in `run_dir`, or in its nearest existing ancestor when it
    does not exist yet (by writing and deleting a temporary file); creates nothing."""
    run_dir = Path(run_dir).absolute()
    probe = run_dir
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to the output directory {run_dir}: "
                          f"{e.strerror or type(e).__name__}") from None


def check_new_run_dir(run_dir: Path, hydra_record: bool = False) -> None:
    """A new run goes into a new or empty directory, or the stub of a start of this project's,
    never over another run, into another kind of output, a directory holding other files or
    through a link. `hydra_record`: Hydra has written its record (`.hydra/`, its log) for this
    job already (a sweep job), which the directory may hold."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise ConfigError(f"the output directory {run_dir} is a symbolic link (to {os.readlink(run_dir)}); "
                          f"give the directory itself")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the output directory {run_dir} exists and is not a directory")
    present = [name for name in RUN_MARKERS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if present:
        state = (read_status(run_dir) or {}).get("state", "unknown state")
        raise ConfigError(f"{run_dir} already holds a run ({state}; has {', '.join(present)}); "
                          f"choose another directory, or continue it with resume={run_dir}")
    names = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
    foreign = [n for n in names if not _stub_entry(n)]
    if foreign or (names and LOCK_FILE not in names and not hydra_record):
        shown = ", ".join((foreign or names)[:4]) + (", ..." if len(foreign or names) > 4 else "")
        raise ConfigError(f"the output directory {run_dir} exists and holds files of its own ({shown}); a new run "
                          f"goes into a new or empty directory")
    check_writable(run_dir)


def check_resume_dir(run_dir: Path) -> dict[str, Any]:
    """A run that can be resumed: a directory with its config and an unfinished status, whose
    files and checkpoints are its own (no links out of it). Returns its status.json ({} when
    there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"resume: no run directory at {run_dir}")
    config = run_dir / CONFIG_FILE
    if config.exists() and not config.is_file():
        raise ConfigError(f"resume: {config} is not a regular file; refusing to read it")
    if not config.is_file():
        raise ConfigError(f"resume: {run_dir} has no {CONFIG_FILE}, so it is not a run directory")
    own = [run_dir / n for n in (CONFIG_FILE, STATUS_FILE, METRICS_FILE, LOCK_FILE, CHECKPOINTS, TOKENIZER_DIR)]
    if (run_dir / CHECKPOINTS).is_dir() and not (run_dir / CHECKPOINTS).is_symlink():
        own += sorted((run_dir / CHECKPOINTS).iterdir())
    links = [p for p in own if p.is_symlink()]
    if links:
        raise ConfigError(f"resume: {links[0]} is a symbolic link (to {os.readlink(links[0])}); a run's files are "
                          f"its own, and a resumed run writes and deletes there")
    status = read_status(run_dir) or {}
    if status.get("state") == FINISHED:
        raise ConfigError(f"resume: the run in {run_dir} already finished (step {status.get('step')}); "
                          f"nothing to do")
    check_writable(run_dir)
    return status


_held_locks: dict[Path, Any] = {}  # run directory -> open lock file, for the locks this process holds
# run directory -> (the directories `acquire_lock` created for it, whether it found the directory
# holding files or an empty directory that is not its own to remove)
_made: dict[Path, tuple[list[Path], bool]] = {}


def acquire_lock(run_dir: Path) -> None:
    """Create the run directory (and its missing parents) and take its lock for the rest of this
    process (or until `release_lock`); a second process asking for it gets ConfigError. Taking
    it again in this process is a no-op."""
    key = Path(run_dir).absolute()
    if key in _held_locks:
        return
    missing = [d for d in (key, *key.parents) if not d.exists()]
    found = sorted(os.listdir(key)) if key.is_dir() else None
    stub = bool(found) and LOCK_FILE in found and all(_stub_entry(n) for n in found)
    key.mkdir(parents=True, exist_ok=True)
    _made.setdefault(key, (missing, found is not None and not stub))
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    fh = open(key / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(f"{run_dir} is in use by another training process") from None
    _held_locks[key] = fh


def release_lock(run_dir: Path) -> None:
    fh = _held_locks.pop(Path(run_dir).absolute(), None)
    if fh is not None:
        fh.close()


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """One process per run directory: a second `resume=` of a run still training fails. A lock
    this process already holds (taken before Hydra started) is kept when the block ends."""
    held = Path(run_dir).absolute() in _held_locks
    acquire_lock(run_dir)
    try:
        yield
    finally:
        if not held:
            release_lock(run_dir)


def remove_stub(run_dir: Path) -> None:
    """Undo what a start of this process that failed before training wrote (`STUB_NAMES`, `*.log`),
    in a directory this process locked that holds no run; then the directory itself (unless it
    was there before, empty, as someone's) and the parents this process created for it, where
    they are left empty. A directory this process never locked, one that holds a run, or whose
    lock another process holds now (a job starting there), is not touched."""
    run_dir = Path(run_dir).absolute()
    if run_dir not in _made or not run_dir.is_dir() or any((run_dir / n).exists() for n in RUN_MARKERS):
        return
    try:
        acquire_lock(run_dir)  # ours already, or free
    except ConfigError:
        return
    release_lock(run_dir)
    made, keep = _made.pop(run_dir)
    for p in run_dir.iterdir():
        if _stub_entry(p.name):
            p.unlink() if p.is_symlink() or not p.is_dir() else shutil.rmtree(p, ignore_errors=True)
    for d in dict.fromkeys(([] if keep else [run_dir]) + made):  # deepest first
        try:
            d.rmdir()  # only when empty
        except OSError:
            return
