"""Speed benchmark of training and probing, on one machine, in one process:

    uv run --all-extras python scripts/bench.py [--quick] [--device auto|cpu|cuda] [--out FILE.json]

It prints a machine line and markdown tables, and with --out writes every number as JSON:

1. matmul peak: the best FLOP/s (2 n^3 / t) of square matmuls of a few sizes, best of several
   repeats; fp32 on CPU, bf16 on CUDA. It is this machine's measured peak, not a datasheet's.
2. per model size (d_model, n_ctx, batch) = (64, 64, 64) (the default), (128, 128, 32),
   (256, 256, 16), and on CUDA also (512, 1024, 16); 2 layers, the default n_heads (config),
   d_head = d_model / n_heads, the default vocabulary: training-step tokens/s (forward through the
   model's training path, cross-entropy as `Trainer.loss`, backward, grad-norm clip, AdamW with
   the config's hyperparameters; bf16 autocast on CUDA, like the trainer), achieved FLOP/s as a
   percentage of the measured matmul peak (MFU on CUDA), peak memory, and the speed ratio to
   TransformerLens's HookedTransformer built by analysis/export.py (`transformer_lens_state`: the
   same shapes and weights), trained with the same step, batch and AdamW, the same number of
   warmed-up steps, in timed blocks interleaved with ours (the ratio is the median over blocks
   of ours/TL). Batches are fixed uniform random token ids (the cost does not depend on them).
3. probe cost: the default config (logger=none), `train.loop.Trainer(cfg, tmp)`, trained
   `probe_train_steps` steps first (300 in the full run, none with --quick) and then the timed
   `Trainer.train_step` calls (345 and 10 steps in all; the JSON says), then `Trainer.evaluate()` timed (median of several after a warm-up) at one checkpoint of each
   distinct set of due callbacks in the default schedule (all callbacks; all but those with
   `every` > 1), divided by the median `Trainer.train_step` time on data batches; also the mean
   over the whole default schedule, and a per-callback breakdown (one extra evaluation each).
4. loop/step ratio: `Trainer.run()` without callbacks (callbacks.X=null for every entry), the
   default checkpoint schedule with its checkpoint writes, nothing subtracted, timed from start
   to end, against the bare step (same model config, one fixed batch, AdamW, clip) timed in the
   same process before and after the run. The full run trains the default total_tokens; --quick
   a short run, whose default schedule is much denser in checkpoints (the ratio is lower). The
   seconds spent inside run() in train_step, evaluate, save, _status and data.batch are
   reported too (the methods wrapped for the run; their overhead is negligible).
5. compile gain: training-step tokens/s of `torch.compile(model)` vs the eager model at the
   default size (first-call compile time reported apart); also `Trainer.train_step` with
   `train.compile=true` vs false when train/core/config.py TrainConfig has that flag (the training
   module prepared as `Trainer.run` prepares it; its first call reuses the graph compiled
   just before when dynamo can).
6. peak memory per size: on CPU the process's peak RSS (VmHWM) while that size's own model
   trains, reset before each size where Linux allows it (/proc/self/clear_refs), else the
   process high-water mark of resource.getrusage; it includes the interpreter and libraries. On
   CUDA torch.cuda.max_memory_allocated, reset per size.

Model FLOPs per token of a training step (H = n_heads, E = d_head, L = n_layers, T = n_ctx,
V = d_vocab, D = d_model):

    N_mm      = L * (3 D H E  [W_Q, W_K, W_V]  +  H E D  [W_O])  +  D V  [W_U]
    FLOPs/tok = 6 N_mm  +  12 L T H E

6 N_mm: 2 FLOPs per multiply-add in the forward pass and twice that in the backward pass (input
and weight gradients) for every weight matrix a token passes through; W_E and W_pos are lookups
and additions, not matmuls. 12 L T H E: Q K^T and pattern @ V, 2 T E FLOPs each per head and
token forward, x3 for training, over the full T x T square (no causal halving: PaLM's MFU
convention, Chowdhery et al. 2022, appendix B). Biases, LayerNorm, softmax, the loss and the
optimizer are not counted. Achieved FLOP/s = FLOPs/tok x tokens/s, tokens = batch x n_ctx.

Timing: time.perf_counter, torch.cuda.synchronize around every timed region on CUDA, warm-up
steps before every timed block. No speed targets here or in the tests: this prints numbers.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()  # before the imports of torch and the project

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from train.core.config import DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from train.core.device import autocast, select_device  # noqa: E402
from train.core.model import AttnOnlyTransformer, next_token_loss  # noqa: E402

N_LAYERS = 2
DEFAULT_SIZE = (ModelConfig.d_model, DataConfig.n_ctx, TrainConfig.batch_size)  # (64, 64, 64)
CPU_SIZES = (DEFAULT_SIZE, (128, 128, 32), (256, 256, 16))
CUDA_EXTRA_SIZE = (512, 1024, 16)
TL_MISSING = "TransformerLens not installed"


@dataclass(frozen=True)
class Settings:
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    sizes: tuple[tuple[int, int, int], ...]  # (d_model, n_ctx, batch)
    warmup_steps: int  # before every timed measurement
    blocks: int  # timed blocks per measurement (the median is reported)
    block_seconds: float  # target length of one block (steps per block follow from a first estimate)
    probe_train_steps: int  # training steps before timing evaluate() (0: the initial model)
    probe_repeats: int  # timed evaluate() calls per checkpoint kind
    step_samples: int  # individually timed Trainer.train_step calls
    loop_tokens: int | None  # train.total_tokens of the loop run (None: the default)


def settings_for(device: torch.device, quick: bool) -> Settings:
    cuda = device.type == "cuda"
    if quick:
        return Settings(matmul_sizes=(1024, 4096) if cuda else (128, 384), matmul_repeats=3,
                        sizes=CPU_SIZES[:2] + ((CUDA_EXTRA_SIZE,) if cuda else ()), warmup_steps=2, blocks=3,
                        block_seconds=0.1, probe_train_steps=0, probe_repeats=2, step_samples=8,
                        loop_tokens=150_000)
    return Settings(matmul_sizes=(2048, 4096, 8192) if cuda else (256, 512, 1024), matmul_repeats=10,
                    sizes=CPU_SIZES + ((CUDA_EXTRA_SIZE,) if cuda else ()), warmup_steps=5, blocks=7,
                    block_seconds=0.5, probe_train_steps=300, probe_repeats=7, step_samples=40, loop_tokens=None)


# -- small helpers ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, n: int = 1) -> float:
    """Seconds for n calls of fn, synchronized on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def random_batch(batch: int, n_ctx: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n_ctx), generator=g).to(device)


