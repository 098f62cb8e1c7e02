"""The run directory: its layout, and every read and write of the files in it that are not model
weights or optimizer state (those are train/core/checkpoint.py's). No torch: the command line checks a
run directory with this module before anything heavy is imported.

    config.yaml                   the resolved config the run used
    metrics.jsonl                 one JSON row per checkpoint (keys: train/core/names.py, docs/METRICS.md)
    status.json                   {"state": running | finished | failed | interrupted, "step",
                                   "wandb_run_id", "wall_seconds", "resumed_from_steps", "error"}
    .lock                         held by the one process training in the directory
    recomputed.jsonl              rows of `python -m analysis.recompute` (when it was run)
    checkpoints/step_0000123/     model.safetensors, meta.json [, train_state.pt]

Every JSON or text file is written under a temporary name, fsynced and renamed into place, so a
reader never sees half a file; metrics.jsonl is appended and fsynced row by row, and a torn last
line (a run killed mid-write) is dropped when it is read."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from train.core.config import ConfigError
from train.core.names import STEP

CONFIG_FILE, METRICS_FILE, STATUS_FILE, LOCK_FILE = "config.yaml", "metrics.jsonl", "status.json", ".lock"
CHECKPOINTS = "checkpoints"
MODEL_FILE, META_FILE, STATE_FILE = "model.safetensors", "meta.json", "train_state.pt"
# Files whose presence means a directory already holds a run.
RUN_MARKERS = (STATUS_FILE, METRICS_FILE, CONFIG_FILE, CHECKPOINTS)
RECOMPUTED_FILE = "recomputed.jsonl"  # written by `python -m analysis.recompute`
TOKENIZER_DIR = "tokenizer"  # text runs: the tokenizer (transformers.PreTrainedTokenizerFast) that made the ids
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"  # status.json states
SCHEDULED, INTERRUPT = "scheduled", "interrupt"  # meta.json kinds: on the schedule, or written on a stop signal
TMP_SUFFIX = ".tmp"  # a checkpoint directory being written (or replaced); removed on resume


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another shape."""


# -- atomic writes -------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


