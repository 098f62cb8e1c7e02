"""The two schedules of a run, both in optimizer steps:

* the checkpoint schedule (`checkpoint_steps`): when the run evaluates its callbacks and saves a
  checkpoint: log-spaced points in tokens seen (resolving the early, fast-changing part of
  training) united with linearly spaced ones (resolving the rest); config section `checkpoint`.
  With `checkpoint.adaptive.enabled` the same rule with fewer points is the base schedule, and
  `DensityWatch` adds checkpoints where the model changes (adaptive checkpoint density);
* the learning-rate schedule (`lr_multiplier`): linear warmup, then constant, cosine or linear
  decay; config keys `optim.warmup_tokens`, `optim.lr_schedule`, `optim.min_lr_ratio`.

Callbacks with `every: k` run at every k-th checkpoint of the run, counted in the order the
checkpoints were taken (train/core/scoring.py Callback.due): on the fixed schedule the k-th point
of the schedule, under adaptive density the k-th checkpoint taken, base and zoomed alike
(`run_schedule` gives a finished run's checkpoint steps either way).

No torch and no numpy at import: the config schema (train/core/config.py) imports this."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional


def checkpoint_steps(total_steps: int, tokens_per_step: int, n_log: int, n_linear: int, first_tokens: int) -> list[int]:
    """Sorted unique steps in [0, total_steps] at which to evaluate and checkpoint.

    Always includes step 0 (the initialisation) and the final step."""
    if total_steps <= 0:
        raise ValueError(f"training needs at least one step, got total_steps={total_steps}")
    import numpy as np

    total_tokens = total_steps * tokens_per_step
    points = [0.0, float(total_tokens)]
    if n_log > 0:
        start = min(max(first_tokens, tokens_per_step), total_tokens)
        points += list(np.geomspace(start, total_tokens, n_log))
    if n_linear > 0:
        points += list(np.linspace(0, total_tokens, n_linear + 1))
    steps = {min(total_steps, int(round(p / tokens_per_step))) for p in points}
    return sorted(steps)


def run_steps(cfg) -> tuple[int, int, list[int]]:
    """(tokens per step, total steps, checkpoint steps) of a run's config; under adaptive density
    the checkpoint steps are the base schedule's, whose n_log and n_linear are the smaller of
    `checkpoint.adaptive`'s and `checkpoint`'s (the run adds its own: `run_schedule`)."""
    tokens_per_step = cfg.train.batch_size * cfg.data.n_ctx
    total_steps = cfg.train.total_tokens // tokens_per_step
    c = cfg.checkpoint
    n_log, n_linear = (min(c.n_log, c.adaptive.n_log), min(c.n_linear, c.adaptive.n_linear)) if adaptive(cfg) \
        else (c.n_log, c.n_linear)
    return tokens_per_step, total_steps, checkpoint_steps(total_steps, tokens_per_step, n_log, n_linear, c.first_tokens)


def adaptive(cfg) -> bool:
    """Whether a run's config asks for adaptive checkpoint density."""
    a = cfg.checkpoint.get("adaptive")
    return bool(a is not None and a.enabled)


def run_schedule(cfg, logged_steps: list[int]) -> list[int]:
    """A run's checkpoint steps: the fixed schedule of its config, or under adaptive density the
    steps of its checkpoint rows (`logged_steps`, from metrics.jsonl)."""
    return sorted(set(logged_steps)) if adaptive(cfg) else run_steps(cfg)[2]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, lr_schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant, cosine or linear decay to `min_ratio` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if lr_schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if lr_schedule == "linear":
        return 1.0 - (1 - min_ratio) * min(1.0, progress)
    raise ValueError(f"unknown optim.lr_schedule {lr_schedule!r}")


# -- adaptive checkpoint density --------------------------------------------------------------------
# Why a checkpoint was taken (train/core/names.py CHECKPOINT_REASON): the base schedule; the watch
# moved (zoom); before the first zoom of a stretch, from weights kept in memory (lead-in); after a
# zoom, the gaps growing back to the base schedule's (tail).
BASE, ZOOM, LEAD_IN, TAIL = "base", "zoom", "lead-in", "tail"
MIN_INCREMENTS = 4  # watch-to-watch increments the noise needs before any zoom


