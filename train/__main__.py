"""`python -m train [overrides]`: train one model (or a sweep with -m) and track induction heads.

`python -m train resume=RUN_DIR` continues a stopped run (Hydra's run directory is set to
RUN_DIR here, before Hydra starts). Hydra writes its `.hydra/` record into the run directory
before the job starts, so the run directory named on the command line (`resume=` or
`hydra.run.dir=`) is checked here first (train/rundir.py), and a bad one fails with a one-line
error before Hydra writes anything into it; the job checks it again (train/cli.py `prepare`)
because sweeps and the compose API do not pass through here. On resume Hydra does not rewrite
the run's `.hydra/` record of how it was started (`hydra.output_subdir=null`)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.config import ConfigError, register_configs
from train.rundir import check_new_run_dir, check_resume_dir

register_configs()


def _argument(argv: list[str], key: str) -> str | None:
    """The value of the last `key=value` (also `+key=` / `++key=`) override, if any."""
    value = None
    for arg in argv:
        name, sep, rest = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = rest
    return value


def precheck(argv: list[str]) -> list[str]:
    """Check the run directory named on the command line; return the argv to hand to Hydra."""
    if any(a in ("-m", "--multirun") or a.startswith(("--cfg", "--help", "-h", "--info", "--hydra-help"))
           for a in argv):
        return argv
    resume = _argument(argv, "resume")
    if resume not in (None, "", "null", "None"):
        if "${" not in resume:
            check_resume_dir(Path(resume).expanduser().resolve())
        if _argument(argv, "hydra.output_subdir") is None:
            argv = [*argv, "hydra.output_subdir=null"]  # keep the original .hydra/ as it is
        if _argument(argv, "hydra.run.dir") is None:
            argv = [*argv, f"hydra.run.dir={resume}"]  # Hydra runs in the resumed run's directory
        return argv
    run_dir = _argument(argv, "hydra.run.dir")
    if run_dir and "${" not in run_dir:
        check_new_run_dir(Path(run_dir).expanduser())
    return argv


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from train.cli import run

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    try:
        sys.argv[1:] = precheck(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
