"""The machine (scripts/bench.py, sections 1 and 6): what it is, its measured matmul peak, and
the peak memory of a measurement (CUDA's allocator counter, or the process's peak RSS on CPU)."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from scripts.bench_timing import timed


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
