"""The training loop: AdamW with a learning-rate schedule, gradient clipping, bf16 autocast on CUDA,
callbacks and checkpoints on the checkpoint schedule (train/core/schedules.py), exact resume, and safe
stops. Files in the run directory are written through train/core/rundir.py.

With several processes (train/distributed.py) every rank runs this loop on its rows of each
step's batch under DistributedDataParallel; rank 0 alone evaluates, saves and writes, and the
ranks meet at every checkpoint (rank 0's outcome), at every step's stop check and loss, and at
the end. With `train.compile` the training step runs through `torch.compile`."""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train.core import checkpoint as ckpt
from train import distributed as D
from train.core import names as N
from train.core import rundir
from train.core.callbacks import RunContext, evaluate_checkpoint, instantiate_callbacks, prepare_callbacks
from train.core.config import validate
from train.core.device import autocast, select_device
from train.core.model import next_token_loss
from train.core.probes import probes_from_config
from train.live import LiveDetection
from train.loggers import NullLogger
from train.core.schedules import lr_multiplier, run_steps
from train.signals import STOP, StopSignal


class TrainingError(RuntimeError):
    """Training stopped on a fault; the message names the step, `event` the kind of fault
    (train/core/names.py: NONFINITE, DIVERGENCE) recorded in metrics.jsonl."""

    def __init__(self, message: str, event: str = N.NONFINITE):
        super().__init__(message)
        self.event = event


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


