"""What `python -m train` does with a composed config: check it, start or resume a run, and turn
user mistakes into one-line errors (exit 2) instead of tracebacks.

Exit codes: 0 finished; 2 bad input (config value, path, run directory, checkpoint), nothing
trained, nothing overwritten and no directory left behind; 3 a numerical fault (non-finite loss
or gradient, divergence) stopped training; 4 the file system failed (disk full, quota,
permissions: the message names the path); 128 + N stopped by signal N (SIGTERM 143, SIGINT 130)
after writing a checkpoint. After 3, 4 and 128 + N the last good checkpoint is kept and
status.json names its step. Hydra's own composition errors (misspelled key, wrong type) exit 1
with Hydra's message.

With several processes (torchrun, train/distributed.py) rank 0 checks, locks and writes the run
directory, reports every error and exits with these codes; the other ranks take the config from
it, print nothing of what rank 0 reports, and exit with the same codes (torchrun itself exits 1
when any rank fails or it was signalled, and lists each rank's exit code)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from train import distributed
from train.core import rundir
from train.core.config import ConfigError, typed_config, validate
from train.core.saved_config import differences, load_saved_config
from train.sweep import job_device, requeued_job

EXIT_USAGE, EXIT_FAULT, EXIT_IO = 2, 3, 4
# Overrides that may accompany resume=: where it runs and how it logs. Everything else is the
# config the run started with (its config.yaml).
RESUME_OVERRIDABLE = ("resume", "device", "logger")
# resume=auto: the same command again (a requeued job) continues the run in its run directory
# when that holds one of the same config, and starts it there otherwise.
RESUME_AUTO = "auto"


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print `error: <one line>` and exit with `code`. Inside a sweep (-m) the job fails instead,
    so the other jobs still run; Hydra then reports the first failure (one line) and exits 1."""
    one_line = " ".join(str(message).split())
    print(f"error: {one_line}", file=sys.stderr)
    if _multirun():
        from hydra.errors import CompactHydraException

        raise CompactHydraException(f"error: {one_line}")
    raise SystemExit(code)


def summarize(row: dict, run_dir: Path, seconds: float | None) -> str:
    from train.core import names as N

    lines = [f"run directory: {run_dir}"]
    table = N.head_table(row, N.PREFIX_MATCHING)
    if table:
        last = table[-1]
        best = max(range(len(last)), key=lambda h: last[h])
        lines.append(f"last-layer max prefix matching: {last[best]:.3f} ({N.head_name(len(table) - 1, best)})")
    for key in (N.LOSS_HELDOUT, N.ICL_SCORE):
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
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - a damaged config.yaml is a bad run directory
        raise ConfigError(f"resume: cannot read {path}: {e}") from None
    merged = load_saved_config(saved, f"resume: {path}")
    if same_command:
        changed = differences(merged, cfg, ignore=RESUME_OVERRIDABLE)
        if changed:
            values = "; ".join(f"{k}={OmegaConf.select(merged, k)!r} there, {OmegaConf.select(cfg, k)!r} here"
                               for k in changed[:3])
            raise ConfigError(f"resume={RESUME_AUTO}: {run_dir} holds a run of another config ({values}); "
                              f"choose another directory")
    merged.resume, merged.device = str(run_dir), cfg.device
    if same_command or any(_override_key(o).split(".")[0] == "logger" for o in overrides):
        merged.logger = cfg.logger
    return merged


def prepare(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path, dict, bool]:
    """Every check that needs no model: config values and the run directory (and, on resume,
    the saved config). Raises ConfigError; imports no torch."""
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
        status = rundir.check_resume_dir(run_dir)
        cfg = resumed_config(cfg, run_dir, same_command or requeued)
        validate(cfg)
    else:
        validate(cfg)
        rundir.check_new_run_dir(run_dir)  # creates nothing: the directory is made with its lock
    return cfg, run_dir, status, resuming


def _user_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e)


class RunDirCheck(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): before Hydra writes its `.hydra/`
    record and log, check the config and the run directory, resolved (interpolations and all),
    and take the directory's lock for the rest of the process. A refused run so writes nothing
    into anybody's directory, and two processes never train in one. Sweep jobs (-m) are checked
    in `run`."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        if distributed.env_rank() != 0:  # rank 0 checks and locks the run directory; the others use none
            return
        HydraConfig.instance().set_config(config)
        task = config.copy()
        with open_dict(task):
            del task["hydra"]
        run_dir = None
        try:
            run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
            _, run_dir, _, resuming = prepare(task, run_dir)
            rundir.acquire_lock(run_dir)
            if not resuming:  # another process may have started a run here since the check
                rundir.check_new_run_dir(run_dir)
        except (ValueError, OSError, OmegaConfBaseException) as e:
            if run_dir is not None:
                _discard_stub(run_dir)
            distributed.refuse(EXIT_USAGE, str(config.get("device", "auto")))  # the other ranks wait for word
            fail(_user_error(e).splitlines()[0])


def _discard_stub(run_dir: Path) -> None:
    """Remove what a run that failed before training wrote (rundir.remove_stub: never a run, nor a
    directory another process holds). A sweep job keeps its own subdirectory: its Hydra log holds
    the one-line reason that the end-of-sweep summary (train/sweep.py) reports."""
    if not _multirun():
        rundir.remove_stub(run_dir)


