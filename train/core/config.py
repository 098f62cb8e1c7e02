"""Typed config schemas. Registered in Hydra's ConfigStore as the base of `conf/config.yaml`, so a
misspelled key or a value of the wrong type fails at composition, before anything is built.

`validate(cfg)` then checks values (sizes, names, paths, index ranges) without importing torch,
so that `python -m train` rejects bad input with a one-line error before anything is built or
written. This module owns the defaults (the YAML files in conf/ mirror them; a test keeps the two
equal) and the allowed values of every named choice. Where a run goes is checked by train/core/rundir.py;
configs saved by runs are read, and plain configs typed (`typed_config`), by train/core/saved_config.py.

Note on head sizes: `model.d_model` need not equal `n_heads * d_head`. W_O maps the concatenated
head outputs (n_heads * d_head) back to d_model, so any positive combination is a valid model.
Rotary positions do need an even `d_head` (they rotate pairs of dimensions)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

from train.core.schedules import AdaptiveConfig, adaptive_problem


@dataclass
class ModelConfig:
    _target_: str = "train.core.model.AttnOnlyTransformer"
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_head: int = 16
    positional: str = "learned"  # one of POSITIONAL_SCHEMES
    layernorm: bool = True
    smeared_keys: bool = False
    init_std: float = 0.1
    rotary_base: float = 10000.0
    d_vocab: int = II("data.vocab_size")
    n_ctx: int = II("data.n_ctx")


@dataclass
class RepeatConfig:
    """The repetition knob (train/core/data.py Repetition), for any data source."""

    p: float = 0.0  # share of training sequences that repeat a span of their own text
    min_span: int = 4
    max_span: int = 20
    form: str = "tile"  # one of REPEAT_FORMS


@dataclass
class DataConfig:
    """The keys every data source has. `data=OPTION` picks the source (DATA_OPTIONS), each its own
    schema below and its own builder (`_target_`, train/core/data.py)."""

    _target_: str = MISSING
    vocab_size: int = 64  # including BOS (id 0)
    n_ctx: int = 64  # sequence length including BOS
    seed: int = 0  # seed of the data (the bigram chain, window draws), not of the run
    repeat: RepeatConfig = field(default_factory=RepeatConfig)


@dataclass
class RepeatsDataConfig(DataConfig):
    """`data=repeats` (the default): the embedded language (train/core/data.py RepeatsLanguage)."""

    _target_: str = "train.core.data.build_repeats"
    p_repeat: float = 0.6
    p_uniform_segment: float = 0.5
    min_period: int = 4
    max_period: int = 20
    branching: int = 4
    reserved_tokens: int = 0  # the last N regular ids never appear in a repeated segment (data.py)


@dataclass
class TokensDataConfig(DataConfig):
    """`data=tokens`: token ids from disk (train/core/data.py token_file)."""

    _target_: str = "train.core.data.build_tokens"
    path: Optional[str] = None  # required: a .npy token file or a `datasets` directory


@dataclass
class TextDataConfig(DataConfig):
    """`data=text`: natural text, tokenized once into cached shards (train/core/text.py)."""

    _target_: str = "train.core.data.build_text"
    vocab_size: int = 4096  # at least the tokenizer's size
    n_ctx: int = 128
    source: Optional[str] = None  # required: a local file, directory or glob, or a hub dataset name
    source_config: Optional[str] = None  # hub dataset config name
    split: str = "train"  # hub dataset split
    text_column: str = "text"
    streaming: bool = False  # stream a hub dataset instead of downloading it whole
    max_documents: Optional[int] = None  # use only the first N documents
    tokenizer: str = "bpe"  # bpe (trained here, data.vocab_size tokens) or a transformers tokenizer
    tokenizer_documents: int = 100_000  # documents the BPE is trained on
    heldout_every: int = 20  # every N-th document is held out
    cache_dir: str = "~/.cache/induction-tracker/tokens"


# `data=OPTION` (conf/data/OPTION.yaml) -> its schema; a builder (`data._target_`) -> its option's schema
DATA_OPTIONS = {"repeats": RepeatsDataConfig, "tokens": TokensDataConfig, "text": TextDataConfig}
DATA_SCHEMAS = {schema._target_: schema for schema in DATA_OPTIONS.values()}


def data_option(target: Any, default: Any = None) -> Any:
    """The `data=OPTION` name whose schema has this `_target_` (`default` when none has)."""
    return next((o for o, schema in DATA_OPTIONS.items() if schema._target_ == target), default)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_tokens: int = 200_000
    lr_schedule: str = "constant"  # one of LR_SCHEDULES (after warmup)
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear


@dataclass
class TrainConfig:
    batch_size: int = 64
    total_tokens: int = 4_000_000
    # Divergence guard: stop (exit 3) when the held-out loss exceeds ln(vocab_size) + margin, the
    # loss of a uniform prediction plus `divergence_margin` nats, at `divergence_checkpoints`
    # consecutive checkpoints (0: never stop).
    divergence_margin: float = 1.0
    divergence_checkpoints: int = 3
    # Run the training step's forward pass and loss through torch.compile (the first steps then
    # take longer while it compiles; results agree with an uncompiled run to float rounding).
    compile: bool = False


@dataclass
class CheckpointConfig:
    """When to evaluate and save (in tokens seen: the union of log-spaced and linearly spaced
    points, or with `adaptive.enabled` a sparser one plus checkpoints where the model changes:
    train/core/schedules.py), and what each checkpoint keeps."""

    n_log: int = 70
    n_linear: int = 40
    first_tokens: int = 20_000  # first log-spaced point after step 0
    save_weights: bool = True  # model.safetensors at every checkpoint (for later re-analysis)
    keep_resume_states: int = 1  # newest checkpoints that keep optimizer state for resuming
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)


@dataclass
class ProbeConfig:
    n_probes: int = 16
    period: int = 25  # Olsson: BOS + 25 random tokens x 4; scaled down when it does not fit
    repeats: int = 4
    n_copy_tokens: int = 48
    n_heldout: int = 256
    n_heldout_mixture: Optional[int] = None  # held-out sequences with the training repetition (null: n_heldout)
    seed: int = 1234
    icl_early: Optional[int] = None  # defaults scale Olsson's 50 / 500 (of 512) with n_ctx
    icl_late: Optional[int] = None
    icl_window: int = 0  # the ICL score averages positions index +- icl_window (0: single indices)


@dataclass
class LoggerConfig:
    _target_: str = "train.loggers.WandbLogger"
    project: str = "induction-heads"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # one of WANDB_MODES
    heatmap_every: int = 1  # log the heads x layers heatmap image every k-th checkpoint
    charts_every: int = 0  # also log the per-family charts (every head a line) every k-th checkpoint; 0: only at the phase change and the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # typed as one of DATA_OPTIONS when composed
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    threads: str = "auto"  # torch's CPU threads: auto (train/threads.py) or a number
    resume: Optional[str] = None  # a run directory to continue, or auto (train/startup.py RESUME_AUTO)
    name: str = "induction"  # run name (wandb)
    live_detection_every: int = 10  # run the phase-change detector on the rows so far every k checkpoints; 0: off


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the YAML files that mirror this schema


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config that `python -m train OVERRIDES` runs, composed with Hydra's compose API (for
    scripts, notebooks and tests; not inside a running Hydra app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def register_configs() -> None:
    """The schema as Hydra's `base_config`, each data option's schema as `data/OPTION_schema` (the
    first entry of conf/data/OPTION.yaml's defaults: it types the `data` node, so a key of another
    source fails at composition), and the `${pid:}` resolver (this process's id) that makes the
    default run directory unique per process (conf/config.yaml `hydra.run.dir`)."""
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for option, schema in DATA_OPTIONS.items():
        store.store(group="data", name=f"{option}_schema", node=schema)
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


# -- allowed values (checked by `validate`; the code that uses them imports them from here) -----
POSITIONAL_SCHEMES = ("learned", "shortformer", "rotary")
LR_SCHEDULES = ("constant", "cosine", "linear")
WANDB_MODES = ("auto", "online", "offline")  # auto: online if logged in, else offline
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
REPEAT_FORMS = ("tile", "copy")  # data.repeat.form
REPEATS_MAX_VOCAB = 1 << 16  # data=repeats draws one permutation of the vocabulary per token
MAX_STEP, MAX_CHECKPOINTS = 1e3, 1_000_000  # optim.lr and weight_decay; checkpoints of a schedule


class ConfigError(ValueError):
    """A config value, path or run directory that cannot be used; the message names the key."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: Any, section: str, *names: str) -> None:
    """Each value is a finite number > 0 (inf and nan are refused)."""
    for name in names:
        value = cfg[section][name]
        _need(value is not None and math.isfinite(value) and value > 0,
              f"{section}.{name} must be positive and finite, got {value}")


def _non_negative(cfg: Any, section: str, *names: str) -> None:
    """Each value is a finite number >= 0."""
    for name in names:
        value = cfg[section][name]
        _need(value is not None and math.isfinite(value) and value >= 0,
              f"{section}.{name} must be >= 0 and finite, got {value}")


def validate(cfg: Any) -> None:
    """Check the values of a composed config (types are already checked by the schema).

    Raises ConfigError with a one-line message naming the offending key."""
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_training(cfg)
    _validate_probes(cfg)
    dev = str(cfg.device)
    _need(dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit()),
          f"unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")
    _need(cfg.get("live_detection_every", 0) >= 0,
          f"live_detection_every must be >= 0, got {cfg.get('live_detection_every')}")
    _need(cfg.logger.get("mode", "auto") in WANDB_MODES,
          f"logger.mode must be one of {', '.join(WANDB_MODES)}, got {cfg.logger.get('mode')!r}")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and "every" in cb:
            _need(cb.every >= 1, f"callbacks.{name}.every must be >= 1, got {cb.every}")
    threads = str(cfg.get("threads", "auto"))
    _need(threads == "auto" or (threads.isdigit() and int(threads) >= 1),
          f"threads must be auto or a positive number, got {threads!r}")
    from train.core import limits  # the model and a step's tensors fit the machine (a lower bound)

    try:
        limits.check_training(cfg.model, cfg.data, cfg.train)
    except limits.LimitError as e:
        raise ConfigError(str(e)) from None