# -- machine -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import importlib.metadata

        info["transformer_lens"] = importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        info["transformer_lens"] = None
    return info


def machine_line(info: dict[str, Any], peak: float, dtype: str) -> str:
    gpu = f"GPU {info['gpu']} (CUDA {info.get('cuda')})" if info["gpu"] else "no GPU"
    tl = f"TransformerLens {info['transformer_lens']}" if info["transformer_lens"] else TL_MISSING
    return (f"machine: {info['cpu']}, {info['cpu_count']} cores ({info['cpu_usable']} usable), "
            f"torch {info['torch']} with {info['torch_threads']} threads, {gpu}, {tl}; "
            f"measured {dtype} matmul peak {fmt_flops(peak)}")


# -- 1. matmul peak ------------------------------------------------------------------------------------
def matmul_flops(n: int, device: torch.device, dtype: torch.dtype, repeats: int, min_seconds: float = 0.05) -> float:
    """Best FLOP/s (2 n^3 / t) of an n x n @ n x n matmul over `repeats` timed repeats, each of
    enough matmuls to last about `min_seconds`."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    timed(lambda: a @ b, device, 2)  # warm-up
    inner = max(1, min(200, math.ceil(min_seconds / max(timed(lambda: a @ b, device), 1e-9))))
    best = min(timed(lambda: a @ b, device, inner) / inner for _ in range(repeats))
    return 2 * n**3 / best


def matmul_peak(device: torch.device, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    by_size = {str(n): matmul_flops(n, device, dtype, repeats) for n in sizes}
    return {"dtype": str(dtype).removeprefix("torch."), "flops_by_size": by_size, "peak_flops": max(by_size.values())}


# -- model FLOPs -------------------------------------------------------------------------------------
def flops_per_token(n_layers: int, d_model: int, n_heads: int, d_head: int, d_vocab: int, n_ctx: int) -> dict[str, int]:
    """Training FLOPs per token (formula: the module docstring)."""
    he = n_heads * d_head
    n_mm = n_layers * (3 * d_model * he + he * d_model) + d_model * d_vocab
    weights = 6 * n_mm
    attention = 12 * n_layers * n_ctx * he
    return {"matmul_params": n_mm, "weights": weights, "attention": attention, "total": weights + attention}


# -- models and steps ----------------------------------------------------------------------------------
def make_model(d_model: int, n_ctx: int, device: torch.device, seed: int = 0) -> AttnOnlyTransformer:
    """2 layers, the default n_heads and vocabulary, d_head = d_model / n_heads, other settings the
    config's defaults."""
    torch.manual_seed(seed)
    n_heads = ModelConfig.n_heads
    return AttnOnlyTransformer(d_vocab=DataConfig.vocab_size, n_ctx=n_ctx, n_layers=N_LAYERS, n_heads=n_heads,
                               d_model=d_model, d_head=d_model // n_heads).to(device)


def import_transformer_lens():
    """The transformer_lens module, or None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformer_lens
    except ImportError:
        return None
    return transformer_lens


def make_tl_model(model: AttnOnlyTransformer, tl, device: torch.device):
    """TransformerLens's HookedTransformer with `model`'s config and weights (analysis/export.py)."""
    from analysis.export import transformer_lens_state

    state, cfg = transformer_lens_state(model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HookedTransformer is deprecated" (3.x)
        with contextlib.redirect_stdout(sys.stderr):
            hooked = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg, device=device.type))
    missing, unexpected = hooked.load_state_dict(state, strict=False)
    with contextlib.redirect_stdout(sys.stderr):  # "Moving model to device: ..."
        hooked = hooked.to(device)
    if unexpected or not all(k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing):
        raise RuntimeError(f"HookedTransformer weights do not match: missing {missing}, unexpected {unexpected}")
    return hooked.train()


def make_optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the config's defaults, fused on CUDA as the trainer's."""
    o = OptimConfig()
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                             fused=device.type == "cuda" or None)


