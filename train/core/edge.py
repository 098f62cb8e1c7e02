"""The edge of every command (`python -m train`, `python -m analysis` and its tools): whatever goes
wrong that the command does not report itself becomes one line, `error: ...`, naming the file
involved where there is one, and a non-zero exit: 4 when the file system failed (disk full,
quota, permissions), 1 otherwise (a fault of this project's: please report it). The traceback
is printed too with `--debug` on the command line or DEBUG_ENV=1 in the environment."""
from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "INDUCTION_TRACKER_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_BUG, EXIT_IO = 1, 4


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def take_debug_flag(argv: list[str]) -> list[str]:
    """`argv` without `--debug`; when it was there, DEBUG_ENV is set for this process."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"
    return [a for a in argv if a != DEBUG_FLAG]


def describe(e: BaseException) -> tuple[str, int]:
    """(one line, exit code) for an exception no command reported itself."""
    if isinstance(e, OSError):
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        what = e.strerror or " ".join(str(e).split()) or type(e).__name__
        return f"{what}{': ' + names if names else ''}", EXIT_IO
    if isinstance(e, MemoryError):
        return "out of memory", EXIT_BUG
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(e).__name__}{': ' + text if text else ''}", EXIT_BUG


def message(e: BaseException) -> tuple[str, int]:
    """(the one line, without `error: `, exit code) for `e`; the traceback is printed first when
    debugging."""
    if debugging():
        traceback.print_exception(e)
    line, code = describe(e)
    if code == EXIT_IO:  # the file system failed: the path says where
        return line, code
    return f"unexpected {line}{'' if debugging() else f' (the traceback: {DEBUG_FLAG} or {DEBUG_ENV}=1)'}", code


def report(e: BaseException) -> int:
    """Print `error: ` and the one line for `e`; the exit code."""
    line, code = message(e)
    print(f"error: {line}", file=sys.stderr)
    return code


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command's `main(argv)` behind the edge: `--debug` taken from argv, and any exception
    other than SystemExit reported in one line (`report`) with its exit code."""

    @functools.wraps(main)
    def guarded(argv: list[str] | None = None) -> int:
        argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - the edge: everything not reported already
            return report(e)

    return guarded
