"""Live phase-change detection: the detector of `python -m analysis` (train/core/phase.py
`detect_run`) run during training on the checkpoint rows kept in memory, every `every`-th
checkpoint and once more at the end of the run.

Everything it finds is provisional: the window of rows so far (a resumed run's first check comes
at its first checkpoint after resuming). The first time it finds a phase change the run says so
(console, and the logger: run summary and an alert), marked provisional; the detection on all
rows at the end goes to the run summary, still marked provisional. `python -m analysis` computes
the run's one final window and writes it over these (analysis/report.py). It reads rows only, on
the CPU: metrics.jsonl and training are unchanged."""
from __future__ import annotations

from typing import Any

from train.core import names as N
from train.core.phase import fmt_tokens, summary_entries


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
    """Run-summary entries of a detection during training (train/core/phase.py `summary_entries`,
    provisional), and phase_change/detected_at_tokens when it was first found live."""
    out = summary_entries(result, provisional=True)
    if detected_at is not None:
        out[N.phase_change_key("detected_at_tokens")] = detected_at
    return out


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
    """The console line of a live detection: provisional, on the rows up to `tokens`."""
    return (f"live detection (provisional, on the checkpoints up to {fmt_tokens(tokens)} tokens; "
            f"`python -m analysis RUN_DIR` gives the final window): {result['message']}")