def make_step(logits_of: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter],
              device: torch.device, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step on the fixed batch `tokens`, as train/loop.py Trainer.train_step without
    its scheduler and non-finite checks: autocast forward, cross-entropy, backward, clip, AdamW."""
    optimizer = make_optimizer(params, device)
    clip = OptimConfig.grad_clip

    def step() -> torch.Tensor:
        with autocast(device):
            logits = logits_of(tokens)
        loss = next_token_loss(logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        optimizer.step()
        return loss.detach()

    return step


def model_step(model: AttnOnlyTransformer, device: torch.device, tokens: torch.Tensor, forward=None):
    forward = model if forward is None else forward
    return make_step(lambda t: forward(t).logits, list(model.parameters()), device, tokens)


def tl_step(hooked, device: torch.device, tokens: torch.Tensor):
    return make_step(lambda t: hooked(t), list(hooked.parameters()), device, tokens)


def time_interleaved(steps: dict[str, Callable[[], Any]], device: torch.device, warmup: int, blocks: int,
                     block_seconds: float) -> dict[str, Any]:
    """Median seconds per step of each step function: `warmup` untimed steps each, then `blocks`
    timed blocks of the same number of steps for all, the functions interleaved (the order
    alternating from block to block) so that a change in machine load hits them alike. Returns
    per name the block times per step, their median, and the steps per block."""
    names = list(steps)
    estimate = 0.0
    for name in names:
        timed(steps[name], device, warmup)
        estimate = max(estimate, timed(steps[name], device))
    n = max(2, min(500, round(block_seconds / max(estimate, 1e-9))))
    per_step: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        for name in (names if b % 2 == 0 else names[::-1]):
            per_step[name].append(timed(steps[name], device, n) / n)
    return {"steps_per_block": n, "seconds_per_step": per_step,
            "median_seconds_per_step": {name: statistics.median(v) for name, v in per_step.items()}}


# -- memory ---------------------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else None
    return None


def reset_peak_memory(device: torch.device) -> int | None:
    """Reset the peak-memory counter and return the memory in use now (the baseline), or None
    when the counter cannot be reset (CPU outside Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return _vm_hwm_bytes()


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that the RSS growth of the
    next measurement is not hidden in memory an earlier one freed but kept resident."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def process_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(device: torch.device, baseline: int | None) -> dict[str, Any]:
    """The peak since `reset_peak_memory` returned `baseline` (bytes: the peak, baseline: in use
    at the reset)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "baseline_bytes": baseline}
    if baseline is not None:
        return {"kind": "rss_peak_since_reset", "bytes": _vm_hwm_bytes(), "baseline_bytes": baseline,
                "process_peak_rss_bytes": process_peak_rss()}
    return {"kind": "process_peak_rss", "bytes": process_peak_rss(), "baseline_bytes": None,
            "process_peak_rss_bytes": process_peak_rss()}


def warm_up_libraries(device: torch.device) -> None:
    """A few steps of a tiny model, so that one-time costs (lazy library loads, allocator and
    thread-pool set-up) land in no size's time or memory."""
    model = make_model(16, 16, device)
    timed(model_step(model, device, random_batch(4, 16, model.d_vocab, device)), device, 3)


# -- 2. + 6. per model size ----------------------------------------------------------------------------
def bench_size(d_model: int, n_ctx: int, batch: int, device: torch.device, s: Settings, peak: float, tl) -> dict[str, Any]:
    baseline = reset_peak_memory(device)
    model = make_model(d_model, n_ctx, device)
    tokens = random_batch(batch, n_ctx, model.d_vocab, device)
    ours = model_step(model, device, tokens)
    timed(ours, device, s.warmup_steps)  # the memory of our model's training step alone
    memory = peak_memory(device, baseline)
    steps = {"ours": ours}
    row: dict[str, Any] = {"d_model": d_model, "n_ctx": n_ctx, "batch": batch, "n_layers": N_LAYERS,
                           "n_heads": model.n_heads, "d_head": model.d_head, "d_vocab": model.d_vocab,
                           "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": batch * n_ctx,
                           "flops_per_token": flops_per_token(N_LAYERS, d_model, model.n_heads, model.d_head,
                                                              model.d_vocab, n_ctx),
                           "peak_memory": memory}
    if tl is not None:
        hooked = make_tl_model(model, tl, device)  # same weights as ours at the start
        steps["transformer_lens"] = tl_step(hooked, device, tokens)
    t = time_interleaved(steps, device, s.warmup_steps, s.blocks, s.block_seconds)
    tps = {name: batch * n_ctx / sec for name, sec in t["median_seconds_per_step"].items()}
    achieved = row["flops_per_token"]["total"] * tps["ours"]
    row |= {"steps_per_block": t["steps_per_block"], "blocks": s.blocks,
            "seconds_per_step": t["median_seconds_per_step"]["ours"], "tokens_per_second": tps["ours"],
            "achieved_flops": achieved, "percent_of_peak": 100 * achieved / peak}
    if tl is None:
        row["transformer_lens"] = {"status": TL_MISSING}
    else:
        blocks = t["seconds_per_step"]
        ratios = [tl_s / ours_s for ours_s, tl_s in zip(blocks["ours"], blocks["transformer_lens"])]
        tl_achieved = row["flops_per_token"]["total"] * tps["transformer_lens"]
        row["transformer_lens"] = {"status": "measured", "tokens_per_second": tps["transformer_lens"],
                                   "seconds_per_step": t["median_seconds_per_step"]["transformer_lens"],
                                   "percent_of_peak": 100 * tl_achieved / peak,
                                   "ratio_ours_over_tl": statistics.median(ratios)}
    del steps
    return row


# -- 3. probe cost -------------------------------------------------------------------------------------
def default_trainer(run_dir: Path, device: torch.device, overrides: list[str] = ()):
    from train.core.config import compose
    from train.loop import Trainer

    cfg = compose(["logger=none", f"device={device.type}", *overrides])
    return Trainer(cfg, run_dir)


def checkpoint_kinds(trainer) -> dict[tuple[str, ...], list[int]]:
    """Checkpoint indices of the schedule grouped by the set of callbacks due there."""
    kinds: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(trainer.checkpoint_steps)):
        due = tuple(cb.name for cb in trainer.callbacks if i % cb.every == 0)
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


