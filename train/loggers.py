"""Where checkpoint rows go besides metrics.jsonl (which train/core/rundir.py always writes: it is the
run's record): a logger chosen by config (`logger=wandb` or `logger=none`) receives the same rows."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from train.core import names as N
from train.core.wandb_env import wandb_credentials_present
from train.core.config import WANDB_MODES
from train.core.config import LoggerConfig as _Defaults

def heatmap_pixels(table: list[list[float]], cell: int = 24):
    """A per-head table [n_layers][n_heads] in [0, 1] as an RGB uint8 image (viridis; layers are
    rows, L0 at the top, heads are columns), one
    `cell` x `cell` block per head: cheap enough to log at every checkpoint."""
    import numpy as np
    from matplotlib import colormaps

    values = np.nan_to_num(np.clip(np.asarray(table, dtype=float), 0.0, 1.0))
    rgb = (colormaps["viridis"](values)[..., :3] * 255).astype(np.uint8)
    return rgb.repeat(cell, axis=0).repeat(cell, axis=1)


class NullLogger:
    """`logger=none`: nothing beyond metrics.jsonl."""

    def __init__(self, **_: Any):
        pass

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> str | None:
        return None

    def log(self, row: dict[str, Any]) -> None:
        pass

    def phase_change(self, summary: dict[str, Any], alert: str | None = None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _server_unreachable(timeout: float = 3.0) -> str | None:
    """None if a TCP connection to the wandb server (or the HTTPS proxy in between) opens within
    `timeout` seconds, else a description of what failed. Without this pre-flight an unreachable
    server holds `wandb.init` for its whole retry period."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    server = urlsplit(base if "://" in base else f"https://{base}")
    if not server.hostname:
        return None  # cannot tell: let wandb try
    proxy = urllib.request.getproxies().get(server.scheme or "https")
    if proxy and urllib.request.proxy_bypass(server.hostname):
        proxy = None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else server
    host = parts.hostname
    if not host:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{'proxy' if proxy else 'server'} {host}:{port} ({e.strerror or type(e).__name__})"


def overview(row: dict[str, Any]) -> dict[str, float]:
    """The key scalars of a row, for the first wandb section ("overview/..."): held-out loss, ICL
    score, the max prefix-matching score of each layer, and the induction-head counts."""
    out = {}
    for key in (N.LOSS_HELDOUT, N.ICL_SCORE):
        if isinstance(row.get(key), (int, float)):
            out[N.overview_key(key)] = row[key]
    for layer, values in enumerate(N.head_table(row, N.PREFIX_MATCHING) or []):
        finite = [v for v in values if isinstance(v, (int, float)) and v == v]
        if finite:
            out[N.overview_layer_max_key(N.PREFIX_MATCHING, layer)] = max(finite)
    for part in (N.BEHAVIORAL, N.MECHANISTIC, N.BOTH):
        key = N.part_key(N.INDUCTION_HEADS, part)
        if isinstance(row.get(key), (int, float)):
            out[N.overview_key(key)] = row[key]
    return out


def family_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{metric: {head (or head pair): [(tokens, value), ...]}} of every per-head and per-pair key."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        for key, value in row.items():
            parsed = N.parse_family_key(key)
            if parsed and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(parsed[0], {}).setdefault(parsed[1], []).append((row[N.TOKENS], value))
    return out


