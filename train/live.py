"""Live phase-change detection: the detector of `python -m analysis` (train/core/phase.py
`detect_run`) run during training on the checkpoint rows kept in
memory, every `every`-th checkpoint and once more at the end of the run.

The first time it finds a phase change the run says so (console, and the logger: run summary and
an alert), with the window in tokens; the final detection on all rows goes to the run summary.
It reads rows only, on the CPU: metrics.jsonl and training are unchanged."""
from __future__ import annotations

from typing import Any

from train.core import names as N

def detect(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The analysis result (train/core/phase.py `detect_run`) for checkpoint rows, or None when
    they have neither held-out loss nor ICL score."""
    from train.core.phase import detect_run
    from train.core.runs import Run

    run = Run(rows=rows)  # the run reader on rows held in memory
    if not (run.has(N.LOSS_HELDOUT) or run.has(N.ICL_SCORE)):
        return None
    return detect_run(run)


def summary(result: dict[str, Any], detected_at: int | None) -> dict[str, Any]:
    """Run-summary entries of a detection: phase_change/{detected, start_tokens, steepest_tokens,
    end_tokens, induction_heads, message, detected_at_tokens}."""
    out: dict[str, Any] = {"detected": bool(result["phase_change"]), "message": result["message"],
                           "induction_heads": ",".join(result["induction_heads"])}
    for key, value in (result.get("window") or {}).items():
        out[key] = value
    if detected_at is not None:
        out["detected_at_tokens"] = detected_at
    return {N.phase_change_key(k): v for k, v in out.items()}


class LiveDetection:
    """Rows so far, and the announcement of the phase change to `say` (a console line) and the
    logger (`phase_change(summary, alert)`, train/loggers.py)."""

    def __init__(self, every: int, logger, say=print, rows: list[dict[str, Any]] = ()):
        self.every, self.logger, self.say = every, logger, say
        self.rows = [r for r in rows if N.EVENT not in r]
        self.detected_at: int | None = None  # tokens at the checkpoint where it was first found
        self._new = 0

    def update(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Add a checkpoint row; on every `every`-th one run the detector. The first time it finds
        a phase change, announce it and return the result; else None."""
        self.rows.append(row)
        self._new += 1
        if self.every <= 0 or self.detected_at is not None or self._new % self.every:
            return None
        result = detect(self.rows)
        if result is None or not result["phase_change"]:
            return None
        self.detected_at = int(row.get(N.TOKENS, 0))
        line = announcement(result, self.detected_at)
        self.say(line)
        self.logger.phase_change(summary(result, self.detected_at), alert=line)
        return result

    def finish(self) -> dict[str, Any] | None:
        """The detector on all rows, into the logger's run summary (None when switched off or
        not analysable)."""
        if self.every <= 0:
            return None
        result = detect(self.rows)
        if result is not None:
            self.logger.phase_change(summary(result, self.detected_at))
        return result


def announcement(result: dict[str, Any], tokens: int) -> str:
    """The console line of a live detection."""
    return f"phase change detected at {tokens:,} tokens: {result['message']}"