def _validate_model(cfg: Any) -> None:
    m, d = cfg.model, cfg.data
    _positive(cfg, "model", "n_layers", "n_heads", "d_model", "d_head", "init_std", "rotary_base")
    _need(m.positional in POSITIONAL_SCHEMES,
          f"unknown model.positional {m.positional!r}; choose one of {', '.join(POSITIONAL_SCHEMES)}")
    _need(m.positional != "rotary" or m.d_head % 2 == 0,
          f"model.positional=rotary needs an even model.d_head (it rotates pairs of dimensions), got {m.d_head}")
    _need(m.d_vocab == d.vocab_size and m.n_ctx == d.n_ctx,
          f"model.d_vocab/n_ctx ({m.d_vocab}, {m.n_ctx}) must follow data.vocab_size/n_ctx "
          f"({d.vocab_size}, {d.n_ctx}); leave them at their defaults")


def _validate_data(cfg: Any) -> None:
    """The keys every source has (DataConfig), then the source's own."""
    d = cfg.data
    _positive(cfg, "data", "vocab_size", "n_ctx")
    _need(d.vocab_size >= 8, f"data.vocab_size must be at least 8, got {d.vocab_size}")
    _need(d.n_ctx >= 8, f"data.n_ctx must be at least 8, got {d.n_ctx}")
    r = d.repeat
    _need(0.0 <= r.p <= 1.0, f"data.repeat.p must lie in [0, 1], got {r.p}")
    _need(r.form in REPEAT_FORMS, f"unknown data.repeat.form {r.form!r}; choose one of {', '.join(REPEAT_FORMS)}")
    _need(1 <= r.min_span <= r.max_span, f"need 1 <= data.repeat.min_span <= data.repeat.max_span, "
                                         f"got {r.min_span}, {r.max_span}")
    longest = d.n_ctx - 1 if r.form == "tile" else (d.n_ctx - 1) // 2
    _need(r.p == 0 or r.max_span <= longest, f"data.repeat.max_span={r.max_span} does not fit "
          f"{'a span and its copy' if r.form == 'copy' else 'the context'} in data.n_ctx={d.n_ctx}")
    schema = DATA_SCHEMAS.get(d._target_)
    _need(schema is not None, f"data._target_={d._target_!r} is no data option's builder; "
                              f"choose data={', data='.join(DATA_OPTIONS)}")
    {RepeatsDataConfig: _validate_repeats, TokensDataConfig: _validate_tokens, TextDataConfig: _validate_text}[schema](cfg)


