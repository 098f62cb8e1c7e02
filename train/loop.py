"""The training loop: AdamW with a learning-rate schedule, gradient clipping, bf16 autocast on CUDA,
callbacks and checkpoints on the checkpoint schedule (train/core/schedules.py: fixed, or under
adaptive density a base schedule plus checkpoints where a watch every few steps sees the model
change), exact resume (train/state.py), numerical faults (train/faults.py) and safe stops. Files in
the run directory are written through train/core/rundir.py.

With several processes (train/distributed.py) every rank runs this loop on its rows of each
step's batch under DistributedDataParallel; rank 0 alone evaluates, saves and writes, and the
ranks meet where train/ranks.py says: before the first step (the resumed state), at every
checkpoint (rank 0's outcome; under adaptive density at every watch, where rank 0 decides), at
every step's stop check and loss, and at the end. With `train.compile` the training step runs
through `torch.compile`."""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train import distributed as D
from train.core import checkpoint as ckpt
from train.core import names as N
from train.core import rundir
from train.core.callbacks import RunContext, evaluate_checkpoint, instantiate_callbacks, prepare_callbacks
from train.core.config import validate
from train.core.device import autocast, select_device
from train.core.model import next_token_loss
from train.core.probes import probes_from_config
from train.core.schedules import adaptive, lr_multiplier, run_steps
from train.faults import Divergence, FiniteCheck, TrainingError
from train.live import LiveDetection
from train.loggers import NullLogger
from train.ranks import Ranks
from train.signals import STOP, StopSignal
from train.state import Saver, seed_everything
from train.watch import Watch, explain


