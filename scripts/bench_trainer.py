"""The measurements through the project's Trainer on the default config (scripts/bench.py,
sections 3 to 5): what the callbacks cost per checkpoint, the training loop against the bare
step, and the torch.compile gain of the model and of `train.compile`."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from scripts.bench_steps import make_model, model_step, random_batch
from scripts.bench_timing import DEFAULT_SIZE, Settings, sync, time_interleaved, timed
from train.core import rundir
from train.core.config import TrainConfig, compose


# -- 3. probe cost -------------------------------------------------------------------------------------
def default_trainer(run_dir: Path, device: torch.device, overrides: list[str] = ()):
    from train.loop import Trainer

    cfg = compose(["logger=none", f"device={device.type}", *overrides])
    return Trainer(cfg, run_dir)


def checkpoint_kinds(trainer) -> dict[tuple[str, ...], list[int]]:
    """Checkpoint indices of the schedule grouped by the set of callbacks due there
    (`Callback.due` at each index)."""
    kinds: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(trainer.checkpoint_steps)):
        at = dataclasses.replace(trainer.ctx, checkpoint_index=i)
        due = tuple(cb.name for cb in trainer.callbacks if cb.due(at))
        kinds.setdefault(due, []).append(i)
    return kinds


def time_train_steps(trainer, device: torch.device, n: int, warmup: int) -> list[float]:
    """Seconds of each of n `Trainer.train_step` calls on the data's batches (after `warmup`)."""
    times = []
    bs = trainer.cfg.train.batch_size
    for i in range(warmup + n):
        tokens = trainer.data.batch(trainer.step, bs).to(trainer.device)
        sec = timed(lambda: trainer.train_step(tokens), device)
        trainer.step += 1
        if i >= warmup:
            times.append(sec)
    return times


class TimedCallback:
    """`callback`, with the seconds of its last call (synchronized on CUDA) in
    `spent[callback.name]`; everything else is the callback's own."""

    def __init__(self, callback, device: torch.device, spent: dict[str, float]):
        self.callback, self.device, self.spent = callback, device, spent

    def __getattr__(self, name: str):
        return getattr(self.callback, name)

    def __call__(self, ctx):
        sync(self.device)
        t0 = time.perf_counter()
        results = self.callback(ctx)
        sync(self.device)
        self.spent[self.callback.name] = time.perf_counter() - t0
        return results


def callback_breakdown(trainer, device: torch.device) -> dict[str, float]:
    """Seconds per due callback at the trainer's current checkpoint: one `Trainer.evaluate()`
    (train/core/callbacks.py evaluate_checkpoint: in order, no_grad, scores published) with
    each callback's call timed."""
    spent: dict[str, float] = {}
    callbacks = trainer.callbacks
    trainer.callbacks = [TimedCallback(cb, device, spent) for cb in callbacks]
    try:
        trainer.evaluate()
    finally:
        trainer.callbacks = callbacks
    return spent


