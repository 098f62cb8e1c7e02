"""The run reader (train/core/runs.py Run) on real tiny runs: checkpoints with and without weights
match the metrics rows, the probes are the ones the Trainer builds, a text run's tokenizer, and
one-line errors (a missing step, no weights, not a run) from the reader and the commands."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, compose_config, one_line_error, train_run
from tests.presets import EXTRA_CALLBACKS_OFF, SIX_STEPS
from train.core import names as N
from train.core import rundir
from train.core.runs import Run, RunError, load_run, open_run

TINY = [*SIX_STEPS, *EXTRA_CALLBACKS_OFF]
NO_WEIGHTS = TINY + ["checkpoint.save_weights=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("tiny") / "run", TINY)


@pytest.fixture(scope="module")
def no_weights(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("noweights") / "run", NO_WEIGHTS)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny run on natural text (CPython's help texts, a BPE trained here; no network)."""
    import pydoc_data.topics as topics

    root = tmp_path_factory.mktemp("text")
    corpus = root / "help.txt"
    corpus.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60_000])
    overrides = ["data=text", f"data.source={corpus}", f"data.cache_dir={root / 'cache'}", "data.vocab_size=300",
                 "data.n_ctx=64", "model.d_model=32", "train.batch_size=4", "train.total_tokens=768",
                 "checkpoint.first_tokens=256", "checkpoint.n_log=2", "checkpoint.n_linear=1", "probes.n_heldout=8",
                 "logger=none", "device=cpu"]
    return train_run(root / "run", overrides), overrides


def _steps_and_tokens(run_dir):
    return [(r[N.STEP], r[N.TOKENS]) for r in rundir.read_metrics(run_dir) if N.EVENT not in r]


def test_checkpoints_are_the_rows_checkpoints_with_their_weights(tiny):
    run = open_run(tiny)
    assert [(c.step, c.tokens) for c in run.checkpoints()] == _steps_and_tokens(tiny)
    assert all(c.has_weights for c in run.checkpoints()) and run.checkpoints(weights=True) == run.checkpoints()
    last = run.checkpoint()
    assert last == run.checkpoints()[-1] and run.checkpoint(last.step) == last
    model, meta = run.load_model(run.checkpoints()[1])
    assert meta["step"] == run.checkpoints()[1].step and not model.training
    run.load_weights(model, last)
    from train.core.checkpoint import load_model

    reference, _ = load_model(last.path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_run_without_weights_keeps_them_only_for_resuming(no_weights):
    run = open_run(no_weights)
    everything = run.checkpoints()
    assert [(c.step, c.tokens) for c in everything] == _steps_and_tokens(no_weights)
    kept = run.checkpoints(weights=True)
    assert [c.step for c in kept] == [everything[-1].step]  # keep_resume_states=1: the newest one
    assert [c.has_weights for c in everything] == [(c.path / rundir.MODEL_FILE).is_file() for c in everything]
    with pytest.raises(RunError) as e:
        run.checkpoint(everything[0].step)
    assert str(e.value) == (f"{no_weights} has no checkpoint with weights at step {everything[0].step}; "
                            f"steps: {everything[-1].step}")


@pytest.mark.slow
def test_probes_are_the_ones_training_built(tiny, text_run, tmp_path):
    from train.loop import Trainer

    text_dir, text_overrides = text_run
    for run_dir, overrides in ((tiny, TINY), (text_dir, text_overrides)):
        ours, theirs = Run(run_dir).probes(), Trainer(compose_config(overrides), tmp_path / run_dir.name).probes
        for name in ("repeated", "copy_tokens", "heldout", "allowed"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), (run_dir, name)
        assert (ours.period, ours.repeats) == (theirs.period, theirs.repeats)
        assert (ours.heldout_mixture is None) == (theirs.heldout_mixture is None)
        if ours.heldout_mixture is not None:
            assert torch.equal(ours.heldout_mixture, theirs.heldout_mixture)


def test_saved_config_is_the_runs_and_a_fresh_copy(tiny):
    run = open_run(tiny)
    cfg = run.saved_config()
    assert cfg.model.d_model == 32 == run.config["model"]["d_model"] and cfg.probes.n_heldout == 16
    cfg.model.d_model = 7
    assert run.saved_config().model.d_model == 32


def test_text_run_keeps_its_tokenizer(text_run, tiny):
    from transformers import PreTrainedTokenizerFast

    run_dir, _ = text_run
    run = open_run(run_dir)
    assert run.tokenizer_dir == run_dir / rundir.TOKENIZER_DIR
    tok = PreTrainedTokenizerFast.from_pretrained(str(run.tokenizer_dir))
    assert len(tok) == 300 and int(run.probes().heldout.max()) < 300
    assert open_run(tiny).tokenizer_dir is None


def test_wandb_dir_is_the_newest_of_the_runs_id(tmp_path):
    (tmp_path / rundir.STATUS_FILE).write_text(json.dumps({"state": "finished", "wandb_run_id": "abc"}))
    for name in ("offline-run-20260101_000000-abc", "run-20260102_000000-abc", "run-20260103_000000-xyz"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert open_run(tmp_path).wandb_dir == tmp_path / "wandb" / "run-20260102_000000-abc"
    (tmp_path / rundir.STATUS_FILE).write_text(json.dumps({"state": "finished", "wandb_run_id": None}))
    assert open_run(tmp_path).wandb_dir is None


def test_reading_rows_needs_no_torch(tiny):
    code = (f"import sys; from train.core.runs import load_run; run = load_run({str(tiny)!r}); "
            "print(len(run.rows), len(run.checkpoints()), run.status['state'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n = len(_steps_and_tokens(tiny))
    assert out.stdout.split() == [str(n), str(n), "finished", "False"]
    assert len(load_run(tiny).rows) == n


# -- one-line errors ------------------------------------------------------------------------------
def _without_weights(run_dir, dst):
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(rundir.MODEL_FILE, rundir.STATE_FILE))
    return dst


@pytest.mark.parametrize("case", ["missing", "not_a_run", "no_checkpoints", "no_weights", "step"])
def test_run_errors_are_one_line_in_every_command(case, tiny, tmp_path, capsys):
    from analysis.export import main as export
    from analysis.llc_calibrate import main as calibrate
    from analysis.recompute import main as recompute

    run_dir, step = tmp_path / "run", []
    if case == "not_a_run":
        run_dir.mkdir()
        expected = f"{run_dir} is not a run directory"
    elif case == "no_checkpoints":
        shutil.copytree(tiny, run_dir, ignore=shutil.ignore_patterns(rundir.CHECKPOINTS))
        expected = f"{run_dir} has no checkpoints"
    elif case == "no_weights":
        _without_weights(tiny, run_dir)
        expected = f"no checkpoint of {run_dir} has weights"
    elif case == "step":
        run_dir, step = tiny, ["--step", "12345"]
        steps = ", ".join(str(c.step) for c in open_run(tiny).checkpoints())
        expected = f"{tiny} has no checkpoint with weights at step 12345; steps: {steps}"
    else:
        expected = f"no run directory at {run_dir}"
    commands = [(export, ["--out", str(tmp_path / "out"), *step]), (calibrate, step)]
    if not step:
        commands.append((recompute, ["--out", str(tmp_path / "re.jsonl")]))
    for main, more in commands:
        assert main([str(run_dir), *more]) == 2, main.__module__
        assert one_line_error(capsys.readouterr().err).startswith(f"error: {expected}"), main.__module__
    assert not (tmp_path / "out").exists() and not (tmp_path / "re.jsonl").exists()
