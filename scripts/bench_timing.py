"""The benchmark's settings and timing (scripts/bench.py defines what is measured): the model
sizes, the settings of the full and the quick run, and timed calls, synchronized on CUDA."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from train.core.config import DataConfig, ModelConfig, TrainConfig

N_LAYERS = 2
DEFAULT_SIZE = (ModelConfig.d_model, DataConfig.n_ctx, TrainConfig.batch_size)  # (64, 64, 64)
CPU_SIZES = (DEFAULT_SIZE, (128, 128, 32), (256, 256, 16))
CUDA_EXTRA_SIZE = (512, 1024, 16)


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