@dataclass
class AdaptiveConfig:
    """Adaptive checkpoint density (config `checkpoint.adaptive`, conf/checkpoint/; `DensityWatch`
    defines each key)."""

    enabled: bool = False
    n_log: int = 10  # the base schedule (at most checkpoint.n_log / n_linear; with checkpoint.first_tokens)
    n_linear: int = 4
    watch_every: int = 2  # steps, at least
    watch_gap: float = 0.005  # relative: the watch interval doubles while it is below this share of the steps so far
    watch_probes: int = 4  # the first of the main repeated-token probes
    noise_window: int = 16  # watches
    noise_multiple: float = 3.0
    min_change: float = 0.02  # prefix matching
    min_gap: float = 0.02  # relative: 0.02 = 2% more tokens than at the last checkpoint
    growth: float = 1.5  # around zoomed checkpoints the gaps (in ln tokens) grow by at most this factor
    lead_in: int = 4  # checkpoints before the first zoom of a stretch, from kept weights
    tail_gap: float = 0.08  # ln tokens: the tail's largest gap ...
    tail_span: float = 0.5  # ... over this many ln tokens after a stretch's last zoom
    loss_change: Optional[float] = None  # nats; null: the training loss is no trigger


def adaptive_problem(a: Any, n_probes: int) -> str | None:
    """What is wrong with the values of an enabled `checkpoint.adaptive` (None: nothing)."""
    if a is None or not a.enabled:
        return None
    bad = [f"{k}={a[k]}" for k in ("n_log", "n_linear", "min_change", "min_gap", "watch_gap", "lead_in", "tail_span")
           if not 0 <= a[k] < math.inf]
    bad += [f"tail_gap={a.tail_gap}"] * (not 0 < a.tail_gap < math.inf)
    bad += [f"{k}={a[k]}" for k in ("watch_every", "watch_probes") if a[k] < 1]
    bad += [f"noise_window={a.noise_window}"] * (a.noise_window < MIN_INCREMENTS)
    bad += [f"{k}={a[k]}" for k in ("noise_multiple", "loss_change") if a[k] is not None and not 0 < a[k] < math.inf]
    bad += [f"growth={a.growth}"] * (not 1 < a.growth < math.inf)
    if bad:
        return (f"checkpoint.adaptive: {', '.join(bad)} out of range (n_log, n_linear, min_change, min_gap, watch_gap, "
                f"lead_in, tail_span >= 0; watch_every, watch_probes >= 1; noise_window >= {MIN_INCREMENTS}; "
                f"noise_multiple, loss_change, tail_gap > 0; growth > 1)")
    if a.watch_probes > n_probes:
        return f"checkpoint.adaptive.watch_probes={a.watch_probes} exceeds probes.n_probes={n_probes}"
    return None


@dataclass
class Decision:
    """A checkpoint at `step` and why (`reason`: BASE, ZOOM, LEAD_IN or TAIL), with the watch
    behind it: the watched value (`channel`) that moved most for its threshold, its change since
    the previous checkpoint, and that threshold (None while the noise is not measured yet)."""

    step: int
    reason: str
    channel: str | None = None
    change: float | None = None
    threshold: float | None = None