def bench_probes(device: torch.device, s: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-probes-") as tmp:
        trainer = default_trainer(Path(tmp), device)
        if s.probe_train_steps:
            time_train_steps(trainer, device, s.probe_train_steps, 0)
        step_times = time_train_steps(trainer, device, s.step_samples, s.warmup_steps)
        trained_steps = trainer.step
        step_s = statistics.median(step_times)
        kinds = checkpoint_kinds(trainer)
        per_kind = []
        for due, indices in kinds.items():
            trainer.step = trainer.checkpoint_steps[indices[0]]  # evaluate() needs a checkpoint step
            trainer.evaluate()  # warm-up
            times = [timed(trainer.evaluate, device) for _ in range(s.probe_repeats)]
            eval_s = statistics.median(times)
            per_kind.append({"callbacks": list(due), "not_due": [cb.name for cb in trainer.callbacks if cb.name not in due],
                             "checkpoints_in_schedule": len(indices),
                             "timed_at_step": trainer.step, "evaluate_seconds": eval_s, "evaluate_seconds_all": times,
                             "in_train_steps": eval_s / step_s, "breakdown_seconds": callback_breakdown(trainer, device)})
        n_checkpoints = len(trainer.checkpoint_steps)
        mean_eval = sum(k["evaluate_seconds"] * k["checkpoints_in_schedule"] for k in per_kind) / n_checkpoints
        return {"config": "default (logger=none)", "model_trained_steps": trained_steps,
                "train_step_seconds": step_s, "train_step_samples": len(step_times),
                "checkpoints": n_checkpoints, "total_steps": trainer.total_steps, "kinds": per_kind,
                "mean_evaluate_seconds": mean_eval, "mean_in_train_steps": mean_eval / step_s,
                "schedule_share_of_step_time": mean_eval * n_checkpoints / (step_s * trainer.total_steps)}


# -- 4. loop vs bare step --------------------------------------------------------------------------------
LOOP_METHODS = ("train_step", "evaluate", "save")  # Trainer methods timed inside run()
STATUS_KEY = "_status"  # the status.json writes (rundir.write_status), under the key of their old Trainer method


@contextlib.contextmanager
def time_inside(trainer, device: torch.device, extra: tuple[tuple[Any, str, str], ...] = ()):
    """Yields the seconds spent in the Trainer's methods LOOP_METHODS, in the methods of `extra`
    ((object, method name, key)), in the status writes (train/core/rundir.py write_status) and in
    the data's `batch` while the block runs, filled in as it goes (wrappers: instance attributes
    on the trainer, its data and the `extra` objects, the module's function replaced until the
    block ends)."""
    spent = {name: 0.0 for name in (*LOOP_METHODS, *(key for _, _, key in extra), STATUS_KEY, "data.batch")}

    def wrap(obj, attr: str, key: str) -> None:
        method = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync(device)
                spent[key] += time.perf_counter() - t0

        setattr(obj, attr, wrapper)

    for name in LOOP_METHODS:
        wrap(trainer, name, name)
    for obj, attr, key in extra:
        wrap(obj, attr, key)
    wrap(trainer.data, "batch", "data.batch")
    write_status = rundir.write_status
    wrap(rundir, "write_status", STATUS_KEY)
    try:
        yield spent
    finally:
        rundir.write_status = write_status


def bench_loop(device: torch.device, s: Settings) -> dict[str, Any]:
    from hydra.utils import instantiate

    names = list(compose(["logger=none"]).callbacks)
    overrides = [f"callbacks.{n}=null" for n in names]
    if s.loop_tokens is not None:
        overrides.append(f"train.total_tokens={s.loop_tokens}")
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        trainer = default_trainer(Path(tmp), device, overrides)
        cfg = trainer.cfg
        torch.manual_seed(1)
        bare_model = instantiate(cfg.model).to(device)
        bare = model_step(bare_model, device, trainer.data.batch(0, cfg.train.batch_size).to(device))
        half = max(1, s.blocks // 2 + 1)
        before = time_interleaved({"bare": bare}, device, s.warmup_steps, half, s.block_seconds)
        with time_inside(trainer, device) as inside:
            seconds = timed(trainer.run, device)
        if trainer.exit_code != 0:
            raise RuntimeError(f"the loop run ended with exit code {trainer.exit_code}")
        after = time_interleaved({"bare": bare}, device, 1, half, s.block_seconds)
        bare_s = statistics.median(before["seconds_per_step"]["bare"] + after["seconds_per_step"]["bare"])
        tokens = trainer.total_steps * trainer.tokens_per_step
        loop_tps, bare_tps = tokens / seconds, trainer.tokens_per_step / bare_s
        return {"callbacks": "none", "total_tokens": int(cfg.train.total_tokens), "steps": trainer.total_steps,
                "checkpoints": len(trainer.checkpoint_steps), "save_weights": bool(cfg.checkpoint.save_weights),
                "run_seconds": seconds, "seconds_inside": inside, "loop_tokens_per_second": loop_tps,
                "bare_step_seconds": bare_s,
                "bare_tokens_per_second": bare_tps, "loop_over_step": loop_tps / bare_tps}


# -- 5. compile ----------------------------------------------------------------------------------------
def has_compile_flag() -> bool:
    return "compile" in {f.name for f in dataclasses.fields(TrainConfig)}


def bench_compile(device: torch.device, s: Settings) -> dict[str, Any]:
    d_model, n_ctx, batch = DEFAULT_SIZE
    eager_model = make_model(d_model, n_ctx, device)
    compiled_model = make_model(d_model, n_ctx, device)
    tokens = random_batch(batch, n_ctx, eager_model.d_vocab, device)
    eager = model_step(eager_model, device, tokens)
    compiled = model_step(compiled_model, device, tokens, forward=torch.compile(compiled_model))
    compile_s = timed(compiled, device)  # the first call compiles (forward and backward)
    t = time_interleaved({"eager": eager, "compiled": compiled}, device, s.warmup_steps, s.blocks, s.block_seconds)
    sec = t["median_seconds_per_step"]
    out = {"size": list(DEFAULT_SIZE), "first_call_seconds": compile_s,
           "eager_tokens_per_second": batch * n_ctx / sec["eager"],
           "compiled_tokens_per_second": batch * n_ctx / sec["compiled"],
           "gain": statistics.median(e / c for e, c in zip(t["seconds_per_step"]["eager"], t["seconds_per_step"]["compiled"])),
           "train_compile_flag": has_compile_flag()}
    if has_compile_flag():
        try:  # a feature in progress elsewhere: its failure is reported, not raised
            out["trainer"] = bench_trainer_compile(device, s)
        except Exception as e:  # noqa: BLE001
            out["trainer"] = {"status": f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return out


def prepare_training_module(trainer) -> bool:
    """Give `trainer` the training module `Trainer.run` would (train.compile: compiled); True when
    that module is compiled. Outside `run` the Trainer trains `trainer.model` itself."""
    trainer.train_module = trainer.training_module()
    return hasattr(trainer.train_module, "_orig_mod")  # torch.compile's wrapper


def bench_trainer_compile(device: torch.device, s: Settings) -> dict[str, Any]:
    """`Trainer.train_step` with train.compile=true vs false, on one fixed data batch."""
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        plain = default_trainer(Path(tmp) / "a", device, ["train.compile=false"])
        flagged = default_trainer(Path(tmp) / "b", device, ["train.compile=true"])
        prepare_training_module(plain)
        if not prepare_training_module(flagged):
            return {"status": "not measured: with train.compile=true the Trainer's training module is not "
                              "compiled outside Trainer.run"}
        tokens = plain.data.batch(0, plain.cfg.train.batch_size).to(device)
        first = timed(lambda: flagged.train_step(tokens), device)
        t = time_interleaved({"eager": lambda: plain.train_step(tokens), "compiled": lambda: flagged.train_step(tokens)},
                             device, s.warmup_steps, s.blocks, s.block_seconds)
        sec, n = t["median_seconds_per_step"], plain.tokens_per_step
        return {"status": "measured", "first_call_seconds": first, "eager_tokens_per_second": n / sec["eager"],
                "compiled_tokens_per_second": n / sec["compiled"],
                "gain": statistics.median(e / c for e, c in zip(t["seconds_per_step"]["eager"],
                                                                t["seconds_per_step"]["compiled"]))}
