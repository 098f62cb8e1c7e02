"""Which device a run, a re-analysis or a benchmark computes on: the one place that reads a device
name (config key `device`, the `--device` options) and checks that the device is there.

    auto    CUDA when there is a GPU, else Apple's MPS, else the CPU
    cpu | cuda | cuda:N | mps    that device; ValueError (one line) when it is not available

Several processes (train/distributed.py) take cuda:LOCAL_RANK instead; a sweep job with
device=auto one GPU of several (train/sweep.py)."""
from __future__ import annotations

import torch


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def cuda_count() -> int:
    """The number of CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(name: str) -> torch.device:
    """The device named (module docstring); ValueError when it is not available or not a device name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} was asked for, but no CUDA device is available")
        index, count = name.partition(":")[2] or "0", cuda_count()
        if not index.isdigit():
            raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
        if int(index) >= count:
            raise ValueError(f"device={name} was asked for, but there {'is' if count == 1 else 'are'} only "
                             f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    elif name == "mps" and not mps_available():
        raise ValueError("device=mps was asked for, but MPS is not available")
    elif name not in ("cpu", "mps"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def autocast(device: torch.device):
    """The training step's precision: bf16 autocast on CUDA, full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
