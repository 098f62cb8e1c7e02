"""Config composition with Hydra's compose API: every file in conf/, typed-schema errors, and a
multirun sweep launched as a subprocess."""
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from tests.helpers import CONF_DIR, compose_config
from train.core.callbacks import Callback, InductionClassification
from train.core.config import TEXT_DATA, Config
from train.core.data import RepeatsLanguage, build_data
from train.core.probes import build_probes
from train.loggers import WandbLogger
from train.core.model import AttnOnlyTransformer

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """Overrides that give text configs a small corpus (CPython's help texts) and a short context."""
    import pydoc_data.topics as topics

    where = tmp_path_factory.mktemp("text")
    (where / "help.txt").write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60_000])
    return [f"data.source={where / 'help.txt'}", f"data.cache_dir={where / 'cache'}", "data.n_ctx=64",
            "data.vocab_size=400", "probes.icl_early=null", "probes.icl_late=null"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_file_composes_and_builds(group, option, small_text):
    cfg = compose_config([f"{group}={option}"])
    if cfg.data._target_ == TEXT_DATA:  # text needs a corpus
        cfg = compose_config([f"{group}={option}", *small_text])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = instantiate(cfg.model)
    assert isinstance(model, AttnOnlyTransformer)
    assert model.d_vocab == cfg.data.vocab_size and model.n_ctx == cfg.data.n_ctx
    data = instantiate(cfg.data)
    batch = data.batch(0, 2)
    assert batch.shape == (2, cfg.data.n_ctx)
    for cb_cfg in cfg.callbacks.values():
        assert isinstance(instantiate(cb_cfg), Callback)
    instantiate(cfg.logger)


# -- conf/ mirrors the code: a group per schema section, every key shown, the same defaults ----------
SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}


def _default_option(group: str) -> str:
    """The option conf/config.yaml's defaults list picks for a group."""
    for entry in OmegaConf.load(Path(CONF_DIR) / "config.yaml").defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return entry[group]
    raise AssertionError(f"conf/config.yaml picks no option of {group}")


def _signature_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_groups_mirror_the_schema_sections():
    """One config group per section of the schema (train/core/config.py), plus the experiment presets
    and Hydra's launcher presets (conf/hydra/launcher)."""
    assert set(GROUPS) == set(SECTIONS) | {"experiment", "hydra"}


@pytest.mark.parametrize("section", sorted(set(SECTIONS) - {"callbacks"}))
def test_default_group_file_shows_every_key_with_the_schema_default(section):
    schema = OmegaConf.to_container(OmegaConf.structured(SECTIONS[section].default_factory()))
    shown = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / section / f"{_default_option(section)}.yaml"))
    follows_data = {k for k, v in schema.items() if isinstance(v, str) and v.startswith("${")}  # model.d_vocab, n_ctx
    assert set(shown) == set(schema) - follows_data
    for key, value in shown.items():
        assert value == _as_lists(schema[key]), f"conf/{section}: {key}={value!r}, schema default {schema[key]!r}"


@pytest.mark.parametrize("builder,section", [
    (AttnOnlyTransformer, "model"), (RepeatsLanguage, "data"), (build_data, "data"),
    (build_probes, "probes"), (WandbLogger, "logger"),
])
def test_constructors_share_the_schema_defaults(builder, section):
    schema = OmegaConf.to_container(OmegaConf.structured(SECTIONS[section].default_factory()))
    shared = {k: v for k, v in _signature_defaults(builder).items() if k in schema}
    assert shared, builder
    for key, value in shared.items():
        assert _as_lists(value) == schema[key], f"{builder.__name__}({key}={value!r}) but the schema says {schema[key]!r}"


@pytest.mark.parametrize("option", _options("callbacks"))
def test_callback_files_show_every_constructor_argument_with_its_default(option):
    """Every file in conf/callbacks/ lists every argument of every callback it adds with the code's
    default (values that follow another section, ${...}, excepted); its Hydra defaults list (the
    options it extends, checked on their own) aside."""
    from train.core.circuits import Thresholds

    entries = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "callbacks" / f"{option}.yaml"))
    entries.pop("defaults", None)
    assert entries, option
    for name, entry in entries.items():
        cls = get_class(entry["_target_"])
        defaults = _signature_defaults(cls)
        if cls is InductionClassification:  # thresholds: the fields of Thresholds
            defaults |= {f.name: f.default for f in dataclasses.fields(Thresholds)}
        shown = {k: v for k, v in entry.items() if k != "_target_"}
        assert set(shown) == set(defaults), f"callbacks.{name}: {sorted(set(shown) ^ set(defaults))}"
        for key, value in shown.items():
            if isinstance(value, str) and value.startswith("${"):
                continue
            assert value == _as_lists(defaults[key]), (name, key, value, defaults[key])


def test_readme_table_names_files_that_exist():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Where things are"):]
    end = table.find("\n## ", 5)
    table = table if end < 0 else table[:end]
    paths = re.findall(r"`((?:train|analysis|tests|conf|docs|scripts)/[^`]*)`", table)
    assert len(paths) >= 10
    for path in paths:
        assert (ROOT / path).exists(), path


def test_misspelled_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.n_layer=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["model.n_layers=two"])


def test_experiments_change_what_they_say():
    assert compose_config(["experiment=one_layer"]).model.n_layers == 1
    cfg = compose_config(["experiment=smeared_keys_1l"])
    assert cfg.model.n_layers == 1 and cfg.model.smeared_keys
    assert compose_config(["experiment=shortformer"]).model.positional == "shortformer"


def test_multirun_sweep_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "train", "-m", "model.n_layers=1,2", "experiment=smoke", "device=cpu", "logger=none",
           "train.total_tokens=60000", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 2
    layers = sorted(OmegaConf.load(r / "config.yaml").model.n_layers for r in runs)
    assert layers == [1, 2]
    for r in runs:
        assert (r / "metrics.jsonl").read_text().count("\n") >= 5


def test_quick_start_command_writes_a_dated_run_directory(tmp_path):
    """`python -m train` with no run directory given: Hydra's default outputs/DATE/TIME."""
    cmd = [sys.executable, "-m", "train", "experiment=smoke", "device=cpu", "logger=none", "train.total_tokens=60000"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "outputs").glob("*/*/metrics.jsonl"))
    assert len(runs) == 1
    assert "run directory:" in proc.stdout


def test_configs_saved_with_the_old_names_still_load():
    """Runs saved before `schedule` moved into `checkpoint` and `optim.schedule` became
    `optim.lr_schedule` load as the same config (resume and recompute read saved configs)."""
    from train.core.config import ConfigError
    from train.core.saved_config import load_saved_config

    current = OmegaConf.to_container(compose_config(["logger=none"]), resolve=True)
    old = OmegaConf.to_container(compose_config(["logger=none"]), resolve=True)
    old["schedule"] = {k: old["checkpoint"].pop(k) for k in ("n_log", "n_linear", "first_tokens")}
    old["optim"]["schedule"] = old["optim"].pop("lr_schedule")
    old["train"]["debug_nan_at_step"] = None
    old["callbacks"]["induction"]["fold_layernorm"] = True
    assert OmegaConf.to_container(load_saved_config(old, "old"), resolve=True) == current
    old["data"]["_target_"] = "os.system"
    with pytest.raises(ConfigError, match=r"old: refusing data._target_='os.system'"):
        load_saved_config(old, "old")