class Trainer:
    defer_checks: bool | None = None  # None: deferred finiteness checks on CUDA only (see __init__)

    def __init__(self, cfg: DictConfig, run_dir: str | Path, world: D.World = D.SINGLE):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.world, self.main = world, world.main  # `main`: this process evaluates and writes
        validate(cfg)  # the one home of value checks (the command line ran it already)
        self.rows = world.rows(cfg.train.batch_size)  # this rank's rows of each step's batch
        self.device = torch.device(world.device) if world.enabled else select_device(cfg.device)
        self.tokens_per_step, self.total_steps, self.checkpoint_steps = run_steps(cfg)
        seed_everything(cfg.seed)
        self.data = instantiate(cfg.data)
        self.model = instantiate(cfg.model).to(self.device)
        self.train_module: torch.nn.Module = self.model  # what `loss` runs; set by `run` (training_module)
        self.probes = probes_from_config(self.data, cfg.data.n_ctx, cfg.probes).to(self.device) if self.main else None
        self.ctx = RunContext(self.model, self.probes)
        self.callbacks = prepare_callbacks(instantiate_callbacks(cfg.callbacks), self.ctx) if self.main else []
        o = cfg.optim
        # On CUDA a step's finiteness check stays on the device (reading it every step is a host
        # sync that stalls the GPU): fused AdamW skips every update from the first non-finite
        # step on, and `check_finite` raises at the next checkpoint. On the CPU each step is
        # checked at once.
        self.deferred_checks = self.device.type == "cuda" if self.defer_checks is None else self.defer_checks
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, fused=self.deferred_checks or None)
        warmup = max(1, o.warmup_tokens // self.tokens_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, warmup, self.total_steps, o.lr_schedule, o.min_lr_ratio))
        self.logger = instantiate(cfg.logger) if self.main else NullLogger()
        self.live = LiveDetection(cfg.get("live_detection_every", 0) if self.main else 0, self.logger, self._say)
        self.step = 0
        self.last_saved: int | None = None  # step of the newest checkpoint written (the last good step)
        # Checkpoints, metrics rows and status.json are written off the training thread, in order.
        self.writer = ckpt.BackgroundWriter()
        self.over_divergence_line = 0  # consecutive checkpoints with held-out loss above the line
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.exit_code = 1
        self.resumed_from: list[int] = []  # steps at which earlier segments of this run were resumed

    # -- state ---------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "loss_sum": self.loss_sum.detach().cpu(), "loss_count": self.loss_count}

    def meta(self, kind: str) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.step * self.tokens_per_step, "kind": kind,
                "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def save(self, kind: str = rundir.SCHEDULED) -> Path:
        """Checkpoint this step: the weights and training state are copied now and written, with
        the pruning of older checkpoints, by the background writer (`self.writer`), which sets
        `last_saved` once the checkpoint is in place. Returns the checkpoint's directory."""
        c = self.cfg.checkpoint
        # An interrupt checkpoint must always be resumable, whatever keep_resume_states says.
        with_state = c.keep_resume_states > 0 or kind == rundir.INTERRUPT
        step, meta = self.step, self.meta(kind)
        weights = ckpt.snapshot(self.model.state_dict()) if c.save_weights or with_state else {}
        state = ckpt.snapshot(self.train_state()) if with_state else None

        def write() -> None:
            ckpt.save_checkpoint(self.run_dir, weights, meta, state, save_weights=c.save_weights)
            if kind != rundir.INTERRUPT:
                rundir.prune(self.run_dir, step, c.keep_resume_states, c.save_weights)
            self.last_saved = step

        self.writer.submit(write)
        return rundir.checkpoint_dir(self.run_dir, step)

    def restore(self, path: Path) -> None:
        """Load model, optimizer, scheduler, RNG and the running train-loss sums of a checkpoint.
        Everything is read and checked before anything is changed on disk."""
        meta = rundir.read_meta(path)
        ckpt.check_same_model(meta, OmegaConf.to_container(self.cfg.model, resolve=True), path)
        ckpt.load_weights(self.model, path)
        state = ckpt.load_train_state(path, self.device)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state["rng"].items()})
            self.loss_sum = state["loss_sum"].to(self.device)
            self.loss_count = int(state["loss_count"])
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            raise rundir.CheckpointError(f"resume state in {path} does not fit this run: {e}") from None
        self.step = self.last_saved = int(meta["step"])
        if not 0 <= self.step <= self.total_steps:
            raise rundir.CheckpointError(f"checkpoint {path} is at step {self.step}, outside this run's "
                                         f"{self.total_steps} steps")

    def resume_state(self, restored: bool) -> dict[str, Any] | None:
        """What the other ranks need of a restored checkpoint (None when nothing was restored):
        the step, the optimizer and the scheduler state, on the CPU. The weights reach them when
        the model is wrapped in DistributedDataParallel, which broadcasts rank 0's."""
        if not restored:
            return None
        return {"step": self.step, "optimizer": ckpt.snapshot(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict()}

    def take_resume_state(self, state: dict[str, Any] | None) -> bool:
        """Apply rank 0's `resume_state` on another rank; True when there was one."""
        if state is None:
            return False
        self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.last_saved = int(state["step"])
        return True

    def training_module(self) -> torch.nn.Module:
        """The module the training step runs: the model, wrapped in DistributedDataParallel with
        several processes, and through `torch.compile` with train.compile. Callbacks, checkpoints
        and resume use `self.model`, the plain module, whose parameters these share (so a
        state dict never has `module.` or `_orig_mod.` prefixes)."""
        module = self.model
        if self.world.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Wrapping broadcasts rank 0's parameters (a resumed checkpoint's) to every rank.
            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda"
                                             else None)
        if self.cfg.train.compile:
            module = torch.compile(module)
        return module

    # -- one checkpoint ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        self.ctx.step, self.ctx.tokens = self.step, self.step * self.tokens_per_step
        self.ctx.checkpoint_index = self.checkpoint_steps.index(self.step)
        row: dict[str, Any] = {N.STEP: self.step, N.TOKENS: self.ctx.tokens, N.LR: self.optimizer.param_groups[0]["lr"]}
        if self.loss_count:
            row[N.LOSS_TRAIN] = float(self.loss_sum) / self.loss_count
        self.loss_sum.zero_()
        self.loss_count = 0
        row |= evaluate_checkpoint(self.callbacks, self.ctx)
        self.model.train()
        return row

    # -- the loop ------------------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch."""
        with autocast(self.device):
            logits = self.train_module(tokens).logits
        return next_token_loss(logits, tokens)

    def train_step(self, tokens: torch.Tensor) -> torch.Tensor:
        loss = self.loss(tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        # With several ranks: the global batch's loss, the same on every rank, as is the norm of
        # the all-reduced gradient; so every rank takes the same decision below.
        loss = D.mean_over_ranks(self.world, loss)
        if self.deferred_checks:  # no host sync: the update is skipped on the device
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)
            self.optimizer.found_inf = (self.first_bad >= 0).float()  # read by fused AdamW
        elif not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise D.mark_shared(TrainingError(f"non-finite {what} at step {self.step} "
                                              f"({self.step * self.tokens_per_step:,} tokens); "
                                              f"stopped without updating"))
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return loss

    def check_finite(self) -> None:
        """With deferred checks: raise TrainingError when a step since the last check had a
        non-finite loss or gradient norm (the updates from that step on were skipped)."""
        if self.deferred_checks and int(self.first_bad) >= 0:
            bad = int(self.first_bad)
            raise D.mark_shared(TrainingError(f"non-finite loss or gradient norm at step {bad} "
                                              f"({bad * self.tokens_per_step:,} tokens), found at step {self.step}; "
                                              f"stopped without updating from step {bad} on"))

    def run(self, resume_checkpoint: Path | None = None, previous_status: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to the end (or to a stop signal or fault), from the start or from
        `resume_checkpoint`. `previous_status` (the run's status.json when resuming) carries the
        wandb run id, the wall time and the resume steps of earlier segments. `self.exit_code`
        says how it ended: 0 finished, 128 + signal number when stopped by SIGTERM/SIGINT.
        With several processes only rank 0 is given a checkpoint and a status; the others
        receive the resumed state from it."""
        previous = previous_status or {}
        self.resumed_from = list(previous.get("resumed_from_steps") or [])
        prior_seconds = float(previous.get("wall_seconds") or 0.0)
        metrics, run_id = None, None
        if self.main:
            with D.leading(self.world) as handover:  # the other ranks wait for the resumed state
                if resume_checkpoint is not None:
                    self.restore(resume_checkpoint)  # raises before anything on disk changes
                    rundir.rewind_metrics(self.run_dir, self.step)
                    rundir.remove_stale_temporaries(self.run_dir)
                    self.resumed_from.append(self.step)
                    self.live.rows = rundir.read_metrics(self.run_dir)  # the rows before the resumed checkpoint
                if getattr(self.data, "tokenizer_dir", None) is not None:
                    rundir.save_tokenizer(self.run_dir, self.data.tokenizer_dir)
                metrics = rundir.MetricsFile(self.run_dir)
                run_id = self.logger.start(self.run_dir, OmegaConf.to_container(self.cfg, resolve=True),
                                           previous.get("wandb_run_id"))
                self._status(rundir.RUNNING, run_id, prior_seconds or None)
                restored = resume_checkpoint is not None
                if self.world.enabled:
                    handover.value = self.resume_state(restored)
        else:
            restored = self.take_resume_state(D.follow(self.world, TrainingError))
        self.train_module = self.training_module()  # after the restore: DDP hands rank 0's weights on
        pending = [s for s in self.checkpoint_steps if s > self.step or (not restored and s == self.step)]
        bar = tqdm(total=self.total_steps * self.tokens_per_step, initial=self.step * self.tokens_per_step,
                   unit="tok", unit_scale=True, dynamic_ncols=True, disable=not (sys.stderr.isatty() and self.main),
                   desc=f"{self.cfg.model.n_layers}L")
        t0 = time.perf_counter() - prior_seconds  # wall time summed over segments
        self.exit_code, state, self._error = 1, rundir.FAILED, None
        try:
            with STOP as stop:  # installed by the command line already, or here
                last_row, stopped_by = self._loop(pending, metrics, bar, stop, run_id, t0)
            if stopped_by is not None:
                self.exit_code, state = 128 + stopped_by, rundir.INTERRUPTED
            else:
                self.exit_code, state = 0, rundir.FINISHED
                self.live.finish()
            return last_row
        except KeyboardInterrupt:  # a second signal while stopping: no new checkpoint
            self.exit_code, state, self._error = 130, rundir.INTERRUPTED, "stopped by a second signal"
            raise
        except BaseException as e:
            self._error = self._error or f"{type(e).__name__}: {e}"
            raise
        finally:
            bar.close()
            if self.main:
                self._last_word(metrics, state, run_id, t0)

    def _last_word(self, metrics: rundir.MetricsFile, state: str, run_id: str | None, t0: float) -> None:
        """Let the background writer finish, close metrics.jsonl, write the final status.json and
        finish the logger."""
        with contextlib.suppress(BaseException):  # a write that failed now: the run ends failing already
            self.writer.close()
        with contextlib.suppress(OSError):  # a failed write raised already; every row was flushed
            metrics.close()
        try:  # a failed run reports its last good checkpoint's step
            self._status(state, run_id, time.perf_counter() - t0, self._error,
                         step=self.last_saved if state == rundir.FAILED else None)
        except OSError as e:
            print(f"warning: could not update {self.run_dir / rundir.STATUS_FILE}: {e.strerror or e}",
                  file=sys.stderr)
        try:
            self.logger.finish(self.exit_code)
        except Exception as e:  # noqa: BLE001 - the logger must not hide how training ended
            print(f"warning: logger did not finish cleanly: {type(e).__name__}: {e}", file=sys.stderr)

    def check_divergence(self, row: dict[str, Any]) -> None:
        """Raise TrainingError when the held-out loss has been above ln(vocab_size) +
        train.divergence_margin (a uniform prediction's loss plus the margin) at
        train.divergence_checkpoints consecutive checkpoints (0: never)."""
        limit = self.cfg.train.divergence_checkpoints
        if not limit or N.LOSS_HELDOUT not in row:
            return
        line = math.log(self.cfg.data.vocab_size) + self.cfg.train.divergence_margin
        self.over_divergence_line = self.over_divergence_line + 1 if row[N.LOSS_HELDOUT] > line else 0
        if self.over_divergence_line >= limit:
            raise TrainingError(f"diverged: held-out loss {row[N.LOSS_HELDOUT]:.4g} at step {self.step} "
                                f"({self.step * self.tokens_per_step:,} tokens) above ln(vocab_size) + "
                                f"train.divergence_margin = {line:.3f} at {limit} checkpoints in a row; "
                                f"lower optim.lr", N.DIVERGENCE)

    def _loop(self, pending: list[int], metrics: rundir.MetricsFile, bar, stop: StopSignal, run_id: str | None,
              t0: float) -> tuple[dict[str, Any], int | None]:
        """Steps and checkpoints until the end or a stop signal. Returns the last checkpoint's row
        and the signal that stopped training early (None when it reached the end: a signal that
        arrives during the last step does not turn a finished run into an interrupted one). A
        fault (non-finite loss, divergence) is recorded as an event row and raised."""
        last_row: dict[str, Any] = {}
        while True:
            saved_now = False
            try:
                if (pending and pending[0] == self.step) or self.step >= self.total_steps:
                    self.check_finite()
                if pending and pending[0] == self.step:
                    pending.pop(0)
                    if self.main:
                        with D.leading(self.world):  # the other ranks wait for its outcome
                            last_row = self._checkpoint(metrics, bar, run_id, t0)
                    else:
                        D.follow(self.world, TrainingError)
                        self.last_saved = self.step
                    saved_now = True
                if self.step >= self.total_steps:
                    return last_row, None
                received = D.agree_stop(self.world, stop.received)  # a signal to any rank stops every rank here
                if received is not None:
                    self.check_finite()  # never an interrupt checkpoint of skipped updates
                    if self.main:
                        with D.leading(self.world):
                            path = rundir.checkpoint_dir(self.run_dir, self.step) if saved_now else \
                                self.save(rundir.INTERRUPT)
                            self.writer.wait()  # the checkpoint is in place before anyone is told so
                            print(f"\nreceived {signal.Signals(received).name} at step {self.step}; checkpoint "
                                  f"written to {path}; resume with resume={self.run_dir}", file=sys.stderr)
                    else:
                        D.follow(self.world, TrainingError)
                    return last_row, received
                tokens = self.data.batch(self.step, self.cfg.train.batch_size)
                if self.world.enabled:  # the global batch on every rank, of which this rank trains its rows
                    tokens = tokens[self.rows]
                self.train_step(tokens.to(self.device, non_blocking=True))
            except TrainingError as e:
                self._error = str(e)
                if self.main:
                    self.writer.wait()  # the rows and checkpoints before the fault, then its event row
                    metrics.write({N.EVENT: e.event, N.STEP: self.step,
                                   N.TOKENS: self.step * self.tokens_per_step, "message": str(e)})
                raise
            self.step += 1
            bar.update(self.tokens_per_step)

    def _checkpoint(self, metrics: rundir.MetricsFile, bar, run_id: str | None, t0: float) -> dict[str, Any]:
        """Rank 0 at a scheduled checkpoint: evaluate, write the row, log, save, then check for
        divergence. Returns the row."""
        row = self.evaluate()
        self.writer.submit(lambda: metrics.write(row))
        self.logger.log(row | {N.ELAPSED: time.perf_counter() - t0})
        self.live.update(row)
        self.save()
        step, seconds = self.step, time.perf_counter() - t0
        self.writer.submit(lambda: self._status(rundir.RUNNING, run_id, seconds, step=step))  # wall time survives SIGKILL
        if self.step >= self.total_steps:
            self.writer.wait()  # the last checkpoint is in place before the run ends
        if N.LOSS_HELDOUT in row:
            bar.set_postfix(loss=f"{row[N.LOSS_HELDOUT]:.3f}", refresh=False)
        self.check_divergence(row)
        return row

    @staticmethod
    def _say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def _status(self, state: str, run_id: str | None, seconds: float | None = None, error: str | None = None,
                step: int | None = None):
        rundir.write_status(self.run_dir, state, self.step if step is None else step, run_id, seconds,
                            self.resumed_from, error)
