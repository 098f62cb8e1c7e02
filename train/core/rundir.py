"""The run directory: its layout, and every read and write of the files in it that are not model
weights or optimizer state (those are train/core/checkpoint.py's). No torch: the command line checks a
run directory with this module before anything heavy is imported.

    config.yaml                   the resolved config the run used
    metrics.jsonl                 one JSON row per checkpoint (keys: train/core/names.py, docs/METRICS.md)
    status.json                   {"state": running | finished | failed | interrupted, "step",
                                   "wandb_run_id", "wall_seconds", "resumed_from_steps", "error"}
    .lock                         held by the one process training in the directory
    recomputed.jsonl              rows of `python -m analysis.recompute` (when it was run)
    tokenizer/, token_cache.json  text runs: the tokenizer, and the token cache entry it came from
    checkpoints/step_0000123/     model.safetensors, meta.json [, train_state.pt]

Every JSON or text file is written under a temporary name, fsynced and renamed into place, so a
reader never sees half a file; metrics.jsonl is appended and fsynced row by row, and a torn last
line (a run killed mid-write) is dropped when it is read. Files are read only when they are
regular files, small ones within the bounds of train/core/limits.py. Where a run may go, its lock
and the clean-up of a failed start: train/core/outputs.py."""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from train.core import limits
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
    """Write text to a fresh temporary file in the same directory (created exclusively, never
    through a link), fsync, then rename over `path` (a link there is replaced, not followed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file (a full disk, a quota)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


# -- a text run's tokenizer and token cache ---------------------------------------------------------
TOKEN_CACHE_FILE = "token_cache.json"  # text runs: the token cache entry the run trains on (its key)


def save_tokenizer(run_dir: Path, source: Path) -> None:
    """Copy the tokenizer of a token cache entry (`source`: ENTRY/tokenizer, train/core/token_cache.py)
    into the run, once: its regular files only, under a temporary name, then renamed; with it,
    TOKEN_CACHE_FILE records the entry (its key: a resumed run checks that its corpus still gives
    it, train/startup.py)."""
    run_dir, source = Path(run_dir), Path(source)
    target = run_dir / TOKENIZER_DIR
    if target.exists() or target.is_symlink():
        return
    write_json_atomic(run_dir / TOKEN_CACHE_FILE, {"key": source.parent.name, "entry": str(source.parent)})
    tmp = run_dir / f".{TOKENIZER_DIR}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    tmp.mkdir()
    try:
        for f in sorted(source.iterdir()):
            if f.is_file() and not f.is_symlink():
                shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(run_dir)


def read_token_cache(run_dir: Path) -> dict[str, Any] | None:
    """What `save_tokenizer` recorded of the run's token cache entry (None: nothing, or unreadable)."""
    path = Path(run_dir) / TOKEN_CACHE_FILE
    try:
        record = limits.read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# -- status.json ---------------------------------------------------------------------------------
def read_status(run_dir: Path) -> dict[str, Any] | None:
    """status.json of a run directory, {} if unreadable, None if absent (or not a regular file)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = limits.read_json(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: Path, state: str, step: int | None, run_id: str | None, seconds: float | None = None,
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
    lines = limits.check_regular_file(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(limits.parse_json(line, f"{path}: line {i + 1}"))
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


# Integer sizes of a checkpoint's `model` description (train/core/model.py AttnOnlyTransformer).
MODEL_SIZES = ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx")


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json: step, tokens, kind (scheduled | interrupt), model and full config.
    CheckpointError for one that is unreadable, torn, of the wrong types, or describes a model
    larger than its weights file or this machine's memory (checked before anything is built)."""
    path = Path(ckpt) / META_FILE
    try:
        meta = limits.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata {path}: {e}") from None
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not (isinstance(meta, dict) and integer(meta.get("step")) and isinstance(meta.get("model"), dict)):
        raise CheckpointError(f"checkpoint metadata {path} lacks its step or model description")
    if not integer(meta.get("tokens")):
        raise CheckpointError(f"checkpoint metadata {path}: tokens={meta.get('tokens')!r} is not a token count")
    sizes = meta["model"]
    wrong = [k for k in MODEL_SIZES if k in sizes and not (integer(sizes[k]) and sizes[k] > 0)]
    if wrong:
        raise CheckpointError(f"checkpoint metadata {path}: model.{wrong[0]}={sizes[wrong[0]]!r} is not a positive "
                              f"integer")
    if all(k in sizes for k in MODEL_SIZES):
        needed = 4 * limits.model_parameters(*(sizes[k] for k in MODEL_SIZES))
        weights = Path(ckpt) / MODEL_FILE
        if weights.is_file() and needed > 4 * weights.stat().st_size + (1 << 20):  # a truncated file is load_weights'
            raise CheckpointError(f"checkpoint metadata {path} describes a model of {limits.gib(needed)}, far larger "
                                  f"than its weights file {weights} ({limits.gib(weights.stat().st_size)})")
        try:
            limits.check_memory(needed, f"the model of {path}")
        except limits.LimitError as e:
            raise CheckpointError(str(e)) from None
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
