"""`train.compile=true`: the training step runs through torch.compile of the model; the callbacks,
checkpoints and metrics are those of an uncompiled run (losses equal to float rounding)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.helpers import compose_config
from tests.presets import SMOKE
from train.core import rundir
from train.cli import run



def _keys(checkpoint) -> list[str]:
    with safe_open(str(checkpoint / rundir.MODEL_FILE), "pt") as fh:
        return sorted(fh.keys())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_thread):
    """The smoke run without and with train.compile; the modules torch.compile was given."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("torch.compile on the CPU needs a C compiler (cc or gcc) on PATH")
    root = tmp_path_factory.mktemp("compile")
    run(compose_config(SMOKE), root / "plain")
    compiled, real = [], torch.compile

    def recording(module, *args, **kwargs):
        compiled.append(module)
        return real(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", recording)
        run(compose_config([*SMOKE, "train.compile=true"]), root / "compiled")
    return root / "plain", root / "compiled", compiled


@pytest.mark.slow
def test_compiled_run_trains_like_the_plain_one(runs):
    plain, compiled, modules = runs
    assert len(modules) == 1 and type(modules[0]).__name__ == "AttnOnlyTransformer"  # the model, once
    rows, reference = rundir.read_metrics(compiled), rundir.read_metrics(plain)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] and len(rows) == 13
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        for key in ("loss/train", "loss/heldout", "icl_score", "prefix_matching/L1H0"):
            if key in ref:  # loss/train: from the second checkpoint on
                assert math.isclose(row[key], ref[key], rel_tol=1e-3, abs_tol=1e-4), (row["step"], key)
    assert rundir.read_status(compiled)["state"] == "finished"


@pytest.mark.slow
def test_compiled_run_saves_the_plain_models_weights(runs):
    plain, compiled, _ = runs
    names = [d.name for d in rundir.list_checkpoints(plain)]
    assert [d.name for d in rundir.list_checkpoints(compiled)] == names
    for name in (names[0], names[-1]):
        keys = _keys(compiled / rundir.CHECKPOINTS / name)
        assert keys == _keys(plain / rundir.CHECKPOINTS / name)
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
