"""A training run's state in its checkpoints and back (files through train/core/checkpoint.py and
train/core/rundir.py): every global RNG, and `Saver`, which writes a trainer's checkpoints off the
training thread, restores one exactly, and hands what the other ranks need of a restored state
on (train/ranks.py)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from train.core import checkpoint as ckpt
from train.core import rundir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG (torch, CUDA, numpy, Python) as tensors and plain numbers, so that it
    round-trips through `torch.load(weights_only=True)`."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "python": torch.tensor(py_internal, dtype=torch.int64),  # 624 words + index
        "python_version": int(py_version), "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state.get("numpy_pos", 624)),
                         int(state.get("numpy_has_gauss", 0)), float(state.get("numpy_gauss", 0.0))))
    random.setstate((int(state.get("python_version", 3)), tuple(int(x) for x in state["python"].tolist()),
                     state.get("python_gauss")))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Saver:
    """The checkpoints of one trainer: its model, optimizer and scheduler, written into `run_dir`
    by `writer` (train/core/checkpoint.py BackgroundWriter, which writes the run's other files
    too, in the order submitted). `last_saved` is the step of the newest checkpoint in place (the
    last good step)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, tokens_per_step: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, writer: ckpt.BackgroundWriter):
        self.run_dir, self.cfg, self.tokens_per_step = run_dir, cfg, tokens_per_step
        self.model, self.optimizer, self.scheduler, self.writer = model, optimizer, scheduler, writer
        self.last_saved: int | None = None

    def save(self, step: int, kind: str, loss_sum: torch.Tensor, loss_count: int,
             watch: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Checkpoint `step`, with the running train-loss sums and the adaptive-density watch
        (`watch`, train/watch.py; None on the fixed schedule): the weights and training state are
        copied now and written, with the pruning of older checkpoints, by the writer, which sets
        `last_saved` once the checkpoint is in place. Given `weights` (a lead-in checkpoint of an
        earlier step), those are saved instead of the model's, without training state. Returns
        the checkpoint's directory."""
        c = self.cfg.checkpoint
        # An interrupt checkpoint must always be resumable, whatever keep_resume_states says.
        with_state = weights is None and (c.keep_resume_states > 0 or kind == rundir.INTERRUPT)
        meta = {"step": step, "tokens": step * self.tokens_per_step, "kind": kind, "threads": torch.get_num_threads(),
                "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                "config": OmegaConf.to_container(self.cfg, resolve=True)}
        weights = ckpt.snapshot(self.model.state_dict() if weights is None else weights) \
            if c.save_weights or with_state else {}
        state = ckpt.snapshot(self.train_state(loss_sum, loss_count, watch)) if with_state else None

        def write() -> None:
            ckpt.save_checkpoint(self.run_dir, weights, meta, state, save_weights=c.save_weights)
            if kind != rundir.INTERRUPT:
                rundir.prune(self.run_dir, step, c.keep_resume_states, c.save_weights)
            self.last_saved = max(step, self.last_saved or 0)

        self.writer.submit(write)
        return rundir.checkpoint_dir(self.run_dir, step)

    def train_state(self, loss_sum: torch.Tensor, loss_count: int, watch: dict[str, Any] | None = None) -> dict[str, Any]:
        """A resumable checkpoint's training state (train_state.pt)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "loss_sum": loss_sum.detach().cpu(), "loss_count": loss_count}
        if watch is not None:
            state["watch"] = watch
        return state

    def restore(self, path: Path, device: torch.device) -> tuple[int, torch.Tensor, int, dict[str, Any] | None]:
        """Load the model, optimizer, scheduler and RNG of checkpoint `path`; returns its step,
        running train-loss sums and adaptive-density watch (None: it has none). Everything is read
        and checked before anything is changed on disk; rundir.CheckpointError for a checkpoint
        that does not fit."""
        meta = rundir.read_meta(path)
        ckpt.check_same_model(meta, OmegaConf.to_container(self.cfg.model, resolve=True), path)
        ckpt.load_weights(self.model, path)
        state = ckpt.load_train_state(path, device)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state["rng"].items()})
            loss_sum, loss_count = state["loss_sum"].to(device), int(state["loss_count"])
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            raise rundir.CheckpointError(f"resume state in {path} does not fit this run: {e}") from None
        self.last_saved = int(meta["step"])
        return self.last_saved, loss_sum, loss_count, state.get("watch")

    def resume_state(self, step: int) -> dict[str, Any]:
        """What the other ranks need of a restored checkpoint: the step, the optimizer and the
        scheduler state, on the CPU. The weights reach them when the model is wrapped in
        DistributedDataParallel, which broadcasts rank 0's."""
        return {"step": step, "optimizer": ckpt.snapshot(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict()}

    def take_resume_state(self, state: dict[str, Any]) -> int:
        """Apply rank 0's `resume_state` on another rank; returns its step."""
        self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        self.last_saved = int(state["step"])
        return self.last_saved