def _validate_repeats(cfg: Any) -> None:
    d = cfg.data
    _need(d.vocab_size <= REPEATS_MAX_VOCAB, f"data.vocab_size={d.vocab_size} is above {REPEATS_MAX_VOCAB}, the most "
                                             f"data=repeats makes (its chain takes time quadratic in the vocabulary)")
    _need(1 <= d.min_period <= d.max_period,
          f"need 1 <= data.min_period <= data.max_period, got {d.min_period}, {d.max_period}")
    _need(d.max_period < d.n_ctx - 1,
          f"data.max_period={d.max_period} leaves no repeat in a context of data.n_ctx={d.n_ctx}")
    _positive(cfg, "data", "branching")
    _need(d.branching <= d.vocab_size - 1,
          f"data.branching={d.branching} exceeds the {d.vocab_size - 1} regular tokens")
    for name in ("p_repeat", "p_uniform_segment"):
        _need(0.0 <= d[name] <= 1.0, f"data.{name} must lie in [0, 1], got {d[name]}")
    _need(0 <= d.reserved_tokens <= (d.vocab_size - 1) // 2,
          f"data.reserved_tokens must lie in [0, {(d.vocab_size - 1) // 2}] (half the regular tokens), got {d.reserved_tokens}")


def _validate_tokens(cfg: Any) -> None:
    d = cfg.data
    _need(d.path, "data=tokens needs data.path=FILE (a .npy array of token ids) or a `datasets` directory")
    path = Path(os.path.expanduser(str(d.path)))
    _need(path.exists(), f"data.path does not exist: {path}")


