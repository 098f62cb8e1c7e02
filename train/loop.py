"""The training loop: AdamW with warmup and a schedule, gradient clipping, bf16 autocast on CUDA,
checkpoints and callbacks on a schedule in tokens seen, exact resume, and safe stops."""
from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train import checkpoint as ckpt
from train.callbacks import RunContext
from train.config import read_run_status
from train.data import probes_from_config
from train.loggers import MetricsFile, format_row, read_metrics
from train.schedule import run_schedule


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss or gradient); the message names the step."""


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device=mps was asked for, but MPS is not available")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant, cosine or linear decay to `min_ratio` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * min(1.0, progress)
    raise ValueError(f"unknown optim.schedule {schedule!r}; use constant, cosine or linear")


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


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (checkpoint, then exit)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = select_device(cfg.device)
        if cfg.train.batch_size <= 0 or cfg.train.total_tokens <= 0:
            raise ValueError("train.batch_size and train.total_tokens must be positive")
        if cfg.train.total_tokens < cfg.train.batch_size * cfg.data.n_ctx:
            raise ValueError(f"train.total_tokens={cfg.train.total_tokens} is less than one batch "
                             f"({cfg.train.batch_size * cfg.data.n_ctx} tokens)")
        self.tokens_per_step, self.total_steps, self.schedule = run_schedule(cfg)
        seed_everything(cfg.seed)
        self.data = instantiate(cfg.data)
        self.model = instantiate(cfg.model).to(self.device)
        self.probes = probes_from_config(self.data, cfg.data.n_ctx, cfg.probes).to(self.device)
        self.callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        self.ctx = RunContext(self.model, self.probes)
        for cb in self.callbacks:
            cb.setup(self.ctx)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        warmup = max(1, o.warmup_tokens // self.tokens_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, warmup, self.total_steps, o.schedule, o.min_lr_ratio))
        lr_multiplier(warmup, warmup, self.total_steps, o.schedule, o.min_lr_ratio)  # validate the name early
        self.logger = instantiate(cfg.logger)
        self.step = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        self.exit_code = 1
        self.resumed_from: list[int] = []

    # -- state ---------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "loss_sum": self.loss_sum.detach().cpu(), "loss_count": self.loss_count}

    def meta(self, kind: str) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.step * self.tokens_per_step, "kind": kind,
                "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def save(self, kind: str = "scheduled") -> Path:
        keep = self.cfg.checkpoint.keep_resume_states
        # An interrupt checkpoint must always be resumable, whatever keep_resume_states says.
        with_state = keep > 0 or kind == "interrupt"
        path = ckpt.save_checkpoint(self.run_dir, self.model, self.meta(kind),
                                    self.train_state() if with_state else None,
                                    save_weights=self.cfg.checkpoint.save_weights)
        if kind != "interrupt":
            # Checkpoints written only because the run was stopped are not part of the schedule:
            # once training has passed them they go, so a resumed run's directory matches an
            # uninterrupted one.
            for old in ckpt.list_checkpoints(self.run_dir):
                if old != path and int(old.name[5:]) < self.step and self._is_interrupt(old):
                    shutil.rmtree(old, ignore_errors=True)
            ckpt.prune_train_states(self.run_dir, keep, self.cfg.checkpoint.save_weights)
        return path

    @staticmethod
    def _is_interrupt(path: Path) -> bool:
        try:
            return ckpt.read_meta(path).get("kind") == "interrupt"
        except ckpt.CheckpointError:
            return False

    def restore(self, path: Path) -> None:
        """Load model, optimizer, scheduler, RNG and the running train-loss sums of a checkpoint.
        Everything is read and checked before anything is changed on disk."""
        meta = ckpt.read_meta(path)
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
            raise ckpt.CheckpointError(f"resume state in {path} does not fit this run: {e}") from None
        self.step = int(meta["step"])
        if not 0 <= self.step <= self.total_steps:
            raise ckpt.CheckpointError(f"checkpoint {path} is at step {self.step}, outside this run's "
                                       f"{self.total_steps} steps")

    # -- one checkpoint ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        self.ctx.step, self.ctx.tokens = self.step, self.step * self.tokens_per_step
        self.ctx.checkpoint_index = self.schedule.index(self.step)
        row: dict[str, Any] = {"step": self.step, "tokens": self.ctx.tokens,
                               "lr": self.optimizer.param_groups[0]["lr"]}
        if self.loss_count:
            row["loss/train"] = float(self.loss_sum) / self.loss_count
        self.loss_sum.zero_()
        self.loss_count = 0
        self.ctx.row = row  # the row so far: later callbacks reuse earlier callbacks' scores
        with torch.no_grad():
            for cb in self.callbacks:
                if cb.due(self.ctx):
                    row |= cb(self.ctx)
        self.model.train()
        return row

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        if self.cfg.train.get("debug_nan_at_step") == self.step:  # test-only fault injection
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise TrainingError(f"non-finite {what} at step {self.step} "
                                f"({self.step * self.tokens_per_step:,} tokens); stopped without updating")
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()
        self.loss_count += 1
        return loss

    def run(self, resume_from: Path | None = None, run_id: str | None = None,
            resumed_from: list[int] | None = None, prior_seconds: float = 0.0) -> dict[str, Any]:
        """Train to the end (or to a stop signal or fault). `self.exit_code` says how it ended:
        0 finished, 128 + signal number when stopped by SIGTERM/SIGINT. `resumed_from` and
        `prior_seconds` carry the history of earlier segments of a resumed run into status.json."""
        metrics_path = self.run_dir / "metrics.jsonl"
        self.resumed_from = list(resumed_from or [])
        if resume_from is not None:
            self.restore(resume_from)  # raises before anything on disk changes
            # Rows the killed run wrote after its checkpoint are recomputed, so they go (and a
            # torn last line with them): the file continues exactly as an uninterrupted run's.
            try:
                rows = read_metrics(metrics_path) if metrics_path.exists() else []
            except (ValueError, UnicodeDecodeError) as e:
                raise ckpt.CheckpointError(f"cannot resume: {e}") from None
            kept = [r for r in rows if isinstance(r, dict) and r.get("step", -1) <= self.step]
            ckpt.remove_stale_temporaries(self.run_dir)
            ckpt.write_text_atomic(metrics_path, "".join(format_row(r) for r in kept))
            self.resumed_from.append(self.step)
        metrics = MetricsFile(metrics_path)
        run_id = self.logger.start(self.run_dir, OmegaConf.to_container(self.cfg, resolve=True), run_id)
        self._status("running", run_id, prior_seconds or None)
        pending = [s for s in self.schedule if s > self.step or (resume_from is None and s == self.step)]
        last_row: dict[str, Any] = {}
        bar = tqdm(total=self.total_steps * self.tokens_per_step, initial=self.step * self.tokens_per_step,
                   unit="tok", unit_scale=True, dynamic_ncols=True, disable=not sys.stderr.isatty(),
                   desc=f"{self.cfg.model.n_layers}L")
        t0 = time.perf_counter() - float(prior_seconds or 0.0)  # wall time summed over segments
        self.exit_code, state, error = 1, "failed", None
        try:
            with _StopSignal() as stop:
                while True:
                    saved_now = False
                    if pending and pending[0] == self.step:
                        pending.pop(0)
                        last_row = self.evaluate()
                        metrics.write(last_row)
                        self.logger.log(last_row | {"time/elapsed_s": time.perf_counter() - t0})
                        self.save()
                        saved_now = True
                        if "loss/heldout" in last_row:
                            bar.set_postfix(loss=f"{last_row['loss/heldout']:.3f}", refresh=False)
                    if self.step >= self.total_steps:
                        break
                    if stop.received is not None:
                        path = ckpt.checkpoint_dir(self.run_dir, self.step)
                        if not saved_now:
                            path = self.save(kind="interrupt")
                        name = signal.Signals(stop.received).name
                        print(f"\nreceived {name} at step {self.step}; checkpoint written to {path}; "
                              f"resume with resume={self.run_dir}", file=sys.stderr)
                        self.exit_code, state = 128 + stop.received, "interrupted"
                        return last_row
                    tokens = self.data.batch(self.step, self.cfg.train.batch_size).to(self.device, non_blocking=True)
                    try:
                        self.train_step(tokens)
                    except TrainingError as e:
                        error = str(e)
                        metrics.write({"event": "nonfinite", "step": self.step,
                                       "tokens": self.step * self.tokens_per_step, "message": str(e)})
                        raise
                    self.step += 1
                    bar.update(self.tokens_per_step)
            self.exit_code, state = 0, "finished"
            return last_row
        except KeyboardInterrupt:  # a second signal while stopping: no new checkpoint
            self.exit_code, state, error = 130, "interrupted", "stopped by a second signal"
            raise
        except BaseException as e:
            error = error or f"{type(e).__name__}: {e}"
            raise
        finally:
            bar.close()
            metrics.close()
            self._status(state, run_id, time.perf_counter() - t0, error)
            try:
                self.logger.finish(self.exit_code)
            except Exception as e:  # noqa: BLE001 - the logger must not hide how training ended
                print(f"warning: logger did not finish cleanly: {type(e).__name__}: {e}", file=sys.stderr)

    def _status(self, state: str, run_id: str | None, seconds: float | None = None, error: str | None = None):
        _write_status(self.run_dir, state, self.step, run_id, seconds, self.resumed_from, error)


def _write_status(run_dir: Path, state: str, step: int, run_id: str | None, seconds: float | None = None,
                  resumed_from: list[int] | None = None, error: str | None = None) -> None:
    status: dict[str, Any] = {"state": state, "step": step, "wandb_run_id": run_id}
    if seconds is not None:
        status["wall_seconds"] = round(seconds, 2)
    if resumed_from:
        status["resumed_from_steps"] = list(resumed_from)
    if error:
        status["error"] = error
    ckpt.write_json_atomic(Path(run_dir) / "status.json", status)
