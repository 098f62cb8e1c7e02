"""What rank 0 does and what the other ranks wait for, from start-up to the end of a run, in the
order a run meets it (`Ranks`, one method a handover). Rank 0 is the run: it alone reads and
writes the run directory, evaluates and logs. The other ranks (train/distributed.py) train their
rows of each step, and at each handover wait until rank 0's part has ended and take what it hands
them:

1. config      rank 0 prepares the config and the run directory (train/startup.py); the others
               receive the resolved config (on resume: the run's) and the directory's name. A
               run that rank 0 refused before Hydra's job (train/cli.py RunDirCheck) joins the
               group only to tell them so (`refuse`).
2. start       every rank builds its trainer; rank 0 also finds the checkpoint to resume from and
               writes config.yaml (or says where the run resumes), and the others wait for that.
3. resume      rank 0 restores the checkpoint, opens the run's files and starts the logger; the
               others take the step and the optimizer and scheduler state (the weights come when
               the model is wrapped in DistributedDataParallel, which broadcasts rank 0's).
4. checkpoint  at each scheduled checkpoint rank 0 evaluates, writes the row and saves; the
               others wait for the outcome. Under adaptive density (`watch`) at each watched step
               rank 0 decides whether to take a checkpoint, and takes it; the others learn whether
               it did.
5. stop        after each step every rank learns of a stop signal that reached any rank; rank 0
               then writes the interrupt checkpoint and says so, and the others wait.
6. end         the ranks that know how the run ended meet at a barrier and leave the group; a
               rank that failed on its own leaves at once (torchrun stops the others).

When rank 0's part fails, the others learn of it at that handover (a fault, train/faults.py
TrainingError, as itself; anything else as PeerFailed with rank 0's exit code) and the error goes
on marked shared (distributed.shared): rank 0 reports it, the others exit with the same code and
say nothing (train/cli.py). In a single process each handover just runs rank 0's part.

No torch at import (the command line imports this before anything heavy)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from omegaconf import OmegaConf

from train.core.saved_config import typed_config
from train.distributed import SINGLE, World, agree_stop, broadcast, finish, mark_shared, shared, start, world_from_env
from train.startup import Start

T = TypeVar("T")
_OK, _FAULT, _FAILED = "ok", "fault", "failed"


class PeerFailed(Exception):
    """Rank 0 failed at a point where this rank waited for it, and has reported the error; this
    rank exits with `code` and says nothing."""

    def __init__(self, code: int):
        super().__init__(f"rank 0 failed (exit {code})")
        self.code = code


def exit_code(e: BaseException) -> int:
    """The command line's exit code for a failure of rank 0 (train/cli.py), for the others to
    exit with: 2 bad input, 3 a fault, 4 the file system, 130 a second signal, 1 a bug."""
    if isinstance(e, PeerFailed):
        return e.code
    if hasattr(e, "event"):  # train/faults.py TrainingError
        return 3
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, OSError):
        return 4
    if isinstance(e, ValueError) or type(e).__module__.startswith("omegaconf"):
        return 2
    return 1


class _Outbox:
    """What rank 0 hands the others at the end of a `_leading` block (`value`)."""

    value: Any = None


@contextlib.contextmanager
def _leading(world: World) -> Iterator[_Outbox]:
    """Rank 0's part of a handover: when the block ends the others (in `_follow`) receive the
    outbox's value; when it raises they learn of it first, and the error goes on marked shared.
    A single process just runs the block."""
    box = _Outbox()
    try:
        yield box
    except BaseException as e:
        if world.enabled:
            event = getattr(e, "event", None)
            with contextlib.suppress(Exception):  # a rank that is gone already: torchrun stops the rest
                broadcast(world, (_FAULT, str(e), event) if event is not None else (_FAILED, exit_code(e)))
            mark_shared(e)
        raise
    broadcast(world, (_OK, box.value))


def _follow(world: World) -> Any:
    """The other ranks' part of a handover: the value rank 0 handed over, or rank 0's failure
    raised here, marked shared: TrainingError(message, event) for a fault, PeerFailed with rank
    0's exit code for anything else."""
    from train.faults import TrainingError  # torch: not before the run is under way

    kind, *rest = broadcast(world, None)
    if kind == _OK:
        return rest[0]
    if kind == _FAULT:
        raise mark_shared(TrainingError(rest[0], rest[1]))
    raise mark_shared(PeerFailed(rest[0]))


