"""Stop signals: SIGTERM and SIGINT (SLURM preemption, Ctrl-C) become a flag that training checks
after each step (write a checkpoint, then exit with 128 + the signal number). No torch: the
command line installs the handler first thing, before anything slow (imports, Hydra, wandb)
starts, so a signal that arrives during start-up is kept and honoured at the first point where
the run can be continued.

The same signal again within `REPEAT_WINDOW_S` seconds of the first counts once, in every launch
mode: one SIGTERM to a process group (`kill -- -PGID`, SLURM) reaches the training process
directly and again through whatever launched it (`uv run` forwards it, torchrun forwards it to
its ranks), and Ctrl-C reaches a launcher and its children alike. Another signal, or the same
one later, stops at once."""
from __future__ import annotations

import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 3.0


class StopSignal:
    """`received` is the first stop signal's number (None until one arrives); a second signal
    raises KeyboardInterrupt (stop at once), unless it repeats the first within `window`
    seconds. As a context manager it installs the handler if nothing has yet, and then restores
    the previous handlers on exit."""

    def __init__(self, window: float = REPEAT_WINDOW_S):
        self.received: int | None = None
        self.window = window
        self._at = 0.0  # time.monotonic() when `received` arrived
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopSignal":
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None:
            if signum == self.received and now - self._at < self.window:  # the first one again, forwarded
                return
            raise KeyboardInterrupt  # a second signal: stop now
        self.received, self._at = signum, now

    def __enter__(self) -> "StopSignal":
        self._owner = not self.installed
        if self._owner:
            self.received = None
            self.install()
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            self.uninstall()


STOP = StopSignal()  # the process's one handler