def callback_breakdown(trainer, device: torch.device) -> dict[str, float]:
    """Seconds per due callback at the trainer's current checkpoint, run as
    train/core/callbacks.py evaluate_checkpoint runs them (in order, no_grad, scores published)."""
    ctx = trainer.ctx
    ctx.step, ctx.tokens = trainer.step, trainer.step * trainer.tokens_per_step
    ctx.checkpoint_index = trainer.checkpoint_steps.index(trainer.step)
    ctx.scores = {}
    out = {}
    trainer.model.eval()
    with torch.no_grad():
        for cb in trainer.callbacks:
            if cb.due(ctx):
                sync(device)
                t0 = time.perf_counter()
                results = cb(ctx)
                sync(device)
                out[cb.name] = time.perf_counter() - t0
                ctx.scores |= results
    trainer.model.train()
    return out


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
LOOP_PARTS = ("train_step", "evaluate", "save", "_status")  # Trainer methods timed inside run()


def time_inside(trainer, device: torch.device) -> dict[str, float]:
    """Seconds spent in the Trainer's methods LOOP_PARTS and in the data's `batch` during
    `trainer.run()` (instance attributes wrapping the methods; filled in as the run goes)."""
    spent = {name: 0.0 for name in (*LOOP_PARTS, "data.batch")}

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

    for name in LOOP_PARTS:
        if hasattr(trainer, name):
            wrap(trainer, name, name)
    wrap(trainer.data, "batch", "data.batch")
    return spent