class DensityWatch:
    """The decisions of adaptive checkpoint density: a pure function of the watched steps and values.

    At every step that is a multiple of the watch interval (`interval`: `watch_every` steps,
    doubled as long as it stays within `watch_gap` times the step, so that a long run is watched
    about evenly in ln tokens), and at every step of the base schedule, the run hands `decide` its
    watched values: {channel: value} (the trainer's: each head's prefix-matching score on the
    first `watch_probes` main probes, and with `loss_change` set the mean training loss since the
    previous watch). Gaps are measured in x = ln(tokens), the analysis's axis. A checkpoint is
    taken

    * at every step of the base schedule (`base_steps`: step 0, the last step, `n_log` log-spaced
      and `n_linear` linear points): the largest gaps;
    * ZOOM at a watch where some channel c has moved since the last checkpoint by more than
      threshold_c = max(floor_c, noise_multiple x noise_c x sqrt(m)), m = watches since that
      checkpoint (>= 1), and the tokens have grown by at least `min_gap` (relative) since it.
      floor_c is `min_change` for a head and `loss_change` for the loss (a channel whose floor is
      None is watched and never a trigger). noise_c = 1.4826 x the median absolute deviation of
      c's watch-to-watch increments from their median over the last `noise_window` regular
      watches (the median increment is the trend, so a steady rise is not counted as noise;
      sqrt(m): on a flat stretch the value wanders like a random walk). No zoom before
      MIN_INCREMENTS increments exist;
    * LEAD_IN, with the first zoom of a stretch (the last checkpoint was no zoom or tail): up to
      `lead_in` checkpoints at earlier watched steps, nearest to x_zoom - u g, x_zoom - u (g + g^2),
      ... (u = 2 ln(1 + min_gap), about the zoom's own spacing; g = `growth`), among the steps
      `kept` at least `min_gap` from each other and from the checkpoints around them. Kept (the
      trainer keeps their weights): the watched steps since the last checkpoint that are the first
      in their bin of width ln(1 + min_gap) in x, back to the farthest lead-in target;
    * TAIL after the zoomed stretch's last zoom z (a zoom right after a tail checkpoint is the
      watch catching the rise's slow end and does not start a new stretch), whose gap to the
      checkpoint before it is u: at x_z + d_1 + ... + d_k, k = 1, 2, ..., the gaps growing from u
      by g (d_k = u g^k), but no wider than `tail_gap` while the checkpoint before lies less than
      `tail_span` past x_z (in ln tokens, whatever checkpoints came between), and growing by g
      again from there (and at least d_k after the last checkpoint, where a base checkpoint or a
      zoom came between), until a gap exceeds the base schedule's log spacing (ln(last base step
      / first) / (n_log - 1)): the spacing grows back to the base schedule's gradually, each at
      least `min_gap` after the last checkpoint and before the next base one.
      The cap keeps the detector's smoothing kernel (bandwidth 0.12 in ln tokens, which needs
      4 checkpoints within it) from widening where heads settle slowly after a rise: a widened
      kernel there reaches into later drift and puts the window's end late.

    Values at base steps between regular watches set the reference but not the noise history.
    The state (`state_dict`) is plain numbers, saved with every resumable checkpoint."""

    def __init__(self, settings: Any, base_steps: list[int], tokens_per_step: int, floors: dict[str, float | None]):
        self.s, self.base, self.tokens_per_step = settings, set(base_steps), tokens_per_step
        positive = sorted(b for b in base_steps if b > 0)
        # the log-spaced part's spacing in ln tokens: where the tail ends
        self.base_spacing = (_ln_gap(positive[0], positive[-1]) / max(1, settings.n_log - 1)) if positive else 0.0
        self.channels, self.floors = list(floors), [floors[c] for c in floors]
        self.history: list[list[float]] = []  # the last noise_window + 1 regular watches
        self.reference: list[float] | None = None  # the values at the last checkpoint
        self.taken: list[int] = []  # every checkpoint's step, in order
        self.reasons: list[str] = []  # and why it was taken
        self.kept: list[int] = []  # watched steps since the last checkpoint whose weights are kept, newest first

    @property
    def last(self) -> int | None:
        return self.taken[-1] if self.taken else None

    def due(self, step: int) -> bool:
        """Whether `step` is watched."""
        return step % self.interval(step) == 0 or step in self.base

    def interval(self, step: int) -> int:
        """The watch interval at `step` (class docstring): a pure function of the step."""
        k = self.s.watch_every
        while 2 * k <= step * self.s.watch_gap:
            k *= 2
        return k

    def noise(self) -> list[float] | None:
        """noise_c of every channel (class docstring); None before MIN_INCREMENTS increments."""
        if len(self.history) <= MIN_INCREMENTS:
            return None
        out = []
        for c in range(len(self.channels)):
            inc = [b[c] - a[c] for a, b in zip(self.history, self.history[1:])]
            trend = statistics.median(inc)
            out.append(1.4826 * statistics.median(abs(d - trend) for d in inc))
        return out

    def decide(self, step: int, values: dict[str, float]) -> list[Decision]:
        """The checkpoints decided at watched `step` with these values, oldest first (lead-ins
        are at earlier kept steps; none: no checkpoint), and the watch state moved on."""
        row = [float(values[c]) for c in self.channels]
        decisions = self._judge(step, row)
        if step % self.interval(step) == 0:
            self.history = (self.history + [row])[-(self.s.noise_window + 1):]
        if decisions:
            self.reference, self.kept = row, []
            self.taken += [d.step for d in decisions]
            self.reasons += [d.reason for d in decisions]
        else:
            self.kept = self._keep(step)
        return decisions

    def _keep(self, step: int) -> list[int]:
        """The kept steps after watching `step` (class docstring), newest first."""
        if self.s.lead_in <= 0:
            return []
        bin_width = math.log1p(self.s.min_gap) or 1e-3
        kept = list(self.kept)
        previous = max(step - self.interval(step), 1)
        if step > 0 and int(math.log(step) / bin_width) != int(math.log(previous) / bin_width):
            kept.insert(0, step)
        reach = self._lead_distance(int(self.s.lead_in)) + bin_width
        return [k for k in kept if _ln_gap(k, step) <= reach]

    def _lead_distance(self, k: int) -> float:
        """How far (in ln tokens) before a first zoom the k-th lead-in checkpoint aims:
        u (g + ... + g^k), u = 2 ln(1 + min_gap)."""
        return 2 * math.log1p(self.s.min_gap) * sum(self.s.growth ** j for j in range(1, k + 1))

    def _judge(self, step: int, row: list[float]) -> list[Decision]:
        channel, change, threshold = self._moves(step, row)
        if step in self.base or self.reference is None:
            return [Decision(step, BASE, channel, change, threshold)]
        gap = (step - self.last) / max(self.last, 1)  # tokens grow in proportion to steps
        if threshold is not None and abs(change) > threshold and gap >= self.s.min_gap:
            lead = [] if self.reasons[-1] in (ZOOM, TAIL) else [Decision(k, LEAD_IN) for k in self._lead_in(step)]
            return [*lead, Decision(step, ZOOM, channel, change, threshold)]
        tail = self._tail()
        if tail is not None and math.log(step) >= tail and gap >= self.s.min_gap and not self._base_within(step):
            return [Decision(step, TAIL, channel, change, threshold)]
        return []

    def _base_within(self, step: int) -> bool:
        """Whether a base checkpoint follows `step` within `min_gap` (it serves as the tail's)."""
        return any(b > step and (b - step) / step < self.s.min_gap for b in self.base)

    def _tail(self) -> float | None:
        """ln(step) of the next tail checkpoint (None: none due): after the zoomed stretch's last
        zoom z (one right after a tail checkpoint does not count), whose gap to the checkpoint
        before it is d_0 = u (in ln tokens), the k-th tail point lies at x_z + d_1 + ... + d_k, or
        d_k after the last checkpoint if that is later (a base checkpoint or a zoom came between),
        k = tail checkpoints since z + 1, d_j = g d_(j-1), capped at `tail_gap` while the
        checkpoint before the j-th tail point (for j = k: the last one) lies less than
        `tail_span` past x_z, until d_k exceeds the base schedule's log spacing."""
        r = self.reasons
        stretch = [i for i in range(1, len(r)) if r[i] == ZOOM and r[i - 1] != TAIL]
        if not stretch:
            return None
        z = stretch[-1]
        x_z, u = math.log(max(self.taken[z], 1)), _ln_gap(self.taken[z - 1], self.taken[z])
        # the checkpoint before each tail checkpoint since z, and before the next one: the last
        before = [self.taken[i - 1] for i in range(z + 1, len(r)) if r[i] == TAIL] + [self.taken[-1]]
        x, gap = 0.0, u
        for b in before:
            gap *= self.s.growth
            if math.log(max(b, 1)) - x_z < self.s.tail_span:
                gap = min(gap, self.s.tail_gap)
            x += gap
        if gap > self.base_spacing:
            return None
        return max(x_z + x, math.log(max(self.taken[-1], 1)) + gap)

    def _lead_in(self, step: int) -> list[int]:
        """Kept steps for the lead-in checkpoints (class docstring), oldest first."""
        chosen: list[int] = []
        newer = step
        for k in range(1, int(self.s.lead_in) + 1):
            target = math.log(step) - self._lead_distance(k)
            options = [c for c in self.kept if _ln_gap(c, newer) >= math.log1p(self.s.min_gap)
                       and _ln_gap(self.last, c) >= math.log1p(self.s.min_gap)]
            if not options:
                break
            newer = min(options, key=lambda c: abs(math.log(c) - target))
            chosen.append(newer)
        return sorted(chosen)

    def _moves(self, step: int, row: list[float]) -> tuple[str | None, float | None, float | None]:
        """(channel, change, threshold) of the triggering channel that moved most for its
        threshold (threshold None: noise not measured yet; then the largest change of a trigger)."""
        if self.reference is None:
            return None, None, None
        noise = self.noise()
        m = max(1, (step - self.last) // self.interval(step))
        best: tuple[float, int, float | None] | None = None
        for c, floor in enumerate(self.floors):
            if floor is None:
                continue
            change = row[c] - self.reference[c]
            threshold = None if noise is None else max(floor, self.s.noise_multiple * noise[c] * math.sqrt(m))
            score = abs(change) / threshold if threshold else abs(change)
            if best is None or score > best[0]:
                best = (score, c, threshold)
        if best is None:
            return None, None, None
        _, c, threshold = best
        return self.channels[c], row[c] - self.reference[c], threshold

    def state_dict(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "history": [list(r) for r in self.history],
                "reference": self.reference, "taken": list(self.taken), "reasons": list(self.reasons),
                "kept": list(self.kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["channels"]) != self.channels:
            raise ValueError(f"the watch of this checkpoint has channels {state['channels']}, this run {self.channels}")
        self.history = [[float(v) for v in r] for r in state["history"]]
        self.reference = None if state["reference"] is None else [float(v) for v in state["reference"]]
        self.taken, self.reasons = [int(t) for t in state["taken"]], [str(r) for r in state["reasons"]]
        self.kept = [int(k) for k in state["kept"]]


def _ln_gap(a: int, b: int) -> float:
    """ln(b / a) for steps a < b (step 0 counts as step 1: its tokens are 0)."""
    return math.log(max(b, 1)) - math.log(max(a, 1))

