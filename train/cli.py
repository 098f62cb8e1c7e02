"""What `python -m train` does with a composed config: check it, start or resume a run, and turn
user mistakes into one-line errors (exit 2) instead of tracebacks.

Exit codes: 0 finished; 2 bad input (config value, path, run directory, checkpoint), nothing
trained, nothing overwritten and no directory left behind; 3 a numerical fault (non-finite loss
or gradient, divergence) stopped training; 4 the file system failed (disk full, quota,
permissions: the message names the path); 128 + N stopped by signal N (SIGTERM 143, SIGINT 130)
after writing a checkpoint. After 3, 4 and 128 + N the last good checkpoint is kept and
status.json names its step. Overrides that do not compose (misspelled key or option, wrong type)
are refused with exit 2 before Hydra starts (train/usage.py).

Start-up runs once (train/startup.py): the Hydra callback `RunDirCheck` prepares before Hydra
writes into the run directory and hands the result to the job (`run`), which prepares itself only
where the callback did not run. With several processes (torchrun, train/distributed.py) rank 0
checks, locks and writes the run directory, reports every error and exits with these codes; the
other ranks take the config from it (train/ranks.py), print nothing of what rank 0 reports, and
exit with the same codes (torchrun itself exits 1 when any rank fails or it was signalled, and
lists each rank's exit code)."""
from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from train import distributed, startup
from train.core import outputs, rundir
from train.core.config import ConfigError
from train.ranks import PeerFailed, Ranks, refuse
from train.startup import Start, user_error
from train.sweep import job_device

EXIT_USAGE, EXIT_FAULT, EXIT_IO = 2, 3, 4


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


def start_lines(trainer, run_dir: Path, threads: str) -> str:
    """What a run says when it starts: where it writes, and the settings that decide its time and
    results (device and threads, data, model size, tokens, checkpoints)."""
    from train.core.config import data_option

    cfg, d = trainer.cfg, trainer.cfg.data
    option = data_option(d._target_, d._target_)
    params = sum(p.numel() for p in trainer.model.parameters())
    m = cfg.model
    if trainer.watch is None:
        schedule = f"{len(trainer.checkpoint_steps)} checkpoints (fixed schedule)"
    else:
        schedule = f"adaptive checkpoints: {len(trainer.checkpoint_steps)} base, more where the model changes"
    return "\n".join([f"training in {run_dir}",
                      f"  device {trainer.device}, {threads}",
                      f"  data={option}: vocabulary {d.vocab_size}, context {d.n_ctx}",
                      f"  model: {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, {params:,} parameters",
                      f"  {trainer.total_steps * trainer.tokens_per_step:,} tokens in {trainer.total_steps:,} steps "
                      f"of {cfg.train.batch_size} x {d.n_ctx}; {schedule}"])


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


class RunDirCheck(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): before Hydra writes its `.hydra/`
    record and log, prepare the start (train/startup.py: the config and the run directory,
    resolved, interpolations and all), take the directory's lock for the rest of the process,
    and keep the start for the job. A refused run so writes nothing into anybody's directory,
    and two processes never train in one. Sweep jobs (-m) are prepared in `run`."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        if distributed.env_rank() != 0:  # rank 0 checks and locks the run directory; the others use none
            return
        HydraConfig.instance().set_config(config)
        task = copy.deepcopy(config)  # the job's config, as Hydra hands it to the job
        with open_dict(task):
            del task["hydra"]
        hydra_dir = run_dir = None
        try:
            hydra_dir = run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
            start = startup.prepare(task, run_dir, distributed.env_world_size())
            run_dir = start.run_dir
            outputs.acquire_lock(run_dir)
            if not start.resuming:  # another process may have started a run here since the check
                outputs.check_new_run_dir(run_dir)
            startup.keep(hydra_dir, start)
        except (ValueError, OSError, OmegaConfBaseException) as e:
            if run_dir is not None:
                _discard_stub(run_dir)
            refuse(EXIT_USAGE, str(config.get("device", "auto")))  # the other ranks wait for word
            fail(user_error(e).splitlines()[0])


def _discard_stub(run_dir: Path) -> None:
    """Remove what a start of this process that failed before training wrote (outputs.remove_stub:
    never a run, nor a directory this process did not lock or another process holds now). A sweep job keeps its own subdirectory: its Hydra log holds
    the one-line reason that the end-of-sweep summary (train/sweep.py) reports."""
    if not _multirun():
        outputs.remove_stub(run_dir)


def _fail(ranks: Ranks, message: str, code: int, quiet: bool) -> None:
    """`fail` on rank 0. Another rank exits with `code` and says nothing when the error is one
    rank 0 reports too (`quiet`), and names itself otherwise."""
    if ranks.main:
        fail(message, code)
    if quiet:
        raise SystemExit(code)
    fail(f"rank {ranks.world.rank}: {message}", code)


