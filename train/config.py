"""Typed config schemas. Registered in Hydra's ConfigStore as the base of `conf/config.yaml`, so a
misspelled key or a value of the wrong type fails at composition, before anything is built."""
from __future__ import annotations

from dataclasses import dataclass, field
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