def refuse(code: int, device: str, env: Any = None) -> None:
    """1, refused: rank 0 refused the run before Hydra's job started (train/cli.py RunDirCheck),
    so before the group formed: join it only to tell the others, which wait for the config, to
    exit with `code`. Nothing in a single process, or when the group cannot be formed."""
    try:
        world = world_from_env(env)
        if not world.enabled:
            return
        world = start(world, device)
        broadcast(world, (_FAILED, code))
        finish(world)
    except Exception:  # noqa: BLE001 - the refusal itself is what the user must see
        pass


class Ranks:
    """The handovers of one process of the run (module docstring), in the order a run meets them."""

    def __init__(self, world: World = SINGLE):
        self.world = world
        self.main = world.main  # rank 0

    def config(self, prepare: Callable[[], Start]) -> Start:
        """1. Rank 0: `prepare()`. The others: rank 0's config and run directory (never read
        here; no status, and they resume nothing themselves)."""
        if self.main:
            with _leading(self.world) as box:
                prepared = prepare()
                if self.world.enabled:
                    box.value = (OmegaConf.to_container(prepared.cfg, resolve=True), str(prepared.run_dir))
            return prepared
        saved, where = _follow(self.world)
        return Start(typed_config(saved), Path(where), {}, False)

    def start(self, lead: Callable[[], T], build: Callable[[], T]) -> T:
        """2. Rank 0: `lead()`. The others: `build()`, then rank 0's outcome, whatever theirs (an
        error rank 0 had too is rank 0's to report)."""
        if self.main:
            with _leading(self.world):
                return lead()
        try:
            return build()
        finally:
            _follow(self.world)

    def resume(self, lead: Callable[[], bool], state: Callable[[], Any], take: Callable[[Any], bool]) -> bool:
        """3. Rank 0: `lead()`, True when it restored a checkpoint, whose `state()` it hands on.
        The others: `take(that state)` (None when nothing was restored). Returns whether a
        checkpoint was restored."""
        if self.main:
            with _leading(self.world) as box:
                restored = lead()
                if self.world.enabled:
                    box.value = state() if restored else None
            return restored
        return take(_follow(self.world))

    def checkpoint(self, lead: Callable[[], T], done: Callable[[], T]) -> T:
        """4. Rank 0: `lead()`. The others: rank 0's outcome, then `done()`."""
        if self.main:
            with _leading(self.world):
                return lead()
        _follow(self.world)
        return done()

    def watch(self, lead: Callable[[], T | None], done: Callable[[], T]) -> T | None:
        """4, under adaptive density. Rank 0: `lead()`, which decides and takes the checkpoint it
        decided on (None: none). The others: whether it took one, and then `done()` (None when
        it took none)."""
        if self.main:
            with _leading(self.world) as box:
                result = lead()
                box.value = result is not None
            return result
        return done() if _follow(self.world) else None

    def stop(self, received: int | None, check: Callable[[], None], lead: Callable[[int], None]) -> int | None:
        """5. The stop signal that reached any rank (`received` here; distributed.agree_stop),
        None when none did. When one did: every rank `check()`s, then rank 0 runs `lead(signal)`
        and the others wait for its outcome."""
        received = agree_stop(self.world, received)
        if received is None:
            return None
        check()
        if self.main:
            with _leading(self.world):
                lead(received)
        else:
            _follow(self.world)
        return received

    def end(self, error: BaseException | None) -> None:
        """6. The end of this rank's run, which raised `error` (None: it finished). A rank that
        knows how the run ended (it finished, or exits on a stop or an error every rank knows
        of: a SystemExit whose context is shared) meets the others at a barrier and leaves the
        group (distributed.finish); a rank that failed alone (a bug) leaves at once."""
        if isinstance(error, SystemExit):
            together = error.__context__ is None or shared(error.__context__)
        else:
            together = error is None
        finish(self.world, together)