def _io_error(e: OSError, run_dir: Path, trainer) -> str:
    where = f"cannot write {e.filename}" if e.filename else "a file-system operation failed"
    if trainer is None or trainer.last_saved is None:
        return f"{where}: {e.strerror or e}; nothing was trained, continue with resume={run_dir}"
    return (f"{where}: {e.strerror or e}; stopped at step {trainer.step}, the last good checkpoint (step "
            f"{trainer.last_saved}) is kept: make room and continue with resume={run_dir}")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Start or resume a run; exits (SystemExit) with the codes in the module docstring. A new
    run that fails before training removes what its start wrote (rundir.remove_stub). Under a
    launcher of several processes (WORLD_SIZE > 1) this process joins the group first and
    leaves it at the end."""
    try:
        world = distributed.world_from_env()
    except ConfigError as e:
        fail(str(e))
    if not world.enabled:
        return _run(cfg, Path(run_dir), world)
    try:
        world = distributed.start(world, str(cfg.device))
    except (ConfigError, RuntimeError) as e:  # the same on every rank; RuntimeError: no group formed
        _fail(world, _user_error(e), EXIT_USAGE, quiet=True)
    together = True  # every rank ends here knowing how the run ended
    try:
        return _run(cfg, Path(run_dir), world)
    except SystemExit as e:  # a stop, or an error reported by `_fail` (its context)
        together = e.__context__ is None or distributed.shared(e.__context__)
        raise
    except BaseException:  # a bug on this rank alone: torchrun stops the others
        together = False
        raise
    finally:
        distributed.finish(world, together)


def _fail(world: distributed.World, message: str, code: int, quiet: bool) -> None:
    """`fail` on rank 0. Another rank exits with `code` and says nothing when the error is one
    rank 0 reports too (`quiet`), and names itself otherwise."""
    if world.main:
        fail(message, code)
    if quiet:
        raise SystemExit(code)
    fail(f"rank {world.rank}: {message}", code)


def _trainer(cfg: DictConfig, run_dir: Path, world: distributed.World):
    """The Trainer (building the model, data, probes and callbacks checks the remaining values);
    ConfigError for a user's mistake."""
    from hydra.errors import InstantiationException

    from train.loop import Trainer

    try:
        return Trainer(cfg, run_dir, world)
    except InstantiationException as e:  # unwrap the user's mistake from Hydra's wrapper
        cause = e.__cause__
        raise ConfigError(_user_error(cause) if isinstance(cause, (ValueError, OSError)) else str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _run(cfg: DictConfig, run_dir: Path, world: distributed.World) -> dict:
    main = world.main
    try:
        if main:
            with distributed.leading(world) as handover:  # the other ranks wait for the config
                cfg, run_dir, status, resuming = prepare(cfg, run_dir)
                world.rows(cfg.train.batch_size)  # the batch must split over the ranks
                if world.enabled:
                    handover.value = (OmegaConf.to_container(cfg, resolve=True), str(run_dir))
        else:  # rank 0's config (on resume: the run's) and run directory, never read here
            saved, where = distributed.follow(world)
            cfg, run_dir, status, resuming = typed_config(saved), Path(where), {}, False
    except distributed.PeerFailed as e:
        raise SystemExit(e.code) from None
    except (ValueError, OSError, OmegaConfBaseException) as e:
        if main:
            _discard_stub(run_dir)
        _fail(world, _user_error(e), EXIT_USAGE, quiet=False)
    if _multirun() and cfg.device == "auto":  # one GPU per job where there are several
        from train.core.device import cuda_count

        cfg.device = job_device(cfg.device, _job_num(), cuda_count())

    from train.loop import TrainingError

    trainer = None
    try:
        with rundir.lock(run_dir) if main else contextlib.nullcontext():
            if main:
                with distributed.leading(world):  # the other ranks wait for the start
                    resume_checkpoint = rundir.resume_point(run_dir) if resuming else None
                    trainer = _trainer(cfg, run_dir, world)
                    if not resuming:
                        rundir.write_text_atomic(run_dir / rundir.CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
                    elif resume_checkpoint is None:  # stopped before its first checkpoint: start it again
                        print(f"resuming {run_dir} from the start (it has no checkpoint yet)", file=sys.stderr)
                        rundir.rewind_metrics(run_dir, -1)
                        rundir.remove_stale_temporaries(run_dir)
                    else:
                        print(f"resuming {run_dir} from step {rundir.read_meta(resume_checkpoint)['step']}",
                              file=sys.stderr)
            else:
                resume_checkpoint = None
                try:
                    trainer = _trainer(cfg, run_dir, world)
                finally:  # rank 0's outcome first: an error rank 0 had too is rank 0's to report
                    distributed.follow(world)
            row = trainer.run(resume_checkpoint, status)
    except distributed.PeerFailed as e:
        raise SystemExit(e.code) from None
    except TrainingError as e:
        _fail(world, f"{e}. The last good checkpoint is kept in {run_dir / rundir.CHECKPOINTS}; "
                     f"the event is recorded in {run_dir / rundir.METRICS_FILE}.", EXIT_FAULT, distributed.shared(e))
    except KeyboardInterrupt as e:
        _fail(world, f"stopped by a second signal; resume from the last checkpoint with resume={run_dir}", 130,
              distributed.shared(e))
    except (ConfigError, rundir.CheckpointError, OmegaConfBaseException) as e:
        # Bad input; other exceptions during training are bugs and keep their traceback.
        if main:
            _discard_stub(run_dir)
        _fail(world, _user_error(e), EXIT_USAGE, distributed.shared(e))
    except OSError as e:  # the file system failed: not the user's input
        if main:
            _discard_stub(run_dir)
        _fail(world, _io_error(e, run_dir, trainer), EXIT_IO, distributed.shared(e))
    if trainer.exit_code != 0:  # stopped by a signal, after writing a checkpoint
        raise SystemExit(trainer.exit_code)
    if not main:
        return row
    status = rundir.read_status(run_dir) or {}
    print(summarize(row, run_dir, status.get("wall_seconds")))
    return row
