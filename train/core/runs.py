"""The run reader: everything a tool reads from a run directory (its layout: train/core/rundir.py).

    run = open_run(RUN_DIR)      (or Run(RUN_DIR); load_run / load_runs for the analysis)
    run.rows                     metrics.jsonl's checkpoint rows, sorted by tokens, events dropped,
                                 recomputed.jsonl's extra keys joined
    run.config, run.status       config.yaml as a plain dict (labels), status.json
    run.checkpoints()            every checkpoint, oldest first: Checkpoint(step, tokens, path, has_weights, meta)
    run.with_weights()           those with model weights (RunError when there is none)
    run.checkpoint(step)         the checkpoint with weights at `step` (the newest when None)
    run.load_model(checkpoint)   its model and meta.json; run.load_weights(model, checkpoint)
    run.saved_config()           the run's config, validated (train/core/saved_config.py load_saved_config)
    run.probes()                 the probes exactly as training built them (built once)
    run.tokenizer_dir            text runs: the tokenizer that made the token ids
    run.wandb_dir                the run's wandb run directory

Each part is read when first asked for; torch is imported only for models and probes. Every
problem reading a run is a RunError with a one-line message."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.core import names as N
from train.core.rundir import (CHECKPOINTS, CONFIG_FILE, META_FILE, METRICS_FILE, MODEL_FILE, RECOMPUTED_FILE,
                               RUN_MARKERS, TOKENIZER_DIR, CheckpointError, checkpoint_step, list_checkpoints,
                               read_meta, read_metrics, read_status)


FLOAT32_MAX = 3.4028234663852886e38


class RunError(ValueError):
    """A run directory that cannot be read as asked (missing, no such checkpoint, no weights, a
    config that does not load): reported as one line, without a traceback."""


def _num(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return float("nan")
    if isinstance(v, (int, float)):  # beyond float32's range (inf aside): no measurement of a run's
        return float(v) if abs(v) <= FLOAT32_MAX or (isinstance(v, float) and math.isinf(v)) else float("nan")
    if isinstance(v, str):  # "nan" / "inf" as written by the metrics file
        try:
            return _num(float(v))
        except ValueError:
            return float("nan")
    return float("nan")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint: its step, tokens, directory, whether it holds model weights
    (model.safetensors; a run with checkpoint.save_weights=false keeps them only for resuming)
    and its meta.json."""
    step: int
    tokens: int | None
    path: Path
    has_weights: bool
    meta: dict[str, Any] = field(repr=False, compare=False)


