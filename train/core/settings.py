"""Range checks of numeric settings outside the config schema's own values: each callback's
arguments (train/core/callbacks.py; train/core/scoring.py names the callback in the message) and
the detection parameters given with `--set` (analysis/stages.py). One helper, one message form.
The config's values are checked by train/core/config.py validate."""
from __future__ import annotations

import math
from typing import Any


def check(name: str, value: Any, low: float | None = None, high: float | None = None, *, integer: bool = False,
          above: bool = False, none: bool = False) -> None:
    """ValueError `NAME must be ..., got VALUE` unless `value` is a finite number (an integer when
    `integer`; never a bool) within [low, high] (above `low` when `above`); None passes when
    `none`."""
    if value is None and none:
        return
    kind = "an integer" if integer else "a finite number"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (isinstance(value, int) if integer else math.isfinite(value))
    if ok and low is not None:
        ok = value > low if above else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = [f"{'>' if above else '>='} {low:g}"] if low is not None else []
        bounds += [f"<= {high:g}"] if high is not None else []
        raise ValueError(f"{name} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}"
                         f"{' (or null)' if none else ''}, got {value!r}")
