"""The run's console lines in its Hydra log (RUN_DIR/__main__.log, the file handler of Hydra's job
logging): every line the run prints to stdout (level INFO) or stderr (WARNING), with Hydra's time
stamp, so that the log holds what the run said. A progress bar redrawn in place (carriage
returns) leaves its last state only. Where Hydra's job logging has no file (the ranks other than
0 under torchrun), nothing is written."""
from __future__ import annotations

import contextlib
import logging
import sys

LOGGER_NAME = "train"  # the name the lines carry in the log


class Tee:
    """A text stream that writes to `stream` and hands each complete line to `handlers`."""

    def __init__(self, stream, handlers: list[logging.Handler], level: int):
        self._stream, self._handlers, self._level, self._line = stream, handlers, level, ""

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._line += text
        if "\r" in self._line:
            head, _, tail = self._line.rpartition("\r")
            self._line = (head.rpartition("\n")[0] + "\n" if "\n" in head else "") + tail
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            if line.strip():
                record = logging.LogRecord(LOGGER_NAME, self._level, __file__, 0, line, None, None)
                for handler in self._handlers:
                    handler.handle(record)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def console_to_log():
    """While inside: stdout and stderr also go, line by line, to the root logger's file handlers."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(out, handlers, logging.INFO), Tee(err, handlers, logging.WARNING)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