def bench_loop(device: torch.device, s: Settings) -> dict[str, Any]:
    from hydra.utils import instantiate

    from train.core.config import compose

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
        inside = time_inside(trainer, device)
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
    return hasattr(getattr(trainer, "train_module", None), "_orig_mod")


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


# -- output --------------------------------------------------------------------------------------------
def fmt_si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_flops(x: float) -> str:
    return fmt_si(x, "FLOP/s")


def fmt_memory(m: dict[str, Any]) -> str:
    if m["bytes"] is None:
        return "n/a"
    growth = "" if m["baseline_bytes"] is None else f" (+{(m['bytes'] - m['baseline_bytes']) / 2**20:.0f})"
    return f"{m['bytes'] / 2**20:.0f} MiB{growth}"


def tables(r: dict[str, Any]) -> str:
    cuda = r["machine"]["gpu"] is not None
    pct = "MFU" if cuda else "% of fp32 peak"
    mem = "peak CUDA memory (+ over the start)" if cuda else "peak RSS (+ over the start)"
    lines = [f"| d_model / n_ctx / batch | params | FLOP/token | tokens/s | {pct} | ours/TransformerLens | {mem} |",
             "|---|---|---|---|---|---|---|"]
    for row in r["sizes"]:
        tl = row["transformer_lens"]
        vs = TL_MISSING if tl["status"] != "measured" else \
            f"{tl['ratio_ours_over_tl']:.2f}x ({fmt_si(tl['tokens_per_second'], 'tok/s')} TL)"
        lines.append(f"| {row['d_model']} / {row['n_ctx']} / {row['batch']} | {row['params']:,} | "
                     f"{fmt_si(row['flops_per_token']['total'], 'FLOP')} | {fmt_si(row['tokens_per_second'], 'tok/s')} | "
                     f"{row['percent_of_peak']:.1f}% | {vs} | {fmt_memory(row['peak_memory'])} |")
    p, loop, c = r["probes"], r["loop"], r["compile"]
    lines += ["", "| measurement (default config) | value | detail |", "|---|---|---|"]
    lines.append(f"| matmul peak ({r['matmul_peak']['dtype']}) | {fmt_flops(r['matmul_peak']['peak_flops'])} | "
                 + ", ".join(f"n={n}: {fmt_flops(v)}" for n, v in r["matmul_peak"]["flops_by_size"].items()) + " |")
    trained = f"model trained {p['model_trained_steps']} steps" if p["model_trained_steps"] else "untrained model"
    lines.append(f"| Trainer.train_step | {p['train_step_seconds'] * 1e3:.1f} ms | median of {p['train_step_samples']} "
                 f"data batches |")
    for k in p["kinds"]:
        which = "without " + ", ".join(k["not_due"]) if k["not_due"] else "all callbacks"
        lines.append(f"| probe cost per checkpoint, {which} | {k['in_train_steps']:.1f} train steps | "
                     f"evaluate() {k['evaluate_seconds'] * 1e3:.0f} ms, {k['checkpoints_in_schedule']} of "
                     f"{p['checkpoints']} checkpoints, {trained} |")
    lines.append(f"| probe cost, mean over the schedule | {p['mean_in_train_steps']:.1f} train steps | "
                 f"{p['checkpoints']} checkpoints add {100 * p['schedule_share_of_step_time']:.0f}% to the "
                 f"{p['total_steps']} steps' time |")
    lines.append(f"| loop / bare step (no callbacks) | {loop['loop_over_step']:.2f} | "
                 f"Trainer.run {fmt_si(loop['loop_tokens_per_second'], 'tok/s')} ({loop['steps']} steps, "
                 f"{loop['checkpoints']} checkpoints, {loop['run_seconds']:.1f} s) vs bare "
                 f"{fmt_si(loop['bare_tokens_per_second'], 'tok/s')}; inside run: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in loop["seconds_inside"].items()) + " |")
    lines.append(f"| torch.compile gain (median of paired blocks) | {c['gain']:.2f}x | "
                 f"{fmt_si(c['compiled_tokens_per_second'], 'tok/s')} vs "
                 f"eager {fmt_si(c['eager_tokens_per_second'], 'tok/s')}; first call {c['first_call_seconds']:.1f} s |")
    t = c.get("trainer")
    if t and t["status"] == "measured":
        lines.append(f"| train.compile=true gain (Trainer, paired blocks) | {t['gain']:.2f}x | Trainer.train_step "
                     f"{fmt_si(t['compiled_tokens_per_second'], 'tok/s')} vs {fmt_si(t['eager_tokens_per_second'], 'tok/s')}"
                     f"; first call {t['first_call_seconds']:.1f} s |")
    elif t:
        lines.append(f"| train.compile=true gain (Trainer) | n/a | {t['status']} |")
    else:
        lines.append("| train.compile=true gain (Trainer) | n/a | train/core/config.py TrainConfig has no `compile` flag |")
    return "\n".join(lines)


def run_all(device: torch.device, quick: bool, use_tl: bool = True, say=print) -> dict[str, Any]:
    s = settings_for(device, quick)
    t0 = time.perf_counter()
    tl = import_transformer_lens() if use_tl else None
    result: dict[str, Any] = {"machine": machine_info(device), "quick": quick, "settings": dataclasses.asdict(s)}
    if not use_tl:
        result["machine"]["transformer_lens"] = None
    say("matmul peak ...")
    result["matmul_peak"] = peak = matmul_peak(device, s.matmul_sizes, s.matmul_repeats)
    warm_up_libraries(device)
    # The loop first, in a fresh process state: after the model sizes and TransformerLens the same
    # run is measurably slower (allocator and thread-pool state), which is not the loop's doing.
    say("loop vs step ...")
    result["loop"] = bench_loop(device, s)
    result["sizes"] = []
    for size in s.sizes:
        say(f"training step, d_model/n_ctx/batch {size} ...")
        result["sizes"].append(bench_size(*size, device, s, peak["peak_flops"], tl))
    say("probe cost ...")
    result["probes"] = bench_probes(device, s)
    say("torch.compile ...")
    result["compile"] = bench_compile(device, s)
    result["process_peak_rss_bytes"] = process_peak_rss()
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (about a minute on 2 cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, help="write every number as JSON here")
    parser.add_argument("--without-transformer-lens", action="store_true",
                        help="leave TransformerLens out even when it is installed")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    result = run_all(device, args.quick, not args.without_transformer_lens,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
    result["wall_seconds_with_imports"] = time.perf_counter() - _T_START
    print(machine_line(result["machine"], result["matmul_peak"]["peak_flops"], result["matmul_peak"]["dtype"]))
    print()
    print(tables(result))
    print(f"\n{'quick' if args.quick else 'full'} benchmark: {result['wall_seconds']:.0f} s measuring, "
          f"{result['wall_seconds_with_imports']:.0f} s with the imports")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
