"""Stop signals: SIGTERM and SIGINT (SLURM preemption, Ctrl-C) become a flag that training checks
after each step (write a checkpoint, then exit with 128 + the signal number). No torch: the
command line installs the handler first thing, before anything slow (imports, Hydra, wandb)
starts, so a signal that arrives during start-up is kept and honoured at the first point where
the run can be continued."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """`received` is the first stop signal's number (None until one arrives); a second signal
    raises KeyboardInterrupt (stop at once). As a context manager it installs the handler if
    nothing has yet, and then restores the previous handlers on exit."""

    def __init__(self):
        self.received: int | None = None
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
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

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