class Run:
    """A run directory (module docstring). `rows`, `config` and `status` may be given instead of
    read (the live detector's rows in memory, a synthetic run in tests)."""

    def __init__(self, path: str | Path | None = None, rows: list[dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
                 label: str | None = None):
        self.path = Path(path) if path is not None else None
        self._rows, self._config, self._status = rows, config, status
        self.label = label or (self.path.name if self.path else "")
        self._checkpoints: list[Checkpoint] | None = None
        self._saved_config = None
        self._probes = None

    # -- rows, config.yaml, status.json --------------------------------------------------------
    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = read_rows(self._dir())
        return self._rows

    @property
    def config(self) -> dict[str, Any]:
        """config.yaml as a plain dict ({} when absent or unreadable: it only labels the run)."""
        if self._config is None:
            self._config = {}
            if self.path is not None and (self.path / CONFIG_FILE).is_file():
                try:
                    from train.core.saved_config import read_config_file

                    config = read_config_file(self.path / CONFIG_FILE)
                except Exception:  # noqa: BLE001 - a broken config only loses labels
                    config = None
                self._config = config if isinstance(config, dict) else {}
        return self._config

    @property
    def status(self) -> dict[str, Any]:
        if self._status is None:
            status = read_status(self.path) if self.path is not None else None
            self._status = status if isinstance(status, dict) else {}
        return self._status

    @property
    def n_layers(self) -> int | None:
        n = (self.config.get("model") or {}).get("n_layers")
        if n is None:
            layers = [p[1] for k in self.rows[-1] if (p := N.parse_head_key(k))] if self.rows else []
            n = 1 + max(layers) if layers else None
        return n

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def group(self) -> str:
        n = self.n_layers
        return f"{n} layer{'s' if n != 1 else ''}" if n is not None else "unknown"

    @property
    def tokens(self) -> np.ndarray:
        return self.series(N.TOKENS)

    def series(self, key: str) -> np.ndarray:
        return np.array([_num(r.get(key)) for r in self.rows], dtype=float)

    def has(self, key: str) -> bool:
        return any(key in r for r in self.rows)

    def head_names(self, metric: str) -> list[str]:
        """Sorted head names ("L1H0", ...) that have `metric` in any row."""
        return [N.head_name(l, h) for l, h in self._heads(metric)]

    def head_series(self, metric: str) -> dict[str, np.ndarray]:
        return {N.head_name(l, h): self.series(N.head_key(metric, l, h)) for l, h in self._heads(metric)}

    def _heads(self, metric: str) -> list[tuple[int, int]]:
        return sorted({h for r in self.rows for h in N.heads_in(r, metric)})

    def per_position_loss(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens [C], loss [C, n_positions]) over checkpoints that have a full vector."""
        key = N.PER_POSITION_LOSS
        rows = [r for r in self.rows if isinstance(r.get(key), list)]
        if not rows:
            return None
        n = max(len(r[key]) for r in rows)
        rows = [r for r in rows if len(r[key]) == n]
        mat = np.array([[_num(v) for v in r[key]] for r in rows], dtype=float)
        return np.array([_num(r.get(N.TOKENS)) for r in rows]), mat

    @property
    def wandb_run_id(self) -> str | None:
        return self.status.get("wandb_run_id")

    @property
    def wandb_dir(self) -> Path | None:
        """The newest wandb run directory of this run (RUN_DIR/wandb/*run-*-ID), or None."""
        wdir = self.path / "wandb" if self.path is not None else None
        if not self.wandb_run_id or wdir is None or not wdir.is_dir():
            return None
        hits = sorted(wdir.glob(f"*run-*-{self.wandb_run_id}"))
        return hits[-1] if hits else None

    @property
    def tokenizer_dir(self) -> Path | None:
        """Text runs: RUN_DIR/tokenizer/ (transformers.PreTrainedTokenizerFast); else None."""
        path = self.path / TOKENIZER_DIR if self.path is not None else None
        return path if path is not None and path.is_dir() else None

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self, weights: bool = False) -> list[Checkpoint]:
        """The run's complete checkpoints, oldest first (only those with weights when `weights`)."""
        if self._checkpoints is None:
            self._checkpoints = []
            for path in list_checkpoints(self._dir()):
                try:
                    meta = read_meta(path)
                except CheckpointError as e:
                    raise RunError(_one_line(e)) from None
                tokens = meta.get("tokens")
                self._checkpoints.append(Checkpoint(checkpoint_step(path), tokens if isinstance(tokens, int) else None,
                                                    path, (path / MODEL_FILE).is_file(), meta))
        return [c for c in self._checkpoints if c.has_weights or not weights]

    def with_weights(self) -> list[Checkpoint]:
        """The checkpoints with weights, oldest first; RunError when there is none."""
        saved = self.checkpoints(weights=True)
        if not saved:
            if not self.checkpoints():
                raise RunError(f"{self.path} has no checkpoints (expected {self.path / CHECKPOINTS}/step_*)")
            raise RunError(f"no checkpoint of {self.path} has weights ({MODEL_FILE}); the run was trained "
                           f"with checkpoint.save_weights=false")
        return saved

    def checkpoint(self, step: int | None = None) -> Checkpoint:
        """The checkpoint with weights at `step` (the newest when None); RunError listing the
        steps there are when there is none at `step`."""
        saved = self.with_weights()
        if step is None:
            return saved[-1]
        for c in saved:
            if c.step == step:
                return c
        raise RunError(f"{self.path} has no checkpoint with weights at step {step}; steps: "
                       f"{', '.join(str(c.step) for c in saved)}")

    def load_model(self, checkpoint: Checkpoint | int | None = None, device: Any = "cpu"):
        """(model in eval mode on `device`, meta.json) of a checkpoint (a step: `checkpoint(step)`)."""
        from train.core import checkpoint as ckpt

        c = checkpoint if isinstance(checkpoint, Checkpoint) else self.checkpoint(checkpoint)
        try:
            return ckpt.load_model(c.path, device)
        except CheckpointError as e:
            raise RunError(_one_line(e)) from None

    def load_weights(self, model, checkpoint: Checkpoint) -> None:
        """Load a checkpoint's weights into `model` (of the run's shape)."""
        from train.core import checkpoint as ckpt

        try:
            ckpt.load_weights(model, checkpoint.path)
        except CheckpointError as e:
            raise RunError(_one_line(e)) from None

    # -- the saved config and what it builds ---------------------------------------------------
    def saved_config(self):
        """The config the run trained with (a DictConfig, a fresh copy each call): the one in its
        first checkpoint's meta.json, or config.yaml when it has no checkpoint; read as data and
        validated (train/core/saved_config.py load_saved_config)."""
        if self._saved_config is None:

            from train.core.config import ConfigError
            from train.core.saved_config import load_saved_config, read_config_file

            checkpoints = self.checkpoints()
            if checkpoints:
                where = checkpoints[0].path / META_FILE
                if "config" not in checkpoints[0].meta:
                    raise RunError(f"{where} holds no saved config")
                saved = checkpoints[0].meta["config"]
            elif (self._dir() / CONFIG_FILE).is_file():
                where = self.path / CONFIG_FILE
                try:
                    saved = read_config_file(where)
                except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
                    raise RunError(f"cannot read {where}: {_one_line(e)}") from None
            else:
                raise RunError(f"{self.path} has no saved config (no checkpoint, no {CONFIG_FILE})")
            try:
                self._saved_config = load_saved_config(saved, str(where))
            except ConfigError as e:
                raise RunError(_one_line(e)) from None
        return copy.deepcopy(self._saved_config)

    def probes(self):
        """The run's probes (train/core/probes.py Probes), built from its saved config exactly as
        training built them (probes_from_config on `instantiate(cfg.data)`). Built once and the
        same object every call, on the CPU (Probes.to moves it in place)."""
        if self._probes is None:
            from hydra.errors import InstantiationException
            from hydra.utils import instantiate

            from train.core.probes import probes_from_config

            cfg = self.saved_config()
            try:
                self._probes = probes_from_config(instantiate(cfg.data), cfg.data.n_ctx, cfg.probes)
            except (InstantiationException, OSError, ValueError) as e:
                cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
                raise RunError(f"{self.path}: cannot rebuild the run's probes ({_one_line(cause)})") from None
        return self._probes

    def _dir(self) -> Path:
        if self.path is None:
            raise RunError("a run held in memory has no directory to read")
        return self.path


def _add_recomputed(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Keys that `python -m analysis.recompute` wrote to RUN_DIR/recomputed.jsonl and the run's
    own rows lack (e.g. the LLC, computed after training) join the rows of the same step; the
    training-time values win where both have a key."""
    path = run_dir / RECOMPUTED_FILE
    if not path.is_file():
        return
    try:
        extra = {r.get(N.STEP): r for r in read_metrics(path) if isinstance(r, dict)}
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read ({e})") from None
    for row in rows:
        row.update({k: v for k, v in extra.get(row.get(N.STEP), {}).items() if k not in row})


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The checkpoint rows of a run (Run.rows)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {METRICS_FILE}")
    try:
        raw = read_metrics(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read ({e})") from None
    rows = [r for r in raw if isinstance(r, dict) and N.EVENT not in r and N.TOKENS in r]
    rows.sort(key=lambda r: _num(r.get(N.TOKENS)))
    if not rows:
        raise RunError(f"{path}: no checkpoint rows")
    _add_recomputed(Path(run_dir), rows)
    return rows


def open_run(run_dir: str | Path) -> Run:
    """The run in `run_dir`; RunError when that is not a run directory (none of config.yaml,
    metrics.jsonl, status.json, checkpoints/ in it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"no run directory at {run_dir}")
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise RunError(f"{run_dir} is not a run directory (it has none of {', '.join(RUN_MARKERS)})")
    return Run(run_dir)


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """The run in `run_dir` with its rows read (RunError when it has none)."""
    run = Run(run_dir, label=label)
    run.rows  # noqa: B018 - read now: a missing or unreadable metrics.jsonl is reported here
    return run


def find_run_dirs(paths: list[str | Path], exclude: Path | None = None) -> list[Path]:
    """Run directories (holding a metrics.jsonl) given run dirs, sweep dirs or metrics files."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise RunError(f"{p}: no such file or directory")
        if p.is_file():
            if p.name != METRICS_FILE:
                raise RunError(f"{p}: not a run directory or {METRICS_FILE}")
            found.append(p.parent)
            continue
        hits = sorted(m.parent for m in p.rglob(METRICS_FILE)
                      if "wandb" not in m.relative_to(p).parts
                      and not (exclude and _is_within(m, exclude)))
        if not hits:
            raise RunError(f"{p}: no {METRICS_FILE} found in it or below it")
        found.extend(hits)
    unique = list(dict.fromkeys(d.resolve() for d in found))
    return unique


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def load_runs(paths: list[str | Path], exclude: Path | None = None) -> list[Run]:
    dirs = find_run_dirs(paths, exclude)
    runs = [load_run(d) for d in dirs]
    # Labels: the config name where it is unique, else the path relative to the common root.
    names = [(r.config.get("name") or r.path.name) for r in runs]
    common = Path(_common_root(dirs))
    for r, name in zip(runs, names):
        if names.count(name) == 1:
            r.label = str(name)
        else:
            rel = r.path.relative_to(common) if r.path != common else Path(r.path.name)
            r.label = f"{name} [{rel}]" if str(rel) != "." else str(name)
    return runs


def _common_root(dirs: list[Path]) -> str:
    import os

    return os.path.commonpath([str(d) for d in dirs]) if dirs else "."


def default_out_dir(paths: list[str | Path]) -> Path:
    """<dir>/report for one input directory; <common parent>/report for several."""
    ps = [Path(p).resolve() for p in paths]
    ps = [p.parent if p.is_file() else p for p in ps]
    if len(ps) == 1:
        return ps[0] / "report"
    return Path(_common_root(ps)) / "report"
