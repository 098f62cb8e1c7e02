import os
import sys

# Compiled bytecode is cached (Python's default) even where the environment turns it off: the
# tests start about a hundred Python processes, and each would otherwise compile torch's and
# transformers' modules from source again (seconds per process on a 2-core machine).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite runs in two worker processes (pyproject: pytest-xdist's -n 2): one torch thread each,
# so the two never fight over the cores (and every process, subprocesses included, has one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Tests never reach the network: wandb stays offline, Hugging Face stays offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a test module: bit-identical CPU results need the same thread count
    in every process, and training subprocesses run with one (tests/helpers.py cli_env)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def adaptive_run(tmp_path_factory):
    """A finished run under adaptive checkpoint density (tests/presets.py ADAPTIVE_TINY, the basic
    callbacks), trained in this process with one thread: what the adaptive resume and torchrun
    tests must reproduce."""
    from tests.presets import ADAPTIVE_TINY
    from tests.reliability import drop_extra_callbacks, train_in_process

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_in_process(tmp_path_factory.mktemp("adaptive") / "run", ADAPTIVE_TINY + drop_extra_callbacks())
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def two_layer_run(tmp_path_factory):
    """A real short 2-layer training run (shared by every test that needs one)."""
    from tests.helpers import train_run
    from tests.presets import SHORT_RUN

    return train_run(tmp_path_factory.mktemp("run2L"), SHORT_RUN + ["model.n_layers=2"])


@pytest.fixture(scope="session")
def one_layer_run(tmp_path_factory):
    """The 1-layer control of `two_layer_run`, same data and schedule."""
    from tests.helpers import train_run
    from tests.presets import SHORT_RUN

    return train_run(tmp_path_factory.mktemp("run1L"), SHORT_RUN + ["model.n_layers=1"])


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    """A finished run made by hand (tests/victims.py hand_run: three checkpoints, no training)."""
    from tests.victims import hand_run

    return hand_run(tmp_path_factory.mktemp("made") / "run")


@pytest.fixture
def a_run(made_run, tmp_path):
    """A copy of `made_run` of the test's own, to damage or to write into."""
    import shutil

    return shutil.copytree(made_run, tmp_path / "run", symlinks=True)
