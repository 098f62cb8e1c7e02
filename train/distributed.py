"""Training in several processes through PyTorch's launcher: `torchrun --nproc_per_node=N -m train`
(also under SLURM, `srun ... torchrun`), with DistributedDataParallel: NCCL on CUDA (rank r on
cuda:LOCAL_RANK), gloo on the CPU.

A process belongs to a group when the launcher's environment says WORLD_SIZE > 1 (with RANK and
LOCAL_RANK). Rank 0 is the run: it checks the config and the run directory, reads a resumed
checkpoint, evaluates the callbacks and writes every file and log. The other ranks compute their
share of each step's gradient and nothing else, and never read or write the run directory. What
they wait for and receive from rank 0, from start-up to the end, is train/ranks.py; this module
holds the process group and its collectives.

No torch at import: the command line reads the environment before anything heavy is imported."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
from typing import Any

from train.core.config import ConfigError

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# How long a rank waits in a collective: the others wait there while rank 0 evaluates a
# checkpoint, or starts wandb, which may take long.
TIMEOUT_MIN = 60


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes: `size` processes, this one `rank`
    (0 is the run) on its node's `local_rank`; `device` is set by `start`."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process: a process group and DistributedDataParallel."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates, writes the run directory and logs."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a step's global batch of `batch_size` sequences: the r-th of
        `size` equal consecutive blocks. Every rank draws the whole batch (the data's
        `batch(step, batch_size)` is a function of its seed and the step alone) and trains these
        rows, so the ranks together see exactly the data of one process, and DDP's average of
        their gradients is the mean gradient of the global batch. ConfigError when the batch
        does not split evenly."""
        if batch_size % self.size:
            raise ConfigError(f"train.batch_size={batch_size} does not split over {self.size} processes "
                              f"(WORLD_SIZE); use a multiple of {self.size}")
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


SINGLE = World()


def world_from_env(env: Any = None) -> World:
    """The launcher's WORLD_SIZE, RANK and LOCAL_RANK (torchrun sets all three); a single process
    (SINGLE) when WORLD_SIZE is unset or 1. ConfigError when they are not integers in range."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") in (None, "", "1"):
        return SINGLE
    try:
        size, rank, local = (int(env.get(k, "0")) for k in ENV_KEYS)
    except ValueError:
        values = ", ".join(f"{k}={env.get(k)!r}" for k in ENV_KEYS)
        raise ConfigError(f"the launcher's {values} are not integers") from None
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise ConfigError(f"the launcher's WORLD_SIZE={size}, RANK={rank} do not fit (need 0 <= RANK < WORLD_SIZE)")
    return World(rank=rank, local_rank=local, size=size)


def env_world_size(env: Any = None) -> int:
    """WORLD_SIZE of the launcher's environment (1 when unset or unreadable); no checks."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def env_rank(env: Any = None) -> int:
    """RANK of this process among several (0 when single or unreadable); no checks."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK") or 0) if env_world_size(env) > 1 else 0
    except ValueError:
        return 0


# -- the process group ------------------------------------------------------------------------------
def start(world: World, device: str) -> World:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return `world` with this
    rank's device: cuda:LOCAL_RANK for device=auto (when CUDA is there) or cuda, the CPU for
    device=cpu (or auto without CUDA). ConfigError for a device one process cannot share out."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda:") or device == "mps":
        raise ConfigError(f"device={device} names one device; with {world.size} processes each rank uses "
                          f"cuda:LOCAL_RANK: use device=cuda, auto or cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world.local_rank + 1))
        if max(local_size, world.local_rank + 1) > count:
            raise ConfigError(f"{max(local_size, world.local_rank + 1)} processes per node need as many CUDA "
                              f"devices, this node has {count}; start fewer (--nproc_per_node) or use device=cpu")
        torch.cuda.set_device(world.local_rank)
        here = f"cuda:{world.local_rank}"
    else:
        here = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=TIMEOUT_MIN),
                                device_id=torch.device(here) if cuda else None)
    return dataclasses.replace(world, device=here)


def finish(world: World, together: bool = True) -> None:
    """The end of a run with several processes. `together`: every rank ends knowing how the run
    ended; they meet at a barrier first, so that none exits (which makes torchrun stop the
    others) before rank 0 has written and said its last word, and then leave the group; from
    then on stop signals are ignored (torchrun's, to a rank that is exiting anyway, would
    otherwise replace its exit code). A rank that fails on its own leaves without waiting (the
    others are torchrun's to stop)."""
    if not world.enabled:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if together:
        with contextlib.suppress(Exception):  # a rank that died already: torchrun reports it
            dist.barrier()
        dist.destroy_process_group()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, signal.SIG_IGN)


def broadcast(world: World, obj: Any = None) -> Any:
    """Rank 0's `obj` (any picklable object; tensors in it should be on the CPU) on every rank;
    `obj` itself in a single process."""
    if not world.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_stop(world: World, received: int | None) -> int | None:
    """The stop signal of any rank (SIGTERM before SIGINT), the same on every rank; `received`
    itself in a single process. One small all-reduce: call it at the same point on every rank."""
    if not world.enabled:
        return received
    import torch
    import torch.distributed as dist

    flags = torch.tensor([received == signal.SIGTERM, received == signal.SIGINT], dtype=torch.float32,
                         device=world.device)
    dist.all_reduce(flags)
    term, interrupt = flags.tolist()
    return signal.SIGTERM if term else signal.SIGINT if interrupt else None


def mean_over_ranks(world: World, value):
    """The mean of a scalar tensor over the ranks (the global batch's mean loss from the ranks'
    shares of equal size): a non-finite value on any rank makes it non-finite on every rank."""
    if not world.enabled:
        return value
    import torch.distributed as dist

    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total / world.size


# -- failures every rank knows of ----------------------------------------------------------------
def shared(e: BaseException) -> bool:
    """True when every rank knows of the failure `e` (it came through a handover of
    train/ranks.py, or from a value all ranks computed together), so that they may still meet at
    a barrier."""
    return bool(getattr(e, "peers_told", False))


def mark_shared(e: BaseException) -> BaseException:
    e.peers_told = True
    return e