def run(cfg: DictConfig, run_dir: Path, set_threads: bool = False) -> dict:
    """Start or resume a run; exits (SystemExit) with the codes in the module docstring. A new
    run that fails before training removes what its start wrote (outputs.remove_stub). Under a
    launcher of several processes (WORLD_SIZE > 1) this process joins the group first and
    leaves it at the end (train/ranks.py). `set_threads` (the command line): set torch's threads
    from the config (train/threads.py) before the trainer is built."""
    try:
        world = distributed.world_from_env()
    except ConfigError as e:
        fail(str(e))
    ranks = Ranks(world)
    if world.enabled:
        try:
            ranks = Ranks(distributed.start(world, str(cfg.device)))
        except (ConfigError, RuntimeError) as e:  # the same on every rank; RuntimeError: no group formed
            _fail(ranks, user_error(e), EXIT_USAGE, quiet=True)
    error = None
    try:
        return _run(cfg, Path(run_dir), ranks, set_threads)
    except BaseException as e:
        error = e
        raise
    finally:
        ranks.end(error)


def _run(cfg: DictConfig, run_dir: Path, ranks: Ranks, set_threads: bool = False) -> dict:
    from train.loop import Trainer

    start = _configure(cfg, run_dir, ranks)
    threads = _threads(start, set_threads)
    if _multirun() and start.cfg.device == "auto":  # one GPU per job where there are several
        from train.core.device import cuda_count

        start.cfg.device = job_device(start.cfg.device, _job_num(), cuda_count())
    trainer = None
    try:
        with outputs.lock(start.run_dir) if ranks.main else contextlib.nullcontext():
            trainer, checkpoint = ranks.start(lambda: startup.begin(Trainer, start, ranks.world),
                                              lambda: (startup.build_trainer(Trainer, start.cfg, start.run_dir,
                                                                             ranks.world), None))
            if ranks.main:
                print(start_lines(trainer, start.run_dir, threads), flush=True)
            row = trainer.run(checkpoint, start.status)
    except BaseException as e:
        _stopped(e, start.run_dir, ranks, trainer)
        raise
    if trainer.exit_code != 0:  # stopped by a signal, after writing a checkpoint
        raise SystemExit(trainer.exit_code)
    if not ranks.main:
        return row
    status = rundir.read_status(start.run_dir) or {}
    print(summarize(row, start.run_dir, status.get("wall_seconds")))
    return row


def _threads(start: Start, set_threads: bool) -> str:
    """Set torch's threads (train/threads.py) when asked to; returns what the run says of them."""
    from train import threads

    if not set_threads:
        import torch

        return f"{torch.get_num_threads()} threads (this process's)"
    resumed = None
    if start.resuming:
        with contextlib.suppress(ValueError, OSError):  # a damaged checkpoint is refused where it is read
            point = rundir.resume_point(start.run_dir)
            resumed = None if point is None else rundir.read_meta(point).get("threads")
    return threads.apply(start.cfg.get("threads", threads.AUTO), resumed)


def _configure(cfg: DictConfig, run_dir: Path, ranks: Ranks) -> Start:
    """The start (train/ranks.py, 1): on rank 0 the one the Hydra callback kept for this job, or
    prepared now; on the others rank 0's. Exits 2 for bad input."""
    try:
        return ranks.config(lambda: startup.prepared(cfg, run_dir, ranks.world.size, hydra_record=_multirun()))
    except PeerFailed as e:
        raise SystemExit(e.code) from None
    except (ValueError, OSError, OmegaConfBaseException) as e:
        if ranks.main:
            _discard_stub(run_dir)
        _fail(ranks, user_error(e), EXIT_USAGE, quiet=False)


def _stopped(e: BaseException, run_dir: Path, ranks: Ranks, trainer) -> None:
    """Exit with the code of the module docstring for each way a run stops early (rank 0 reports
    it; another rank exits quietly when every rank knows of it); return for anything else, a bug,
    which keeps its traceback."""
    from train.core.token_cache import BuildStopped
    from train.faults import TrainingError

    quiet = distributed.shared(e)
    if isinstance(e, PeerFailed):
        raise SystemExit(e.code) from None
    if isinstance(e, TrainingError):
        _fail(ranks, f"{e}. The last good checkpoint is kept in {run_dir / rundir.CHECKPOINTS}; "
                     f"the event is recorded in {run_dir / rundir.METRICS_FILE}.", EXIT_FAULT, quiet)
    if isinstance(e, KeyboardInterrupt):
        _fail(ranks, f"stopped by a second signal; resume from the last checkpoint with resume={run_dir}", 130, quiet)
    if isinstance(e, BuildStopped):  # a stop signal while the token cache was built: nothing trained yet
        if ranks.main:
            _discard_stub(run_dir)
        _fail(ranks, f"{e}; nothing was trained", 128 + e.signum, quiet)
    if isinstance(e, (ConfigError, rundir.CheckpointError, OmegaConfBaseException)):  # bad input
        if ranks.main:
            _discard_stub(run_dir)
        _fail(ranks, user_error(e), EXIT_USAGE, quiet)
    if isinstance(e, OSError):  # the file system failed: not the user's input
        if ranks.main:
            _discard_stub(run_dir)
        _fail(ranks, _io_error(e, run_dir, trainer), EXIT_IO, quiet)


def _io_error(e: OSError, run_dir: Path, trainer) -> str:
    where = f"cannot write {e.filename}" if e.filename else "a file-system operation failed"
    last_saved = None if trainer is None else trainer.saver.last_saved
    if last_saved is None:
        return f"{where}: {e.strerror or e}; nothing was trained, continue with resume={run_dir}"
    return (f"{where}: {e.strerror or e}; stopped at step {trainer.step}, the last good checkpoint (step "
            f"{last_saved}) is kept: make room and continue with resume={run_dir}")