def _validate_text(cfg: Any) -> None:
    d = cfg.data
    _need(d.source, "data=text needs data.source=FILE (.txt, .jsonl, .parquet), a directory, a glob or "
                    "a hub dataset name")
    _positive(cfg, "data", "tokenizer_documents", "heldout_every")
    _need(d.max_documents is None or d.max_documents > 0, f"data.max_documents must be positive, got {d.max_documents}")
    _need(d.heldout_every >= 2, f"data.heldout_every must be at least 2, got {d.heldout_every}")


def _validate_training(cfg: Any) -> None:
    o, t = cfg.optim, cfg.train
    _positive(cfg, "optim", "lr")
    _non_negative(cfg, "optim", "weight_decay", "grad_clip", "warmup_tokens")
    for name in ("lr", "weight_decay"):  # float32 steps overflow far below the largest float
        _need(o[name] <= MAX_STEP, f"optim.{name}={o[name]} is above {MAX_STEP:g}, more than any AdamW step can use")
    _need(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas must lie in [0, 1), got {list(o.betas)}")
    _need(o.lr_schedule in LR_SCHEDULES,
          f"unknown optim.lr_schedule {o.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}")
    _positive(cfg, "train", "batch_size", "total_tokens")
    tokens_per_step = t.batch_size * cfg.data.n_ctx
    _need(t.total_tokens >= tokens_per_step,
          f"train.total_tokens={t.total_tokens} is less than one batch "
          f"(train.batch_size x data.n_ctx = {tokens_per_step} tokens)")
    _positive(cfg, "train", "divergence_margin")
    _non_negative(cfg, "train", "divergence_checkpoints")
    _non_negative(cfg, "checkpoint", "n_log", "n_linear", "keep_resume_states")
    _need(cfg.checkpoint.n_log + cfg.checkpoint.n_linear <= MAX_CHECKPOINTS,
          f"checkpoint.n_log + checkpoint.n_linear must be at most {MAX_CHECKPOINTS:,}")
    _positive(cfg, "checkpoint", "first_tokens")
    problem = adaptive_problem(cfg.checkpoint.get("adaptive"), cfg.probes.n_probes)
    _need(problem is None, problem)


def _validate_probes(cfg: Any) -> None:
    p, n_ctx = cfg.probes, cfg.data.n_ctx
    _positive(cfg, "probes", "n_probes", "n_copy_tokens", "n_heldout")
    if p.get("n_heldout_mixture") is not None:
        _positive(cfg, "probes", "n_heldout_mixture")
    _need(p.repeats >= 2, f"probes.repeats must be at least 2, got {p.repeats}")
    _need(p.period >= 2, f"probes.period must be at least 2, got {p.period}")
    # The probe is BOS + period x repeats tokens; the period is scaled down to fit the context,
    # but never below 2 tokens.
    _need(1 + 2 * p.repeats <= n_ctx,
          f"the probe (BOS + probes.repeats={p.repeats} copies of at least 2 tokens = {1 + 2 * p.repeats} "
          f"tokens) is longer than the context data.n_ctx={n_ctx}")
    last = n_ctx - 2  # the last position that predicts a token
    for name in ("icl_early", "icl_late"):
        value = p[name]
        _need(value is None or 0 <= value <= last,
              f"probes.{name}={value} lies outside the context: positions 0..{last} predict a token "
              f"when data.n_ctx={n_ctx}")
    _need(p.icl_window >= 0, f"probes.icl_window must be >= 0, got {p.icl_window}")
    if p.icl_early is not None and p.icl_late is not None:
        _need(p.icl_early < p.icl_late, f"probes.icl_early={p.icl_early} must be below probes.icl_late={p.icl_late}")
