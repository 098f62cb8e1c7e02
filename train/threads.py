"""torch's CPU threads for a run (config `threads`: a number, or `auto`), set by the command line
(train/cli.py) before the trainer's first torch work. A program that calls `train.cli.run` itself
keeps its own thread count.

`auto`, in this order:

1. OMP_NUM_THREADS is set: torch's count from it, untouched (a launcher's or the user's choice;
   torchrun sets 1 per process);
2. the run resumes: the count its checkpoint was written with (meta.json `threads`), so that the
   resumed run writes the same rows as an uninterrupted one (CPU results depend on the count);
3. one thread per free core: the cores of this process's CPU set that were idle over
   SAMPLE_SECONDS (Linux /proc/stat; elsewhere the CPU count less the 1-minute load average),
   rounded, at least 1 and at most torch's own default (the physical cores). On a shared machine
   threads that wait for a core held by another process stall every parallel operation of the
   training step; one per free core keeps them off the busy ones.

A number sets that many threads, resumed or not. CPU results are bit-identical between runs of
the same thread count only."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Mapping

AUTO = "auto"
SAMPLE_SECONDS = 0.2


def _idle_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) jiffies of the CPUs `cpus` since boot (Linux /proc/stat), None elsewhere."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            idle += numbers[3] + numbers[4]
            total += sum(numbers)
    return (idle, total) if total else None


def usable_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def free_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's cores were idle over `seconds` (from /proc/stat), or, where
    that cannot be read, its core count less the 1-minute load average (never below 0)."""
    cpus = usable_cores()
    before = _idle_jiffies(cpus)
    if before is not None:
        time.sleep(seconds)
        after = _idle_jiffies(cpus)
        if after is not None and after[1] > before[1]:
            return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])
    try:
        return max(0.0, len(cpus) - os.getloadavg()[0])
    except (AttributeError, OSError):
        return float(len(cpus))


def choose(setting: str, resumed_threads: int | None, default_threads: int,
           env: Mapping[str, str] = os.environ, free=free_cores) -> tuple[int | None, str]:
    """(the thread count to set, None to leave torch's; why) for `setting` (module docstring).
    `default_threads`: torch's count before any is set; `free()`: the free cores now."""
    if str(setting) != AUTO:
        return int(setting), "set"
    if env.get("OMP_NUM_THREADS"):
        return None, f"auto: OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if resumed_threads:
        return int(resumed_threads), "auto: as the run started"
    idle = free()
    n = max(1, min(default_threads, math.floor(idle + 0.5)))
    return n, f"auto: {idle:.1f} of {len(usable_cores())} cores free"


_torch_default: int | None = None  # torch's own count, before this process set any


def apply(setting: str, resumed_threads: int | None = None) -> str:
    """Set torch's threads for `setting`; returns what the run prints ("2 threads (auto: ...)")."""
    import torch

    global _torch_default
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    n, why = choose(setting, resumed_threads, _torch_default)
    if n is not None:
        torch.set_num_threads(n)
    count = torch.get_num_threads()
    return f"{count} thread{'' if count == 1 else 's'} ({why})"
