"""Loading run directories (metrics.jsonl, config.yaml, status.json) for the analysis."""
from __future__ import annotations


from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.core import names as N
from train.core.rundir import CONFIG_FILE, METRICS_FILE, RECOMPUTED_FILE, read_metrics, read_status


class AnalysisError(Exception):
    """Bad input: reported as one line, without a traceback."""


def _num(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return float("nan")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # "nan" / "inf" as written by the metrics file
        try:
            return float(v)
        except ValueError:
            return float("nan")
    return float("nan")


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    label: str = ""

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
        raise AnalysisError(f"{path}: cannot read ({e})") from None
    for row in rows:
        row.update({k: v for k, v in extra.get(row.get(N.STEP), {}).items() if k not in row})


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise AnalysisError(f"{run_dir}: no {METRICS_FILE}")
    try:
        raw = read_metrics(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path}: cannot read ({e})") from None
    rows = [r for r in raw if isinstance(r, dict) and N.EVENT not in r and N.TOKENS in r]
    rows.sort(key=lambda r: _num(r.get(N.TOKENS)))
    if not rows:
        raise AnalysisError(f"{path}: no checkpoint rows")
    _add_recomputed(run_dir, rows)
    config, status = {}, {}
    if (run_dir / CONFIG_FILE).is_file():
        try:
            import yaml

            config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        except Exception:  # noqa: BLE001 - a broken config only loses labels
            config = {}
    status = read_status(run_dir) or {}
    return Run(run_dir, rows, config if isinstance(config, dict) else {}, status if isinstance(status, dict) else {},
               label or run_dir.name)


def find_run_dirs(paths: list[str | Path], exclude: Path | None = None) -> list[Path]:
    """Run directories (holding a metrics.jsonl) given run dirs, sweep dirs or metrics files."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise AnalysisError(f"{p}: no such file or directory")
        if p.is_file():
            if p.name != METRICS_FILE:
                raise AnalysisError(f"{p}: not a run directory or {METRICS_FILE}")
            found.append(p.parent)
            continue
        hits = sorted(m.parent for m in p.rglob(METRICS_FILE)
                      if "wandb" not in m.relative_to(p).parts
                      and not (exclude and _is_within(m, exclude)))
        if not hits:
            raise AnalysisError(f"{p}: no {METRICS_FILE} found in it or below it")
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