class Trainer:
    """One run's training in this process: the model, its data, optimizer and schedule, and on
    rank 0 the probes, callbacks, logger and the run's files. `checked`: `cfg` has passed
    config.validate (the command line's start-up, train/startup.py); otherwise it is validated
    here."""

    defer_checks: bool | None = None  # None: deferred finiteness checks on CUDA only (train/faults.py)

    def __init__(self, cfg: DictConfig, run_dir: str | Path, world: D.World = D.SINGLE, checked: bool = False):
        if not checked:
            validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.world, self.main = world, world.main  # `main`: this process evaluates and writes
        self.ranks = Ranks(world)
        self.rows = world.rows(cfg.train.batch_size)  # this rank's rows of each step's batch
        self.device = torch.device(world.device) if world.enabled else select_device(cfg.device)
        # the fixed schedule, or under adaptive density the base schedule (`self.watch` adds to it)
        self.tokens_per_step, self.total_steps, self.checkpoint_steps = run_steps(cfg)
        seed_everything(cfg.seed)
        self.data = instantiate(cfg.data)
        self.model = instantiate(cfg.model).to(self.device)
        self.train_module: torch.nn.Module = self.model  # what `loss` runs; set by `run` (training_module)
        self.probes = probes_from_config(self.data, cfg.data.n_ctx, cfg.probes).to(self.device) if self.main else None
        self.ctx = RunContext(self.model, self.probes)
        self.callbacks = prepare_callbacks(instantiate_callbacks(cfg.callbacks), self.ctx) if self.main else []
        # adaptive density (train/watch.py): its decisions on every rank, its probes on rank 0
        self.watch = Watch(cfg, self.model, self.probes, self.checkpoint_steps, self.tokens_per_step) \
            if adaptive(cfg) else None
        self.decision = None  # why the checkpoint being taken was taken (adaptive density)
        deferred = self.device.type == "cuda" if self.defer_checks is None else self.defer_checks
        self.finite = FiniteCheck(self.device, deferred, self.tokens_per_step)
        self.divergence = Divergence(cfg, self.tokens_per_step)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay, fused=deferred or None)
        warmup = max(1, o.warmup_tokens // self.tokens_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, warmup, self.total_steps, o.lr_schedule, o.min_lr_ratio))
        self.logger = instantiate(cfg.logger) if self.main else NullLogger()
        self.live = LiveDetection(cfg.get("live_detection_every", 0) if self.main else 0, self.logger, self._say)
        # Checkpoints, metrics rows and status.json are written off the training thread, in order.
        self.writer = ckpt.BackgroundWriter()
        self.saver = Saver(self.run_dir, cfg, self.tokens_per_step, self.model, self.optimizer, self.scheduler,
                           self.writer)
        self.step = 0
        self.loss_sum = torch.zeros((), device=self.device)  # the train loss summed since the last checkpoint
        self.loss_count = 0
        self.exit_code = 1
        self.resumed_from: list[int] = []  # steps at which earlier segments of this run were resumed
        self.metrics: rundir.MetricsFile | None = None  # rank 0's metrics.jsonl, open while `run` runs
        self.run_id: str | None = None  # the logger's run id
        self.t0 = 0.0  # perf_counter() at the run's start, less the wall time of earlier segments

    # -- state ---------------------------------------------------------------------------------
    def save(self, kind: str = rundir.SCHEDULED) -> Path:
        """Checkpoint this step (train/state.py Saver.save: copied now, written by the background
        writer). Returns the checkpoint's directory."""
        watch = None if self.watch is None else self.watch.state_dict()
        return self.saver.save(self.step, kind, self.loss_sum, self.loss_count, watch)

    def restore(self, path: Path) -> None:
        """Load model, optimizer, scheduler, RNG, the running train-loss sums and the density
        watch of a checkpoint. Everything is read and checked before anything is changed on disk."""
        self.step, self.loss_sum, self.loss_count, watch = self.saver.restore(path, self.device)
        if not 0 <= self.step <= self.total_steps:
            raise rundir.CheckpointError(f"checkpoint {path} is at step {self.step}, outside this run's "
                                         f"{self.total_steps} steps")
        if self.watch is not None:
            try:
                self.watch.load_state_dict(watch, self.device)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise rundir.CheckpointError(f"resume state in {path} has no adaptive-density watch that fits "
                                             f"this run ({e})") from None

    def take_resume_state(self, state: dict[str, Any] | None) -> bool:
        """Apply rank 0's resume state (train/state.py Saver.resume_state) on another rank; True
        when there was one."""
        if state is None:
            return False
        self.step = self.saver.take_resume_state(state)
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
    def evaluate(self, lr: float | None = None) -> dict[str, Any]:
        """This checkpoint's row (`lr`: the learning rate at its step, the optimizer's by default)."""
        self.model.eval()
        self.ctx.step, self.ctx.tokens = self.step, self.step * self.tokens_per_step
        taken = self.checkpoint_steps if self.watch is None else self.watch.decide.taken
        self.ctx.checkpoint_index = taken.index(self.step)  # `every` counts the checkpoints taken
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        row: dict[str, Any] = {N.STEP: self.step, N.TOKENS: self.ctx.tokens, N.LR: lr}
        if self.loss_count:
            row[N.LOSS_TRAIN] = float(self.loss_sum) / self.loss_count
        if self.decision is not None:
            row |= explain(self.decision)
            self.decision = None
        self.loss_sum.zero_()
        self.loss_count = 0
        row |= evaluate_checkpoint(self.callbacks, self.ctx)
        self.model.train()
        return row

    def _checkpoint(self) -> dict[str, Any]:
        """Rank 0 at a scheduled checkpoint (train/ranks.py, 4): evaluate, write the row, log,
        save, then check for divergence. Returns the row."""
        row = self._emit(self.evaluate())
        self.save()
        step, seconds = self.step, time.perf_counter() - self.t0
        self.writer.submit(lambda: self._status(rundir.RUNNING, seconds, step=step))  # wall time survives SIGKILL
        if self.step >= self.total_steps:
            self.writer.wait()  # the last checkpoint is in place before the run ends
        if N.LOSS_HELDOUT in row:
            self.bar.set_postfix(loss=f"{row[N.LOSS_HELDOUT]:.3f}", refresh=False)
        self.divergence.check(row, self.step)
        return row

    def _emit(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write a checkpoint's row, log it and show it to the live detection."""
        self.writer.submit(lambda: self.metrics.write(row))
        self.logger.log(row | {N.ELAPSED: time.perf_counter() - self.t0})
        self.live.update(row)
        return row

    def _watch(self) -> dict[str, Any] | None:
        """Rank 0 at a watched step under adaptive density (train/ranks.py, 4): decide, take the
        lead-in checkpoints (from kept weights) and this step's checkpoint when it decided so, and
        keep this step's weights when the decisions keep it. Returns this step's row (None: no
        checkpoint here)."""
        w = self.watch
        decisions = w.decide.decide(self.step, w.values(self.model, self.step))
        row = None
        for d in decisions:
            self.decision = d
            if d.step < self.step:
                self._lead_in(d.step)
            else:
                w.keep(self.step, self.model, self.loss_sum, self.loss_count, self.optimizer.param_groups[0]["lr"])
                row = self._checkpoint()
        w.keep(self.step, self.model, self.loss_sum, self.loss_count, self.optimizer.param_groups[0]["lr"])
        return row

    def _lead_in(self, step: int) -> None:
        """Rank 0: the lead-in checkpoint at an earlier watched `step` (adaptive density), from its
        kept weights: its row (the train loss since the previous checkpoint up to it) and its
        weights, without resume state; the model gets this step's weights back."""
        kept, now = self.watch.kept[step], ckpt.snapshot(self.model.state_dict())
        total_sum, total_count, here = self.loss_sum, self.loss_count, self.step
        self.model.load_state_dict(kept.weights)
        self.step, self.loss_sum, self.loss_count = step, kept.loss_sum.clone(), kept.loss_count
        try:
            self._emit(self.evaluate(kept.lr))
            self.saver.save(step, rundir.SCHEDULED, self.loss_sum, 0, weights=kept.weights)
        finally:
            self.model.load_state_dict(now)
            self.step, self.loss_sum, self.loss_count = here, total_sum - kept.loss_sum, total_count - kept.loss_count

    def _checkpoint_elsewhere(self) -> dict[str, Any]:
        """Another rank at a scheduled checkpoint, once rank 0 has saved it: no row here."""
        self.saver.last_saved = self.step
        return {}

    def _interrupt(self, received: int, saved_now: bool) -> None:
        """Rank 0 after a stop signal (train/ranks.py, 5): the interrupt checkpoint (this step's
        scheduled one when it was just written), in place before anyone is told so."""
        path = rundir.checkpoint_dir(self.run_dir, self.step) if saved_now else self.save(rundir.INTERRUPT)
        self.writer.wait()
        print(f"\nreceived {signal.Signals(received).name} at step {self.step}; checkpoint "
              f"written to {path}; resume with resume={self.run_dir}", file=sys.stderr)

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
        self.finite.after_step(self.step, loss, grad_norm, self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return loss

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
        restored = self.ranks.resume(lambda: self._open(resume_checkpoint, previous.get("wandb_run_id"), prior_seconds),
                                     lambda: self.saver.resume_state(self.step), self.take_resume_state)
        self.train_module = self.training_module()  # after the restore: DDP hands rank 0's weights on
        pending = [s for s in self.checkpoint_steps if s > self.step or (not restored and s == self.step)]
        self.watched_at = self.step if restored else -1  # a restored step was watched before
        self.bar = tqdm(total=self.total_steps * self.tokens_per_step, initial=self.step * self.tokens_per_step,
                        unit="tok", unit_scale=True, dynamic_ncols=True, disable=not (sys.stderr.isatty() and self.main),
                        desc=f"{self.cfg.model.n_layers}L")
        self.t0 = time.perf_counter() - prior_seconds  # wall time summed over segments
        self.exit_code, state, self._error = 1, rundir.FAILED, None
        try:
            with STOP as stop:  # installed by the command line already, or here
                last_row, stopped_by = self._loop(pending, stop)
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
            self.bar.close()
            if self.main:
                self._last_word(state)

    def _open(self, checkpoint: Path | None, run_id: str | None, prior_seconds: float) -> bool:
        """Rank 0 before the first step (train/ranks.py, 3): restore `checkpoint` (raises before
        anything on disk changes) and rewind metrics.jsonl to it, copy a text run's tokenizer into
        the run, open metrics.jsonl, start the logger (continuing its run `run_id`) and write
        status.json. True when a checkpoint was restored."""
        if checkpoint is not None:
            self.restore(checkpoint)
            rundir.rewind_metrics(self.run_dir, self.step)
            rundir.remove_stale_temporaries(self.run_dir)
            self.resumed_from.append(self.step)
            self.live.rows = rundir.read_metrics(self.run_dir)  # the rows before the resumed checkpoint
        if getattr(self.data, "tokenizer_dir", None) is not None:
            rundir.save_tokenizer(self.run_dir, self.data.tokenizer_dir)
        self.metrics = rundir.MetricsFile(self.run_dir)
        self.run_id = self.logger.start(self.run_dir, OmegaConf.to_container(self.cfg, resolve=True), run_id)
        self._status(rundir.RUNNING, prior_seconds or None)
        return checkpoint is not None

    def _loop(self, pending: list[int], stop: StopSignal) -> tuple[dict[str, Any], int | None]:
        """Steps and checkpoints until the end or a stop signal. Returns the last checkpoint's row
        and the signal that stopped training early (None when it reached the end: a signal that
        arrives during the last step does not turn a finished run into an interrupted one). A
        fault (non-finite loss, divergence) is recorded as an event row and raised."""
        last_row: dict[str, Any] = {}
        while True:
            saved_now = False
            try:
                if self.watch is None:
                    due = bool(pending) and pending[0] == self.step
                else:
                    due = self.watch.decide.due(self.step) and self.step != self.watched_at
                if due or self.step >= self.total_steps:
                    self.finite.check(self.step)
                if due and self.watch is not None:
                    row = self.ranks.watch(self._watch, self._checkpoint_elsewhere)
                    if row is not None:
                        last_row, saved_now = row, True
                elif due:
                    pending.pop(0)
                    last_row = self.ranks.checkpoint(self._checkpoint, self._checkpoint_elsewhere)
                    saved_now = True
                if self.step >= self.total_steps:
                    return last_row, None
                # A stop signal to any rank stops every rank here; never an interrupt checkpoint of
                # skipped updates.
                received = self.ranks.stop(stop.received, lambda: self.finite.check(self.step),
                                           lambda sig: self._interrupt(sig, saved_now))
                if received is not None:
                    return last_row, received
                tokens = self.data.batch(self.step, self.cfg.train.batch_size)
                if self.world.enabled:  # the global batch on every rank, of which this rank trains its rows
                    tokens = tokens[self.rows]
                loss = self.train_step(tokens.to(self.device, non_blocking=True))
                if self.watch is not None and self.main:
                    self.watch.add_loss(loss)
            except TrainingError as e:
                self._error = str(e)
                if self.main:
                    self.writer.wait()  # the rows and checkpoints before the fault, then its event row
                    self.metrics.write({N.EVENT: e.event, N.STEP: self.step,
                                        N.TOKENS: self.step * self.tokens_per_step, "message": str(e)})
                raise
            self.step += 1
            self.bar.update(self.tokens_per_step)

    def _last_word(self, state: str) -> None:
        """Let the background writer finish, close metrics.jsonl, write the final status.json and
        finish the logger."""
        with contextlib.suppress(BaseException):  # a write that failed now: the run ends failing already
            self.writer.close()
        with contextlib.suppress(OSError):  # a failed write raised already; every row was flushed
            self.metrics.close()
        try:  # a failed run reports its last good checkpoint's step (null: it has none)
            step = self.saver.last_saved if state == rundir.FAILED else self.step
            rundir.write_status(self.run_dir, state, step, self.run_id, time.perf_counter() - self.t0,
                                self.resumed_from, self._error)
        except OSError as e:
            print(f"warning: could not update {self.run_dir / rundir.STATUS_FILE}: {e.strerror or e}",
                  file=sys.stderr)
        try:
            self.logger.finish(self.exit_code)
        except Exception as e:  # noqa: BLE001 - the logger must not hide how training ended
            print(f"warning: logger did not finish cleanly: {type(e).__name__}: {e}", file=sys.stderr)

    @staticmethod
    def _say(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    def _status(self, state: str, seconds: float | None = None, error: str | None = None, step: int | None = None):
        rundir.write_status(self.run_dir, state, self.step if step is None else step, self.run_id, seconds,
                            self.resumed_from, error)
