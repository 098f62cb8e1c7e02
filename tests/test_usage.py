"""The command line before Hydra starts (train/usage.py): overrides that do not compose fail with
one line, a "did you mean" where a known name is close, exit 2 and nothing written; `--help` is
the tool's own. And the run's console lines in its Hydra log (train/console_log.py)."""
from __future__ import annotations

import logging
import sys

import pytest

from tests.helpers import cli
from train import usage
from train.console_log import console_to_log

CASES = [  # (overrides, the one line's text)
    (["experiment=text_cpuu", "data.source=corpus.txt"], "unknown experiment option 'text_cpuu'; did you mean text_cpu?"),
    (["experiment=foo"], "unknown experiment option 'foo' (experiment: definitions, hoogland_2l"),
    (["model.nlayers=3"], "model.nlayers: no key 'nlayers' in model; did you mean n_layers?"),
    (["+model.nlayers=3"], "model.nlayers: no key 'nlayers' in model; did you mean n_layers?"),
    (["modell=attn_only"], "no group or key 'modell'; did you mean model?"),
    (["data.source=corpus.txt"], "data.source belongs to data=text, not to the chosen data source (data=repeats)"),
    (["data=text", "data.path=x.npy"], "data.path belongs to data=tokens"),
    (["data=txt"], "unknown data option 'txt'; did you mean text? (data: repeats, text, tokens)"),
    (["callbacks.attentoin.every=2"], "no callback 'attentoin' in the config; did you mean attention?"),
    (["model.n_layers=two"], "model.n_layers=two: Value 'two' of type 'str' could not be converted to Integer"),
]


def _refused(overrides: list[str]) -> str:
    with pytest.raises(usage.UsageError) as e:
        usage.check(overrides)
    return str(e.value)


def test_a_misspelled_preset_is_refused_with_a_suggestion():
    assert _refused(["experiment=text_cpuu"]).startswith("unknown experiment option 'text_cpuu'; did you mean text_cpu?")
    usage.check(["model.n_layers=1", "logger=none", "hydra.run.dir=/nowhere"])  # fine: no error


@pytest.mark.slow
@pytest.mark.parametrize("overrides,line", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_each_kind_of_mistake_is_one_line(overrides, line):
    assert line in _refused(overrides)


@pytest.mark.slow
def test_a_sweep_is_checked_value_by_value():
    assert "did you mean text_cpu?" in _refused(["-m", "experiment=smoke,text_cpuu", "seed=0,1"])
    assert "did you mean n_heads?" in _refused(["--multirun", "model.n_layers=1,2", "model.nheads=3"])
    usage.check(["-m", "model.n_layers=1,2,3", "seed=0,1", "+callbacks.extra=null"])


def test_hydra_alone_handles_its_own_flags():
    assert usage.split_argv(["--cfg", "job", "model.n_layers=1", "hydra.run.dir=x"]) == (["model.n_layers=1"], False)
    assert usage.split_argv(["--info", "config"])[0] is None
    assert usage.split_argv(["-m", "seed=0,1", "hydra/launcher=parallel"]) == (["seed=0,1"], True)


def test_help_names_what_a_new_user_needs():
    text = usage.help_text()
    for needed in ("model.n_layers=1", "experiment=NAME", "text_cpu ", "smoke ", "outputs/DATE/TIME-PID/",
                   "python -m analysis RUN_DIR", "analysis.by_config", "--hydra-help", "repeats (default), text, tokens"):
        assert needed in text, needed
    assert "Natural text on a laptop CPU" in text and "Hoogland et al. 2024's two-layer" in text


@pytest.mark.slow
def test_the_command_line_refuses_before_writing_anything(tmp_path):
    for args in (["experiment=text_cpuu", "data.source=corpus.txt"], ["model.nlayers=3"], ["modell=attn_only"]):
        proc = cli("logger=none", *args, f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
        assert "did you mean" in proc.stderr and not (tmp_path / "run").exists()
    proc = cli("--help", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("python -m train") and "Hydra" in proc.stdout


def test_console_lines_go_to_the_log_file(tmp_path, capsys):
    handler = logging.FileHandler(tmp_path / "__main__.log")
    handler.setFormatter(logging.Formatter("[%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with console_to_log():
            print("run directory: /somewhere")
            sys.stderr.write("progress 10%\rprogress 55%\rprogress 100%\n")
            print("error: one line", file=sys.stderr)
            sys.stdout.write("no newline yet")
    finally:
        root.removeHandler(handler)
        handler.close()
    assert (tmp_path / "__main__.log").read_text().splitlines() == [
        "[INFO] - run directory: /somewhere", "[WARNING] - progress 100%", "[WARNING] - error: one line"]
    out, err = capsys.readouterr()
    assert out == "run directory: /somewhere\nno newline yet" and "progress 55%" in err  # the console is unchanged
