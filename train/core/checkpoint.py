"""Checkpoint contents: model weights (`model.safetensors`, loadable without pickle) and the
training state (`train_state.pt`: optimizer, scheduler, RNG, loaded with `weights_only=True`).
Where checkpoints live, their meta.json and which of them a run keeps: train/core/rundir.py.

A checkpoint directory is written under a temporary name and renamed into place, so a directory
named step_* is always complete."""
from __future__ import annotations

import errno
import os
import pickle
import queue
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from train.core.model import MODEL_FIELDS, AttnOnlyTransformer, model_kwargs
from train.core.rundir import (META_FILE, MODEL_FILE, STATE_FILE, TMP_SUFFIX, CheckpointError, checkpoint_dir,
                          fsync_dir, read_meta, write_json_atomic)

def snapshot(obj: Any) -> Any:
    """A copy of `obj` (nested dicts, lists, tuples) with every tensor copied to the CPU: what a
    checkpoint written in the background needs while training goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def save_checkpoint(run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None, save_weights: bool = True) -> Path:
    """Write checkpoint `meta["step"]` of `model` (a module, or its state dict) with its meta.json
    and, when given, the training state."""
    final = checkpoint_dir(run_dir, meta["step"])
    tmp = final.with_name(final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if save_weights or train_state is not None:
            state_dict = model if isinstance(model, dict) else model.state_dict()
            weights = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
            _written(tmp / MODEL_FILE, lambda p: save_file(weights, str(p), metadata={"step": str(meta["step"])}))
        if train_state is not None:
            _written(tmp / STATE_FILE, lambda p: torch.save(train_state, p))
        write_json_atomic(tmp / META_FILE, meta)
        for f in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays
        raise
    if final.exists():  # re-saving a step: move the old one aside, publish, then delete it
        old = final.with_name(final.name + ".old" + TMP_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


class BackgroundWriter:
    """Runs file-writing jobs (checkpoints, metrics rows, status.json) one after another in a
    background thread, in the order submitted, so that training goes on while the file system
    writes and fsyncs. `submit` waits while `depth` jobs are queued; `wait` returns when every
    queued job is done. A job's error (an OSError from a full disk, say) stops the jobs after it
    and is raised in the training thread by the next `submit` or `wait`."""

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None  # raised once in the training thread
        self._failed = False  # no job runs after a failed one
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        self.raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> None:
        self._jobs.join()
        self.raise_error()

    def close(self) -> None:
        """`wait`, then end the thread (a later `submit` starts a new one)."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # close()
                self._jobs.task_done()
                return
            try:
                if not self._failed:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error, self._failed = e, True
            finally:
                self._jobs.task_done()


def _written(path: Path, write) -> None:
    """Run `write(path)`; a failure of the file system (full disk, quota, permissions) becomes an
    OSError naming the file, whatever the writing library raised."""
    try:
        write(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    except Exception as e:  # noqa: BLE001 - safetensors and torch wrap I/O errors in their own types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(errno.EIO, f"write failed ({reason})", str(path)) from None


def check_same_model(meta: dict[str, Any], model_cfg: dict[str, Any], ckpt: Path) -> None:
    """A checkpoint written by a model of another shape cannot be loaded into this one."""
    saved, wanted = model_kwargs(meta["model"]), model_kwargs(model_cfg)
    diff = [f"{k}={saved.get(k)!r} (config: {wanted.get(k)!r})" for k in MODEL_FIELDS
            if k in saved and k in wanted and saved[k] != wanted[k] and k != "init_std"]
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} was written by a different model: {', '.join(diff)}")


def load_train_state(ckpt: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Optimizer, scheduler and RNG state of a checkpoint. Loaded with `weights_only=True`: tensors
    and plain containers only, never arbitrary pickled objects (no code runs from the file)."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated or unsafe: all refused the same way
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):  # torch's advice is not ours
            reason = "it holds pickled Python objects besides tensors, which are never loaded"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read resume state {path} (refused or corrupt: {reason})") from None
    missing = [k for k in ("optimizer", "scheduler", "rng", "loss_sum", "loss_count") if not (
        isinstance(state, dict) and k in state)]
    if missing:
        raise CheckpointError(f"resume state {path} lacks {', '.join(missing)}")
    return state


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[AttnOnlyTransformer, dict[str, Any]]:
    """Rebuild the model of a checkpoint directory from its meta.json and safetensors weights."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    model = AttnOnlyTransformer(**model_kwargs(meta["model"]))
    load_weights(model, ckpt)
    return model.to(device).eval(), meta


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / MODEL_FILE
    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} (missing, truncated or corrupt: {reason})") from None
    expected = model.state_dict()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)
