"""Checkpoints: `model.safetensors` + `meta.json` per checkpoint, loadable without pickle, and
`train_state.pt` (optimizer, scheduler, RNG) beside the newest ones for resuming.

Layout of a run directory:
    config.yaml                 resolved config
    metrics.jsonl               one row per checkpoint
    status.json                 {"state": "running" | "finished" | "failed" | "interrupted", ...}
    checkpoints/step_000123/    model.safetensors, meta.json [, train_state.pt]

A checkpoint directory is written under a temporary name and renamed into place, so a directory
named step_* is always complete."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from train.model import AttnOnlyTransformer

MODEL_FILE, META_FILE, STATE_FILE = "model.safetensors", "meta.json", "train_state.pt"
MODEL_KEYS = ("d_vocab", "n_ctx", "n_layers", "n_heads", "d_model", "d_head", "positional",
              "layernorm", "smeared_keys", "init_std", "rotary_base")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted or of another shape."""


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def model_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None, save_weights: bool = True) -> Path:
    final = checkpoint_dir(run_dir, meta["step"])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if save_weights or train_state is not None:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"step": str(meta["step"])})
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    write_json_atomic(tmp / META_FILE, meta)
    for f in tmp.iterdir():  # make the contents durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and not d.name.endswith(".tmp")]
    return sorted(d for d in dirs if (d / META_FILE).is_file())


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint metadata in {ckpt}: {e}") from e


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[AttnOnlyTransformer, dict[str, Any]]:
    """Rebuild the model of a checkpoint directory from its meta.json and safetensors weights."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    model = AttnOnlyTransformer(**model_kwargs(meta["model"]))
    load_weights(model, ckpt)
    return model.to(device).eval(), meta


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / MODEL_FILE
    try:
        weights = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"cannot read {path}: {e}") from e
    expected = model.state_dict()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)


def prune_train_states(run_dir: Path, keep: int) -> None:
    """Delete optimizer state from all but the newest `keep` checkpoints."""
    with_state = [d for d in list_checkpoints(run_dir) if (d / STATE_FILE).exists()]
    for d in with_state[: max(0, len(with_state) - keep)]:
        (d / STATE_FILE).unlink(missing_ok=True)