# -- status.json ---------------------------------------------------------------------------------
def save_tokenizer(run_dir: Path, source: Path) -> None:
    """Copy a tokenizer directory into the run (once; under a temporary name, then renamed)."""
    target = Path(run_dir) / TOKENIZER_DIR
    if target.exists():
        return
    tmp = target.with_name(TOKENIZER_DIR + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, target)
    fsync_dir(Path(run_dir))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """status.json of a run directory, {} if unreadable, None if absent."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: Path, state: str, step: int, run_id: str | None, seconds: float | None = None,
                 resumed_from: list[int] | None = None, error: str | None = None) -> None:
    status: dict[str, Any] = {"state": state, "step": step, "wandb_run_id": run_id}
    if seconds is not None:
        status["wall_seconds"] = round(seconds, 2)
    if resumed_from:
        status["resumed_from_steps"] = list(resumed_from)
    if error:
        status["error"] = error
    path = Path(run_dir) / STATUS_FILE
    try:
        write_json_atomic(path, status)
    except OSError:  # a full disk leaves no room for a second copy: overwrite the small file in place
        path.write_text(json.dumps(status, indent=2), encoding="utf-8")


# -- metrics.jsonl -------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def format_row(row: dict[str, Any]) -> str:
    """One metrics.jsonl line (tensors to lists, non-finite floats to strings), newline included."""
    return json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a file, or a run directory); a torn last line is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def rewind_metrics(run_dir: Path, step: int) -> None:
    """Keep only the rows up to `step` (a resumed run recomputes the ones after its checkpoint,
    so the file continues exactly as an uninterrupted run's); a torn last line goes too."""
    path = Path(run_dir) / METRICS_FILE
    try:
        rows = read_metrics(path) if path.exists() else []
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    kept = [r for r in rows if isinstance(r, dict) and r.get(STEP, -1) <= step]
    write_text_atomic(path, "".join(format_row(r) for r in kept))


class MetricsFile:
    """Appends one JSON object per checkpoint to metrics.jsonl, flushed and fsynced per row."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._fh.write(format_row(row))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:  # name the file (a full disk, a quota)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        self._fh.close()


# -- checks before a run starts ------------------------------------------------------------------
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


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may go into an empty or new directory, never over another run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the output directory {run_dir} exists and is not a directory")
    present = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if present:
        state = (read_status(run_dir) or {}).get("state", "unknown state")
        raise ConfigError(f"{run_dir} already holds a run ({state}; has {', '.join(present)}); "
                          f"choose another directory, or continue it with resume={run_dir}")
    check_writable(run_dir)


def check_resume_dir(run_dir: Path) -> dict[str, Any]:
    """A run that can be resumed: a directory with its config and an unfinished status.
    Returns its status.json ({} when there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"resume: no run directory at {run_dir}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"resume: {run_dir} has no {CONFIG_FILE}, so it is not a run directory")
    status = read_status(run_dir) or {}
    if status.get("state") == FINISHED:
        raise ConfigError(f"resume: the run in {run_dir} already finished (step {status.get('step')}); "
                          f"nothing to do")
    check_writable(run_dir)
    return status


_held_locks: dict[Path, Any] = {}  # run directory -> open lock file, for the locks this process holds
_made_dirs: dict[Path, list[Path]] = {}  # run directory -> the directories `acquire_lock` created for it


def acquire_lock(run_dir: Path) -> None:
    """Create the run directory (and its missing parents) and take its lock for the rest of this
    process (or until `release_lock`); a second process asking for it gets ConfigError. Taking
    it again in this process is a no-op."""
    key = Path(run_dir).absolute()
    if key in _held_locks:
        return
    missing = [d for d in (key, *key.parents) if not d.exists()]
    key.mkdir(parents=True, exist_ok=True)
    _made_dirs.setdefault(key, missing)
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


# Files a start-up writes before it knows whether the run can go ahead: Hydra's record (and its
# log, `*.log`), the lock.
STUB_NAMES = (".hydra", ".lock")


def remove_stub(run_dir: Path) -> None:
    """Undo what a run that failed before training wrote into a directory holding no run: Hydra's
    `.hydra/` and `*.log`, the lock; then the directory itself and the parents this process
    created for it, where they are left empty. A directory that holds a run, or whose lock
    another process holds (a job starting there), is not touched."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in RUN_MARKERS):
        return
    is_stub = lambda p: p.name in STUB_NAMES or (p.suffix == ".log" and p.is_file())  # noqa: E731
    found = [p for p in run_dir.iterdir() if is_stub(p)]
    try:
        acquire_lock(run_dir)  # ours already, or free
    except ConfigError:
        return
    release_lock(run_dir)
    for p in run_dir.iterdir():
        if is_stub(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    made = _made_dirs.pop(run_dir, [])
    for d in dict.fromkeys(([run_dir] if found else []) + made):  # deepest first; a directory found empty stays
        try:
            d.rmdir()  # only when empty
        except OSError:
            return


# -- checkpoint directories ----------------------------------------------------------------------
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[5:])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run (those with a meta.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit()]
    return sorted((d for d in dirs if (d / META_FILE).is_file()), key=checkpoint_step)


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json: step, tokens, kind (scheduled | interrupt), model and full config."""
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata {path}: {e}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("model"), dict)):
        raise CheckpointError(f"checkpoint metadata {path} lacks its step or model description")
    return meta


def resume_point(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run that carries optimizer state; None when the run
    was stopped before its first checkpoint (it continues from the start)."""
    checkpoints = list_checkpoints(run_dir)
    candidates = [d for d in checkpoints if (d / STATE_FILE).is_file()]
    if not checkpoints:
        return None
    if not candidates:
        raise CheckpointError(f"resume: {run_dir} has no checkpoint with a resume state "
                              f"({STATE_FILE}); it cannot be continued")
    return candidates[-1]


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint directories (`*` + TMP_SUFFIX) left by a killed run."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.name.endswith(TMP_SUFFIX):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def _is_interrupt(path: Path) -> bool:
    try:
        return read_meta(path).get("kind") == INTERRUPT
    except CheckpointError:
        return False


def prune(run_dir: Path, step: int, keep_resume_states: int, save_weights: bool) -> None:
    """After a scheduled checkpoint at `step`:

    * checkpoints written only because the run was stopped (kind "interrupt") before `step` go:
      they are not part of the schedule, so a resumed run's directory matches an uninterrupted one;
    * optimizer state is deleted from all but the newest `keep_resume_states` checkpoints (and,
      when weights are not kept, the weights that were written only for resuming)."""
    for old in list_checkpoints(run_dir):
        if checkpoint_step(old) < step and _is_interrupt(old):
            shutil.rmtree(old, ignore_errors=True)
    with_state = [d for d in list_checkpoints(run_dir) if (d / STATE_FILE).exists()]
    for d in with_state[: max(0, len(with_state) - keep_resume_states)]:
        (d / STATE_FILE).unlink(missing_ok=True)
        if not save_weights:
            (d / MODEL_FILE).unlink(missing_ok=True)
