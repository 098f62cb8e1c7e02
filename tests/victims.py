"""Victim files for the tests of where tools may write (tests/test_outputs.py, tests/test_hostile*.py):
a user's files whose content, and links whose targets, must not change; a tiny run directory
built by hand (no training: a 1-layer model of width 16 at three checkpoints, the rows of a run
whose induction head forms at 1M tokens, its config and status; conftest.py's `made_run`); and
the tools called in-process as their command lines are."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from tests.helpers import checkpoint_tokens, compose_config, one_line_error, sigmoid
from train.core import names as N
from train.core import rundir
from train.core.checkpoint import save_checkpoint
from train.core.model import AttnOnlyTransformer

HAND_RUN = ["logger=none", "device=cpu", "model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.d_head=8",
            "probes.n_heldout=8", "probes.n_probes=4", "callbacks.attention.n_heldout=8", "callbacks.ablation.n_heldout=8"]


def plant(root: Path, names: tuple[str, ...] = ("precious.txt", "notes/plan.md")) -> Path:
    """A user's files under `root` (made when missing)."""
    for i, name in enumerate(names):
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"a user's file {i}\n")
    return Path(root)


def hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots` (a file itself), a link's target for a link, None for
    a root that is not there: what must not change."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        paths = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.exists():
                out[str(p)] = "absent"
    return out


def hand_run(run_dir: Path, steps: tuple[int, ...] = (0, 3, 6)) -> Path:
    """A finished run directory made by hand (module docstring); `steps` carry checkpoints."""
    cfg = OmegaConf.to_container(compose_config(HAND_RUN), resolve=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = AttnOnlyTransformer(**{k: v for k, v in cfg["model"].items() if k != "_target_"})
    tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["n_ctx"]
    for step in steps:
        save_checkpoint(run_dir, model, {"step": step, "tokens": step * tokens_per_step, "kind": rundir.SCHEDULED,
                                         "model": cfg["model"], "config": cfg})
    t = checkpoint_tokens(4_000_000, 20_000, 30, 10)
    x = np.log(np.maximum(t, 1))
    rise = sigmoid((x - math.log(1e6)) / 0.08)
    rows = [{N.STEP: i, N.TOKENS: int(tok), N.LOSS_HELDOUT: float(3 - 1.5 * (1 - 1 / (1 + tok / 1e5)) - 0.5 * r),
             N.ICL_SCORE: float(-0.5 - 0.8 * r), N.head_key(N.PREFIX_MATCHING, 0, 0): float(0.05 + 0.6 * r),
             N.head_key(N.PREFIX_MATCHING, 0, 1): 0.05} for i, (tok, r) in enumerate(zip(t, rise))]
    (run_dir / rundir.METRICS_FILE).write_text("".join(rundir.format_row(r) for r in rows))
    (run_dir / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    rundir.write_status(run_dir, rundir.FINISHED, steps[-1], None)
    return run_dir


def edit_json(path: Path, change) -> None:
    data = json.loads(Path(path).read_text())
    change(data)
    Path(path).write_text(json.dumps(data))


def export(*argv) -> int:
    from analysis.export import main

    return main([str(a) for a in argv])


def report(*argv) -> int:
    from analysis.__main__ import main

    return main([str(a) for a in argv] + ["--no-wandb"])


def refused(code: int, capsys, message: str) -> None:
    assert code == 2
    assert message in one_line_error(capsys.readouterr().err)


def leftovers(root: Path) -> list[str]:
    """The temporaries of this project's writers (hidden names) left under `root`."""
    return sorted(p.name for p in Path(root).rglob(".*") if p.name.endswith((".partial", ".tmp", ".old")))
