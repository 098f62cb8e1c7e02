"""Start-up in one pass: every check that needs no model, once per process (`prepare`: config
values, the run directory and, on resume, the run's saved config), then the trainer and the
run's config.yaml (`begin`).

Through the command line the Hydra callback (train/cli.py RunDirCheck) prepares before Hydra
writes its `.hydra/` record into the run directory, so that a refused run writes nothing, and
`keep`s the result for the job, which takes it (`prepared`); a job the callback did not see (a
sweep job, or `train.cli.run` called directly, as through the compose API) prepares there. With
several processes rank 0 alone prepares; the others receive its config (train/ranks.py).

No torch at import: the callback runs before anything heavy is imported."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train import distributed
from train.core import limits, outputs, rundir
from train.core.config import ConfigError, validate
from train.core.saved_config import differences, load_saved_config
from train.sweep import requeued_job

# Overrides that may accompany resume=: where it runs, on how many threads and how it logs.
# Everything else is the config the run started with (its config.yaml).
RESUME_OVERRIDABLE = ("resume", "device", "threads", "logger")
# resume=auto: the same command again (a requeued job) continues the run in its run directory
# when that holds one of the same config, and starts it there otherwise.
RESUME_AUTO = "auto"


@dataclasses.dataclass
class Start:
    """A prepared start: the checked config (on resume: the run's saved config, with the settings
    that may change), the run directory, its status.json ({} for a new run) and whether the run
    resumes."""

    cfg: DictConfig
    run_dir: Path
    status: dict[str, Any]
    resuming: bool


def _command_line_overrides() -> list[str] | None:
    """The task overrides of the current Hydra job (None outside Hydra, e.g. the compose API)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        pass
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def resumed_config(cfg: DictConfig, run_dir: Path, same_command: bool = False) -> DictConfig:
    """The config a run started with, with the few settings that may change on resume. With
    `same_command` (resume=auto, or a requeued SLURM job repeating the command it started with),
    `cfg` must be that config: any other value is refused."""
    overrides = _command_line_overrides() or []
    foreign = [o for o in overrides if _override_key(o).split(".")[0] not in RESUME_OVERRIDABLE]
    path = run_dir / rundir.CONFIG_FILE
    if foreign and not same_command:
        raise ConfigError(f"resume: a resumed run keeps the config it started with ({path}); "
                          f"drop {' '.join(foreign)} (only {', '.join(RESUME_OVERRIDABLE)} may change)")
    try:
        text = limits.read_text(path)
        limits.check_yaml(text, str(path))
        saved = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as e:  # noqa: BLE001 - a damaged config.yaml is a bad run directory
        raise ConfigError(f"resume: cannot read {path}: {' '.join(str(e).split())}") from None
    merged = load_saved_config(saved, f"resume: {path}")
    if same_command:
        changed = differences(merged, cfg, ignore=RESUME_OVERRIDABLE)
        if changed:
            values = "; ".join(f"{k}={OmegaConf.select(merged, k)!r} there, {OmegaConf.select(cfg, k)!r} here"
                               for k in changed[:3])
            raise ConfigError(f"resume={RESUME_AUTO}: {run_dir} holds a run of another config ({values}); "
                              f"choose another directory")
    merged.resume, merged.device, merged.threads = str(run_dir), cfg.device, cfg.get("threads", "auto")
    if same_command or any(_override_key(o).split(".")[0] == "logger" for o in overrides):
        merged.logger = cfg.logger
    return merged


def check_corpus(cfg: DictConfig, run_dir: Path) -> None:
    """A resumed text run trains on the token cache entry it started with: its corpus and
    tokenizer settings must still give that entry's key (train/core/token_cache.py cache_key:
    local files enter with their size and modification time), or the run would go on with other
    data. Removing the run's record (rundir.TOKEN_CACHE_FILE) accepts the corpus as it is now."""
    record = rundir.read_token_cache(run_dir)
    if record is None or cfg.data.get("_target_") != "train.core.data.build_text" or not cfg.data.get("source"):
        return
    from train.core import token_cache

    key = token_cache.entry_key(cfg.data)
    if key != record.get("key"):
        raise ConfigError(f"resume: the corpus data.source={cfg.data.source} changed since the run started (token "
                          f"cache {record.get('key')} then, {key} now), so the resumed run would train on other data; "
                          f"restore the corpus, or delete {run_dir / rundir.TOKEN_CACHE_FILE} to go on with it as it is")


