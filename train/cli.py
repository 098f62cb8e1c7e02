"""What `python -m train` does with a composed config: check it, start or resume a run, and turn
user mistakes into one-line errors (exit 2) instead of tracebacks."""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train import checkpoint as ckpt
from train.loggers import head_table
from train.loop import Trainer, TrainingError, read_status

EXIT_USAGE, EXIT_FAULT = 2, 3


def fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def resume_point(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run that carries optimizer state."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"resume: no run directory at {run_dir}")
    candidates = [d for d in ckpt.list_checkpoints(run_dir) if (d / ckpt.STATE_FILE).is_file()]
    if not candidates:
        raise ckpt.CheckpointError(f"resume: {run_dir} has no checkpoint with a resume state")
    return candidates[-1]


def summarize(row: dict, run_dir: Path, seconds: float | None) -> str:
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


def run(cfg: DictConfig, run_dir: Path) -> dict:
    resume_from = None
    run_id = None
    try:
        if cfg.resume:
            run_dir = Path(cfg.resume).expanduser().resolve()
            resume_from = resume_point(run_dir)
            saved = run_dir / "config.yaml"
            if not saved.is_file():
                raise FileNotFoundError(f"resume: {run_dir} has no config.yaml")
            status = read_status(run_dir) or {}
            if status.get("state") == "finished":
                raise ValueError(f"resume: the run in {run_dir} already finished")
            run_id = status.get("wandb_run_id")
            # The run continues with the config it started with; only where it runs may change.
            saved_cfg = OmegaConf.load(saved)
            saved_cfg.resume, saved_cfg.device = cfg.resume, cfg.device
            cfg = saved_cfg
        else:
            status = read_status(run_dir)
            if status is not None:
                raise ValueError(f"{run_dir} already holds a run ({status.get('state')}); "
                                 f"choose another directory or resume it with resume={run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, run_dir)
        if resume_from is None:
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        else:
            print(f"resuming {run_dir} from step {ckpt.read_meta(resume_from)['step']}", file=sys.stderr)
        row = trainer.run(resume_from=resume_from, run_id=run_id)
    except TrainingError as e:
        fail(f"{e}. The last good checkpoint is kept in {run_dir / 'checkpoints'}.", EXIT_FAULT)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ckpt.CheckpointError,
            OmegaConfBaseException) as e:
        fail(str(e))
    status = read_status(run_dir) or {}
    if status.get("state") == "interrupted":
        raise SystemExit(128 + 15)
    print(summarize(row, run_dir, status.get("wall_seconds")))
    return row