class WandbLogger:
    """Weights & Biases: online when logged in, offline otherwise (prints the `wandb sync`
    command: `wandb sync RUN_DIR/wandb` uploads every offline segment of the run, one per start
    or resume, in order). The x-axis of every metric is tokens seen. What the workspace shows: a first
    section "overview" with the key scalars (`overview`); one chart per per-head (or per-pair)
    family, every head a line ("charts/prefix_matching", ...; when the phase change is found, at
    the end, and every `charts_every` checkpoints if that is not 0: building them costs wandb about
    1 ms per point), while the single per-head keys stay in the history under their row keys
    (train/core/names.py) but get no panel of their own; the layers x heads heatmap image of prefix
    matching per checkpoint; the phase change in the run summary ("phase_change/...") and an
    alert when it is found. In a sweep the runs of one sweep share a group (the sweep directory)
    and carry their overrides as tags."""

    def __init__(self, project: str = _Defaults.project, entity: str | None = _Defaults.entity,
                 group: str | None = _Defaults.group, tags: Sequence[str] = (), mode: str = _Defaults.mode,
                 heatmap_every: int = _Defaults.heatmap_every, charts_every: int = _Defaults.charts_every,
                 init_timeout: float = 30.0, **_: Any):
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags or [])
        self.mode, self.heatmap_every, self.charts_every = mode, max(1, heatmap_every), max(0, charts_every)
        # wandb's own default is 90 s of retries; once the server answered the pre-flight
        # connection, 30 s is plenty, and bounds how long training can be held up.
        self.init_timeout = init_timeout
        self.run = None
        self._n_logged = 0
        self._rows: list[dict[str, Any]] = []  # per-head values and tokens, for the family charts
        self._hidden: set[str] = set()

    def _resolve_mode(self) -> str:
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode in ("offline", "disabled", "online"):
            return env_mode
        if self.mode != "auto":
            return self.mode
        return "online" if wandb_credentials_present() else "offline"

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> str | None:
        """Start (or, given `run_id`, resume) the wandb run. Never raises and never stalls long:
        online falls back to offline when the server cannot be reached, offline to no wandb
        logging at all (metrics.jsonl is always written)."""
        try:
            import wandb
        except Exception as e:  # noqa: BLE001
            _warn(f"wandb: cannot import wandb ({_one_line(e)}); logging to metrics.jsonl only")
            return run_id
        mode = self._resolve_mode()
        if mode == "disabled":
            return run_id
        from train.sweep import sweep_group_and_tags

        group, tags = sweep_group_and_tags()
        kwargs = dict(project=self.project, entity=self.entity, group=self.group or group,
                      tags=list(dict.fromkeys([*self.tags, *tags])),
                      config=config, dir=str(run_dir), name=config.get("name"), id=run_id,
                      resume="allow" if run_id else None, reinit="finish_previous")
        if mode == "online":
            problem = _server_unreachable()
            if problem:
                _warn(f"wandb: cannot reach {problem}; logging offline instead")
                mode = "offline"
        if mode == "online":
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=self.init_timeout, silent=True),
                                      **kwargs)
            except Exception as e:  # noqa: BLE001 - wandb must never stop training
                _warn(f"wandb: could not start online ({type(e).__name__}: {_one_line(e)}); logging offline instead")
                mode = "offline"
        if mode == "offline":
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(silent=True), **kwargs)
            except Exception as e:  # noqa: BLE001
                _warn(f"wandb: could not start offline either ({type(e).__name__}: {_one_line(e)}); "
                      f"logging to metrics.jsonl only")
                self.run = None
                return run_id
        self.mode_used = mode
        try:
            self.run.define_metric(N.TOKENS)
            self.run.define_metric("*", step_metric=N.TOKENS)
        except Exception as e:  # noqa: BLE001
            _warn(f"wandb: define_metric failed ({_one_line(e)})")
        return self.run.id

    def log(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        data |= overview(row)
        self._rows.append({k: v for k, v in data.items() if k == N.TOKENS or N.parse_family_key(k)})
        try:
            for key in data.keys() - self._hidden:
                if N.parse_family_key(key):  # shown in its family's chart, not in a panel of its own
                    self.run.define_metric(key, step_metric=N.TOKENS, hidden=True)
                    self._hidden.add(key)
            if self._n_logged % self.heatmap_every == 0:
                image = self._heatmap(row)
                if image is not None:
                    data[N.HEATMAP] = image
            if self.charts_every and (self._n_logged + 1) % self.charts_every == 0:
                data |= self._charts()
            self._n_logged += 1
            self.run.log(data)
        except Exception as e:  # noqa: BLE001 - a logging failure must not stop training
            _warn(f"wandb: logging failed ({type(e).__name__}: {_one_line(e)}); "
                  f"no more wandb logging in this run, metrics.jsonl continues")
            self.run = None

    def _charts(self) -> dict[str, Any]:
        """One line chart per family, every head (or head pair) a line against tokens."""
        import wandb

        charts = {}
        for metric, members in family_series(self._rows).items():
            names = sorted(members)
            charts[N.chart_key(metric)] = wandb.plot.line_series(
                xs=[[t for t, _ in members[m]] for m in names], ys=[[v for _, v in members[m]] for m in names],
                keys=names, title=metric, xname=N.TOKENS)
        return charts

    def phase_change(self, summary: dict[str, Any], alert: str | None = None) -> None:
        """Write the detected window into the run summary; with `alert`, also send it as an alert."""
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                self.run.summary[key] = value
            if alert:
                import wandb

                self.run.log(self._charts())  # the family charts as they are when the phase change is found
                self.run.alert(title="phase change", text=alert, level=wandb.AlertLevel.INFO)
        except Exception as e:  # noqa: BLE001 - wandb must not stop training
            _warn(f"wandb: could not record the phase change ({type(e).__name__}: {_one_line(e)})")

    def _heatmap(self, row: dict[str, Any]):
        import wandb

        table = N.head_table(row, N.PREFIX_MATCHING)
        if table is None:
            return None
        return wandb.Image(heatmap_pixels(table), caption=f"prefix matching, layers (rows, L0 at the top) "
                                                           f"x heads, at {row.get(N.TOKENS, 0):,} tokens")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run_dir = getattr(self.run, "dir", None)
        try:
            if self._rows and (not self.charts_every or self._n_logged % self.charts_every):  # charts at the end
                self.run.log(self._charts())
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            _warn(f"wandb: finish failed ({type(e).__name__}: {_one_line(e)})")
        if getattr(self, "mode_used", None) == "offline" and run_dir:
            # RUN_DIR/wandb holds one segment per start or resume (and one of `python -m analysis`):
            # wandb sync uploads each, in order, into the one run
            print(f"wandb: logged offline; upload every segment of this run with: wandb sync "
                  f"{Path(run_dir).parents[1]}", file=sys.stderr)
        self.run = None