def prepare(cfg: DictConfig, run_dir: Path, n_ranks: int = 1, hydra_record: bool = False) -> Start:
    """Every check that needs no model: config values (config.validate, the one place they are
    checked: the trainer trusts them), the batch's split over `n_ranks` processes, and the run
    directory (train/core/outputs.py; on resume, the saved config and the corpus too).
    `hydra_record`: Hydra has written its record into the run directory (a sweep job). Raises
    ConfigError; creates nothing."""
    run_dir = Path(run_dir)
    status: dict = {}
    same_command = cfg.resume == RESUME_AUTO
    if same_command:
        cfg = cfg.copy()
        cfg.resume = str(run_dir) if (run_dir / rundir.CONFIG_FILE).is_file() else None
    resuming = bool(cfg.resume)
    requeued = not resuming and requeued_job() and (rundir.read_status(run_dir) or {}).get("state") in (
        rundir.RUNNING, rundir.INTERRUPTED, rundir.FAILED)
    if requeued:  # a SLURM job requeued after preemption or its time limit continues its own run
        cfg.resume, resuming = str(run_dir), True
    if resuming:
        run_dir = Path(cfg.resume).expanduser().resolve()
        status = outputs.check_resume_dir(run_dir)
        cfg = resumed_config(cfg, run_dir, same_command or requeued)
        validate(cfg)
        check_corpus(cfg, run_dir)
    else:
        validate(cfg)
        outputs.check_new_run_dir(run_dir, hydra_record)  # creates nothing: the directory is made with its lock
    distributed.World(size=n_ranks).rows(cfg.train.batch_size)  # the batch must split over the ranks
    return Start(cfg, run_dir, status, resuming)


_kept: dict[str, Start] = {}  # Hydra's run directory -> the start the callback prepared for its job


def _key(run_dir: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(run_dir)))


def keep(hydra_run_dir: str | Path, start: Start) -> None:
    """Keep the start prepared before Hydra's job for the job in `hydra_run_dir`."""
    _kept[_key(hydra_run_dir)] = start


def prepared(cfg: DictConfig, run_dir: Path, n_ranks: int = 1, hydra_record: bool = False) -> Start:
    """The start of the job in `run_dir`: the one kept for it, or `prepare`d now."""
    kept = _kept.pop(_key(run_dir), None)
    return kept if kept is not None else prepare(cfg, run_dir, n_ranks, hydra_record)


def build_trainer(trainer: type, cfg: DictConfig, run_dir: Path, world: distributed.World):
    """The trainer (train/loop.py Trainer, given by the command line) of a prepared config:
    building the model, data, probes and callbacks checks the remaining values; ConfigError for
    a user's mistake."""
    from hydra.errors import InstantiationException

    from train.core.token_cache import BuildStopped

    try:
        return trainer(cfg, run_dir, world, checked=True)
    except InstantiationException as e:  # unwrap the user's mistake (or a stop signal) from Hydra's wrapper
        cause = e.__cause__
        if isinstance(cause, BuildStopped):
            raise cause from None
        raise ConfigError(user_error(cause) if isinstance(cause, (ValueError, OSError)) else str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def begin(trainer: type, start: Start, world: distributed.World):
    """Rank 0's start (train/ranks.py, 2): the checkpoint to resume from (None: from the start),
    the trainer, and the run's config.yaml for a new run, or a line on where it resumes. Returns
    (trainer, checkpoint)."""
    run_dir = start.run_dir
    checkpoint = rundir.resume_point(run_dir) if start.resuming else None
    built = build_trainer(trainer, start.cfg, run_dir, world)
    if not start.resuming:
        rundir.write_text_atomic(run_dir / rundir.CONFIG_FILE, OmegaConf.to_yaml(start.cfg, resolve=True))
    elif checkpoint is None:  # stopped before its first checkpoint: start it again
        print(f"resuming {run_dir} from the start (it has no checkpoint yet)", file=sys.stderr)
        rundir.rewind_metrics(run_dir, -1)
        rundir.remove_stale_temporaries(run_dir)
    else:
        print(f"resuming {run_dir} from step {rundir.read_meta(checkpoint)['step']}", file=sys.stderr)
    return built, checkpoint


def user_error(e: BaseException) -> str:
    """The one line a user is told of a mistake: an OSError names its file."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e)
