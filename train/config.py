"""Typed config schemas. Registered in Hydra's ConfigStore as the base of `conf/config.yaml`, so a
misspelled key or a value of the wrong type fails at composition, before anything is built.

`validate(cfg)` then checks values (sizes, names, paths, index ranges) and `check_new_run_dir` /
`check_resume_dir` check where a run goes, all without importing torch, so that `python -m train`
rejects bad input with a one-line error before anything is built or written.

Note on head sizes: `model.d_model` need not equal `n_heads * d_head`. W_O maps the concatenated
head outputs (n_heads * d_head) back to d_model, so any positive combination is a valid model.
Rotary positions do need an even `d_head` (they rotate pairs of dimensions)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II


@dataclass
class ModelConfig:
    _target_: str = "train.model.AttnOnlyTransformer"
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int = 16
    positional: str = "learned"  # learned | shortformer | rotary
    layernorm: bool = True
    smeared_keys: bool = False
    init_std: float = 0.1
    rotary_base: float = 10000.0
    d_vocab: int = II("data.vocab_size")
    n_ctx: int = II("data.n_ctx")


@dataclass
class DataConfig:
    _target_: str = "train.data.build_data"
    vocab_size: int = 64  # including BOS (id 0)
    n_ctx: int = 64  # sequence length including BOS
    seed: int = 0  # seed of the language itself (the bigram chain), not of the run
    path: Optional[str] = None  # token file (.npy) or `datasets` directory instead of the generator
    p_repeat: float = 0.6
    p_uniform_segment: float = 0.5
    min_period: int = 4
    max_period: int = 20
    branching: int = 4


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_tokens: int = 200_000
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear


@dataclass
class TrainConfig:
    batch_size: int = 64
    total_tokens: int = 4_000_000
    debug_nan_at_step: Optional[int] = None  # test-only: make the loss NaN at this step


@dataclass
class ScheduleConfig:
    """Checkpoints in tokens seen: the union of log-spaced and linearly spaced points."""

    n_log: int = 70
    n_linear: int = 40
    first_tokens: int = 20_000  # first log-spaced point after step 0


@dataclass
class ProbeConfig:
    n_probes: int = 16
    period: int = 25  # Olsson: BOS + 25 random tokens x 4; scaled down when it does not fit
    repeats: int = 4
    n_copy_tokens: int = 48
    n_heldout: int = 256
    seed: int = 1234
    icl_early: Optional[int] = None  # defaults scale Olsson's 50 / 500 (of 512) with n_ctx
    icl_late: Optional[int] = None


@dataclass
class CheckpointConfig:
    save_weights: bool = True  # model.safetensors at every checkpoint (for later re-analysis)
    keep_resume_states: int = 1  # newest checkpoints that keep optimizer state for resuming


@dataclass
class LoggerConfig:
    _target_: str = "train.loggers.NullLogger"
    project: str = "induction-heads"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online if logged in, else offline) | online | offline
    heatmap_every: int = 1  # log the heads x layers heatmap image every k-th checkpoint


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    resume: Optional[str] = None  # a run directory to continue
    name: str = "induction"  # run name (wandb)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


# -- validation (no torch: runs before the heavy imports) ---------------------------------------

POSITIONAL_SCHEMES = ("learned", "shortformer", "rotary")  # as in train/model.py
LR_SCHEDULES = ("constant", "cosine", "linear")
# Files whose presence means a directory already holds a run.
RUN_MARKERS = ("status.json", "metrics.jsonl", "config.yaml", "checkpoints")


class ConfigError(ValueError):
    """A config value, path or run directory that cannot be used; the message names the key."""


def validate(cfg: Any) -> None:
    """Check the values of a composed config (types are already checked by the schema).

    Raises ConfigError with a one-line message naming the offending key."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def positive(section: str, *names: str) -> None:
        for name in names:
            value = cfg[section][name]
            need(value is not None and value > 0, f"{section}.{name} must be positive, got {value}")

    def non_negative(section: str, *names: str) -> None:
        for name in names:
            value = cfg[section][name]
            need(value is not None and value >= 0, f"{section}.{name} must be >= 0, got {value}")

    m, d, o, t, s, p = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.schedule, cfg.probes
    positive("model", "n_layers", "n_heads", "d_model", "d_head", "init_std", "rotary_base")
    need(m.positional in POSITIONAL_SCHEMES,
         f"unknown model.positional {m.positional!r}; choose one of {', '.join(POSITIONAL_SCHEMES)}")
    need(m.positional != "rotary" or m.d_head % 2 == 0,
         f"model.positional=rotary needs an even model.d_head (it rotates pairs of dimensions), got {m.d_head}")
    positive("data", "vocab_size", "n_ctx")
    need(d.vocab_size >= 8, f"data.vocab_size must be at least 8, got {d.vocab_size}")
    need(d.n_ctx >= 8, f"data.n_ctx must be at least 8, got {d.n_ctx}")
    need(m.d_vocab == d.vocab_size and m.n_ctx == d.n_ctx,
         f"model.d_vocab/n_ctx ({m.d_vocab}, {m.n_ctx}) must follow data.vocab_size/n_ctx "
         f"({d.vocab_size}, {d.n_ctx}); leave them at their defaults")
    if d.path:
        path = Path(os.path.expanduser(str(d.path)))
        need(path.exists(), f"data.path does not exist: {path}")
    else:
        need(1 <= d.min_period <= d.max_period,
             f"need 1 <= data.min_period <= data.max_period, got {d.min_period}, {d.max_period}")
        need(d.max_period < d.n_ctx - 1,
             f"data.max_period={d.max_period} leaves no repeat in a context of data.n_ctx={d.n_ctx}")
        positive("data", "branching")
        need(d.branching <= d.vocab_size - 1,
             f"data.branching={d.branching} exceeds the {d.vocab_size - 1} regular tokens")
    positive("optim", "lr")
    non_negative("optim", "weight_decay", "grad_clip", "warmup_tokens")
    need(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must lie in [0, 1), got {list(o.betas)}")
    need(o.schedule in LR_SCHEDULES, f"unknown optim.schedule {o.schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}")
    positive("train", "batch_size", "total_tokens")
    tokens_per_step = t.batch_size * d.n_ctx
    need(t.total_tokens >= tokens_per_step,
         f"train.total_tokens={t.total_tokens} is less than one batch "
         f"(train.batch_size x data.n_ctx = {tokens_per_step} tokens)")
    need(t.debug_nan_at_step is None or t.debug_nan_at_step >= 0,
         f"train.debug_nan_at_step must be >= 0, got {t.debug_nan_at_step}")
    non_negative("schedule", "n_log", "n_linear")
    positive("schedule", "first_tokens")
    positive("probes", "n_probes", "n_copy_tokens", "n_heldout")
    need(p.repeats >= 2, f"probes.repeats must be at least 2, got {p.repeats}")
    need(p.period >= 2, f"probes.period must be at least 2, got {p.period}")
    # The probe is BOS + period x repeats tokens; the period is scaled down to fit the context,
    # but never below 2 tokens.
    need(1 + 2 * p.repeats <= d.n_ctx,
         f"the probe (BOS + probes.repeats={p.repeats} copies of at least 2 tokens = {1 + 2 * p.repeats} "
         f"tokens) is longer than the context data.n_ctx={d.n_ctx}")
    last = d.n_ctx - 2  # the last position that predicts a token
    for name in ("icl_early", "icl_late"):
        value = p[name]
        need(value is None or 0 <= value <= last,
             f"probes.{name}={value} lies outside the context: positions 0..{last} predict a token "
             f"when data.n_ctx={d.n_ctx}")
    if p.icl_early is not None and p.icl_late is not None:
        need(p.icl_early < p.icl_late, f"probes.icl_early={p.icl_early} must be below probes.icl_late={p.icl_late}")
    non_negative("checkpoint", "keep_resume_states")
    dev = str(cfg.device)
    need(dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         f"unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and "every" in cb:
            need(cb.every >= 1, f"callbacks.{name}.every must be >= 1, got {cb.every}")


def read_run_status(run_dir: Path) -> dict[str, Any] | None:
    """status.json of a run directory, {} if unreadable, None if absent."""
    import json

    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def check_writable(run_dir: Path, create: bool = True) -> None:
    """Check that files can be written in `run_dir` (by writing and deleting a temporary file).
    With `create`, make the directory first; without, probe its nearest existing ancestor and
    leave the file system as it was."""
    run_dir = Path(run_dir).absolute()
    probe = run_dir
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
            if not probe.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to the output directory {run_dir}: "
                          f"{e.strerror or type(e).__name__}") from None


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may go into an empty or new directory, never over another run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the output directory {run_dir} exists and is not a directory")
    present = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if present:
        state = (read_run_status(run_dir) or {}).get("state", "unknown state")
        raise ConfigError(f"{run_dir} already holds a run ({state}; has {', '.join(present)}); "
                          f"choose another directory, or continue it with resume={run_dir}")
    check_writable(run_dir, create=False)


def check_resume_dir(run_dir: Path) -> dict[str, Any]:
    """A run that can be resumed: a directory with its config and an unfinished status."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"resume: no run directory at {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume: {run_dir} has no config.yaml, so it is not a run directory")
    status = read_run_status(run_dir) or {}
    if status.get("state") == "finished":
        raise ConfigError(f"resume: the run in {run_dir} already finished (step {status.get('step')}); "
                          f"nothing to do")
    check_writable(run_dir, create=False)
    return status
