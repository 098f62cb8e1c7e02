"""What `python -m train` does with a composed config: check it, start or resume a run, and turn
user mistakes into one-line errors (exit 2) instead of tracebacks.

Exit codes: 0 finished; 2 bad input (config value, path, run directory, checkpoint), nothing
trained and nothing overwritten; 3 a numerical fault stopped training (the last good checkpoint
is kept); 128 + N stopped by signal N (SIGTERM 143, SIGINT 130) after writing a checkpoint.
Hydra's own composition errors (misspelled key, wrong type) exit 1 with Hydra's message."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import ConfigError, check_new_run_dir, check_resume_dir, check_writable, validate

EXIT_USAGE, EXIT_FAULT = 2, 3
# Overrides that may accompany resume=: where it runs and how it logs. Everything else is the
# config the run started with (its config.yaml).
RESUME_OVERRIDABLE = ("resume", "device", "logger")
# `_target_`s a resumed run's config.yaml may name: this project's classes only.
SAFE_TARGETS = ("train.",)


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print `error: <one line>` and exit with `code`. Inside a sweep (-m) the job fails instead,
    so the other jobs still run; Hydra then reports the first failure (one line) and exits 1."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr)
    if _multirun():
        from hydra.errors import CompactHydraException

        raise CompactHydraException(f"error: {one_line}")
    raise SystemExit(code)


def resume_point(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run that carries optimizer state."""
    from train import checkpoint as ckpt

    if not run_dir.is_dir():
        raise FileNotFoundError(f"resume: no run directory at {run_dir}")
    candidates = [d for d in ckpt.list_checkpoints(run_dir) if (d / ckpt.STATE_FILE).is_file()]
    if not candidates:
        raise ckpt.CheckpointError(f"resume: {run_dir} has no checkpoint with a resume state "
                                   f"({ckpt.STATE_FILE}); it cannot be continued")
    return candidates[-1]


def summarize(row: dict, run_dir: Path, seconds: float | None) -> str:
    from train.loggers import head_table

    lines = [f"run directory: {run_dir}"]
    table = head_table(row, "prefix_matching")
    if table:
        last = table[-1]
        best = max(range(len(last)), key=lambda h: last[h])
        lines.append(f"last-layer max prefix matching: {last[best]:.3f} (L{len(table) - 1}H{best})")
    for key in ("loss/heldout", "icl_score"):
        if key in row:
            lines.append(f"{key}: {row[key]:.4f}")
    if seconds is not None:
        lines.append(f"wall time: {seconds:.1f} s")
    return "\n".join(lines)


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


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        found = [str(v) for k, v in node.items() if k == "_target_"]
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def resumed_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config a run started with, with the few settings that may change on resume."""
    overrides = _command_line_overrides() or []
    foreign = [o for o in overrides if _override_key(o).split(".")[0] not in RESUME_OVERRIDABLE]
    if foreign:
        raise ConfigError(f"resume: a resumed run keeps the config it started with ({run_dir / 'config.yaml'}); "
                          f"drop {' '.join(foreign)} (only {', '.join(RESUME_OVERRIDABLE)} may change)")
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
    except Exception as e:  # noqa: BLE001 - a damaged config.yaml is a bad run directory
        raise ConfigError(f"resume: cannot read {run_dir / 'config.yaml'}: {e}") from None
    if not isinstance(saved, DictConfig) or "model" not in saved or "train" not in saved:
        raise ConfigError(f"resume: {run_dir / 'config.yaml'} is not a training config")
    foreign_targets = sorted(t for t in _targets(OmegaConf.to_container(saved)) if not t.startswith(SAFE_TARGETS))
    if foreign_targets:  # a run directory is data: it must not name code to run
        raise ConfigError(f"resume: {run_dir / 'config.yaml'} names code outside this project "
                          f"({', '.join(foreign_targets)}); refusing to run it")
    from train.config import Config

    try:  # the schema checks the saved values' types and keys
        merged = OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as e:
        raise ConfigError(f"resume: {run_dir / 'config.yaml'} does not match the config schema: "
                          f"{str(e).splitlines()[0]}") from None
    merged.resume, merged.device = str(run_dir), cfg.device
    if any(_override_key(o).split(".")[0] == "logger" for o in overrides):
        merged.logger = cfg.logger
    return merged


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One process per run directory: a second `resume=` of a run still training fails."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fh = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{run_dir} is in use by another training process") from None
        yield
    finally:
        fh.close()


def prepare(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path, dict, bool]:
    """Every check that needs no model: config values and the run directory (and, on resume,
    the saved config). Raises ConfigError; imports no torch."""
    run_dir = Path(run_dir)
    status: dict = {}
    resuming = bool(cfg.resume)
    if resuming:
        run_dir = Path(cfg.resume).expanduser().resolve()
        status = check_resume_dir(run_dir)
        cfg = resumed_config(cfg, run_dir)
        validate(cfg)
    else:
        validate(cfg)
        check_new_run_dir(run_dir)
    check_writable(run_dir)
    return cfg, run_dir, status, resuming


def _user_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Start or resume a run; exits (SystemExit) with the codes in the module docstring."""
    try:
        cfg, run_dir, status, resuming = prepare(cfg, run_dir)
    except (ValueError, OSError, OmegaConfBaseException) as e:
        fail(_user_error(e))

    from hydra.errors import InstantiationException

    from train import checkpoint as ckpt
    from train.loop import Trainer, TrainingError

    try:
        with run_lock(run_dir):
            resume_from = resume_point(run_dir) if resuming else None
            try:  # building the model, data and probes checks the remaining values
                trainer = Trainer(cfg, run_dir)
            except InstantiationException as e:  # unwrap the user's mistake from Hydra's wrapper
                cause = e.__cause__
                raise ConfigError(_user_error(cause) if isinstance(cause, (ValueError, OSError)) else str(e)) from None
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if resume_from is None:
                ckpt.write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            else:
                print(f"resuming {run_dir} from step {ckpt.read_meta(resume_from)['step']}", file=sys.stderr)
            row = trainer.run(resume_from=resume_from, run_id=status.get("wandb_run_id"),
                              resumed_from=status.get("resumed_from_steps"),
                              prior_seconds=status.get("wall_seconds") or 0.0)
    except TrainingError as e:
        fail(f"{e}. The last good checkpoint is kept in {run_dir / 'checkpoints'}; "
             f"the event is recorded in {run_dir / 'metrics.jsonl'}.", EXIT_FAULT)
    except KeyboardInterrupt:
        fail(f"stopped by a second signal; resume from the last checkpoint with resume={run_dir}", 130)
    except (ConfigError, ckpt.CheckpointError, OSError, OmegaConfBaseException) as e:
        # Bad input and I/O failures; other exceptions during training are bugs and keep their traceback.
        fail(_user_error(e))
    if trainer.exit_code != 0:  # stopped by a signal, after writing a checkpoint
        raise SystemExit(trainer.exit_code)
    from train.config import read_run_status

    status = read_run_status(run_dir) or {}
    print(summarize(row, run_dir, status.get("wall_seconds")))
    return row
