"""`python -m train [overrides]`: train one model (or a sweep with -m) and track induction heads.

The stop-signal handler is installed first (train/signals.py), so SIGTERM during start-up is
kept and honoured once the run can be continued. `python -m train resume=RUN_DIR` continues a
stopped run (Hydra's run directory is set to RUN_DIR here, before Hydra starts);
`resume=auto` continues the run in the run directory if there is one (the same command again,
as a requeued job runs it) and starts it otherwise. Hydra writes its `.hydra/` record and log
into the run directory before the job starts, so the resolved run directory is checked and
locked before that (train/cli.py `RunDirCheck`, a Hydra callback), and a bad one fails with a
one-line error before anything is written into it; the job takes what the callback prepared
(train/startup.py) and prepares itself only where no callback ran (sweep jobs, the compose API).
On resume Hydra does not rewrite the run's `.hydra/` record of how it was started
(`hydra.output_subdir=null`).

Under torchrun (WORLD_SIZE > 1, train/distributed.py) every rank runs this command line. Rank 0
is the run; the other ranks give Hydra the system's temporary directory as run directory, with
no `.hydra/` record and no log file, so they create and write no directory; a sweep (-m) is
refused there.

Before any of this, `train/usage.py` answers `--help` with the tool's own help and refuses, with
one line and exit 2, overrides that do not compose (unknown group options and keys, missing
groups, wrong types); the run's console lines also go to its Hydra log (train/console_log.py).
Anything the command does not report itself ends as one line and exit 1 (4 for the file system),
the traceback behind `--debug` (train/core/edge.py)."""
from __future__ import annotations

from train.signals import STOP

STOP.install()  # before anything slow

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from train import distributed  # noqa: E402
from train.core import edge  # noqa: E402
from train.core.config import register_configs  # noqa: E402
from train.core.rundir import CONFIG_FILE  # noqa: E402
from train.startup import RESUME_AUTO  # noqa: E402

register_configs()


def _argument(argv: list[str], key: str) -> str | None:
    """The value of the last `key=value` (also `+key=` / `++key=`) override, if any."""
    value = None
    for arg in argv:
        name, sep, rest = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = rest
    return value


# What a rank other than 0 hands Hydra instead of the user's values: no directory of its own.
FOLLOWER_KEYS = ("hydra.run.dir", "hydra.output_subdir", "hydra/job_logging")


def precheck(argv: list[str], env=None) -> list[str]:
    """The argv to hand to Hydra: a resumed run runs in its own directory; a rank other than 0
    of several runs in none (FOLLOWER_KEYS)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if multirun and distributed.env_world_size(env) > 1:
        if distributed.env_rank(env) == 0:
            print("error: a sweep (-m) cannot run under torchrun; launch one torchrun per run, "
                  "or sweep without it", file=sys.stderr)
        raise SystemExit(2)
    if multirun or any(a.startswith(("--cfg", "--help", "-h", "--info", "--hydra-help")) for a in argv):
        return argv
    resume = _argument(argv, "resume")
    if resume == RESUME_AUTO:  # the run directory may hold this run already: keep its .hydra/ then
        run_dir = _argument(argv, "hydra.run.dir")
        if run_dir and "${" not in run_dir and (Path(run_dir).expanduser() / CONFIG_FILE).is_file() \
                and _argument(argv, "hydra.output_subdir") is None:
            argv = [*argv, "hydra.output_subdir=null"]
    elif resume not in (None, "", "null", "None"):
        if _argument(argv, "hydra.output_subdir") is None:
            argv = [*argv, "hydra.output_subdir=null"]  # keep the original .hydra/ as it is
        if _argument(argv, "hydra.run.dir") is None:
            argv = [*argv, f"hydra.run.dir={resume}"]  # Hydra runs in the resumed run's directory
    if distributed.env_rank(env) != 0:
        argv = [a for a in argv if a.partition("=")[0].lstrip("+~") not in FOLLOWER_KEYS]
        argv += [f"hydra.run.dir={tempfile.gettempdir()}", "hydra.output_subdir=null", "hydra/job_logging=none"]
    return argv


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.errors import HydraException

    from train.cli import fail, run
    from train.console_log import console_to_log

    try:
        with console_to_log():  # the run's lines also go to its Hydra log, RUN_DIR/__main__.log
            run(cfg, Path(HydraConfig.get().runtime.output_dir), set_threads=True)
    except HydraException:  # a sweep job's failure, reported already (train/cli.py fail)
        raise
    except Exception as e:  # noqa: BLE001 - the edge (train/core/edge.py): what run did not report
        fail(*edge.message(e))


if __name__ == "__main__":
    from train import usage

    argv = edge.take_debug_flag(sys.argv[1:])
    usage.handle(argv, main_rank=distributed.env_rank() == 0)  # --help; overrides that do not compose
    sys.argv[1:] = precheck(argv)
    main()
