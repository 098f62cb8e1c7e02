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
from tests.presets import SIX_STEPS_ANY_DEVICE
from train.core.callbacks import Callback, InductionClassification
from train.core.config import (DATA_OPTIONS, Config, LoggerConfig, ModelConfig, ProbeConfig, RepeatsDataConfig,
                                TextDataConfig, TokensDataConfig)
from train.core.language import RepeatsLanguage
from train.core.data import build_repeats, build_text, build_tokens
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


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory):
    """The override that gives token-file configs a file of token ids."""
    import numpy as np

    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(1, 64, size=5000))
    return [f"data.path={path}"]


@pytest.mark.slow
@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_file_composes_and_builds(group, option, small_text, small_tokens):
    cfg = compose_config([f"{group}={option}"])
    needs = {TextDataConfig._target_: small_text, TokensDataConfig._target_: small_tokens}  # a corpus, a file
    if cfg.data._target_ in needs:
        cfg = compose_config([f"{group}={option}", *needs[cfg.data._target_]])
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


def _schema_defaults(schema) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


# (section, option): every option of `data` (each its own schema), the default option elsewhere
SHOWN = [(s, o) for s in sorted(set(SECTIONS) - {"callbacks", "data"}) for o in [_default_option(s)]] + \
        [("data", o) for o in _options("data")]


@pytest.mark.parametrize("section,option", SHOWN)
def test_group_files_show_every_key_with_the_schema_default(section, option):
    schema = _schema_defaults(DATA_OPTIONS[option] if section == "data" else SECTIONS[section].default_factory)
    shown = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / section / f"{option}.yaml"))
    if section == "data":  # the option's schema types the node (train/core/config.py register_configs)
        assert shown.pop("defaults") == [f"{option}_schema", "_self_"]
    follows_data = {k for k, v in schema.items() if isinstance(v, str) and v.startswith("${")}  # model.d_vocab, n_ctx
    assert set(shown) == set(schema) - follows_data
    for key, value in shown.items():
        assert value == _as_lists(schema[key]), f"conf/{section}/{option}: {key}={value!r}, schema default {schema[key]!r}"


def test_data_options_are_the_files_of_conf_data():
    assert sorted(DATA_OPTIONS) == _options("data") and _default_option("data") == "repeats"


@pytest.mark.parametrize("builder,schema", [
    (AttnOnlyTransformer, ModelConfig), (RepeatsLanguage, RepeatsDataConfig), (build_repeats, RepeatsDataConfig),
    (build_tokens, TokensDataConfig), (build_text, TextDataConfig), (build_probes, ProbeConfig),
    (WandbLogger, LoggerConfig),
])
def test_constructors_share_the_schema_defaults(builder, schema):
    schema = _schema_defaults(schema)
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
    for path in paths:  # a glob names at least one file
        assert list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists(), path


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- configs saved by earlier versions (tests/saved_configs/: config.yaml files of runs of commit
# a87f99a, before the library moved into train/core/, and of 46fffec, before each data source had
# its own option; one checkpoint's meta.json) ---------------------------------------------------
SAVED = ROOT / "tests" / "saved_configs"
# The command lines that made them (`python -m train SIX_STEPS_ANY_DEVICE ...` at that commit).
TEXT = ["data=text", "data.source=/tmp/hdata/corpus.txt", "data.cache_dir=/tmp/hdata/cache", "data.vocab_size=300",
        "data.n_ctx=64"]
SAVED_RUNS = {  # file: the same run's overrides today
    "a87f99a-repeats.yaml": SIX_STEPS_ANY_DEVICE,
    "a87f99a-tokens.yaml": [*SIX_STEPS_ANY_DEVICE, "data=tokens", "data.path=/tmp/hdata/tokens.npy"],
    "a87f99a-text.yaml": [*SIX_STEPS_ANY_DEVICE, *TEXT],
    "46fffec-tokens.yaml": [*SIX_STEPS_ANY_DEVICE, "data=tokens", "data.path=/tmp/hdata/tokens.npy"],
    "46fffec-text.yaml": [*SIX_STEPS_ANY_DEVICE, *TEXT, "data.repeat.p=0.2"],
}


def _saved(name: str) -> dict:
    import json

    import yaml

    text = (SAVED / name).read_text()
    return json.loads(text)["config"] if name.endswith(".json") else yaml.safe_load(text)


@pytest.mark.parametrize("name", sorted(SAVED_RUNS))
def test_configs_saved_with_every_sources_keys_load_as_their_data_option(name):
    """A saved data section of the union of every source's keys (one builder for all) loads as the
    option its source was, with that option's keys only: the config today's command line makes."""
    from train.core.saved_config import load_saved_config

    cfg = load_saved_config(_saved(name), name)
    today = compose_config(SAVED_RUNS[name])
    assert OmegaConf.get_type(cfg.data) is OmegaConf.get_type(today.data)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(today.data)
    assert OmegaConf.to_container(cfg.model, resolve=True) == OmegaConf.to_container(today.model, resolve=True)
    assert cfg.callbacks.copying._target_ == "train.core.callbacks.CopyingScores"


@pytest.mark.parametrize("name,kind", [
    ("a87f99a-repeats.yaml", "RepeatsLanguage"), ("a87f99a-tokens.yaml", "TokenStream"),
    ("a87f99a-text.yaml", "TextCorpus"), ("46fffec-tokens.yaml", "TokenStream"),
    ("46fffec-text.yaml", "Repetition of TextCorpus"),
])
def test_configs_saved_with_every_sources_keys_build_their_source(name, kind, small_text, small_tokens):
    """The same, built: the saved data section (its paths made local) makes the source it made then."""
    from train.core.saved_config import load_saved_config

    saved = _saved(name)
    local = dict(o[len("data."):].split("=", 1) for o in [*small_text, *small_tokens]
                 if o.startswith(("data.source=", "data.path=", "data.cache_dir=")))
    saved["data"] = {**saved["data"], **{k: v for k, v in local.items() if saved["data"][k] is not None}}
    data = instantiate(load_saved_config(saved, name).data)
    built = type(data).__name__ + (f" of {type(data.source).__name__}" if type(data).__name__ == "Repetition" else "")
    assert built == kind
    assert data.batch(0, 2).shape == (2, saved["data"]["n_ctx"])


def test_a_checkpoints_saved_config_loads_like_the_runs():
    from train.core.saved_config import load_saved_config

    assert load_saved_config(_saved("a87f99a-repeats-meta.json"), "meta.json") == \
        load_saved_config(_saved("a87f99a-repeats.yaml"), "config.yaml")


def test_a_saved_data_section_of_another_sources_keys_is_refused():
    """Only the union builders' sections lose keys on load: today's options keep refusing keys that
    are not theirs, and a builder that is no option's."""
    from train.core.config import ConfigError
    from train.core.saved_config import load_saved_config

    saved = OmegaConf.to_container(compose_config(SAVED_RUNS["a87f99a-repeats.yaml"]), resolve=True)
    with pytest.raises(ConfigError, match=r"does not match the config schema: Key 'source' not in 'RepeatsDataConfig'"):
        load_saved_config({**saved, "data": {**saved["data"], "source": "corpus.txt"}}, "config.yaml")
    with pytest.raises(ConfigError, match=r"refusing data._target_='train.core.data.build_text_data2'"):
        load_saved_config({**saved, "data": {**saved["data"], "_target_": "train.core.data.build_text_data2"}}, "c")
    with pytest.raises(ConfigError, match=r"c: data._target_=None is no data option's builder"):
        load_saved_config({**saved, "data": {k: v for k, v in saved["data"].items() if k != "_target_"}}, "c")


@pytest.mark.slow
def test_a_run_saved_by_an_earlier_version_resumes_and_recomputes(tmp_path, single_thread, monkeypatch):
    """A run stopped by SIGTERM whose config.yaml and checkpoints hold an earlier version's config
    (a87f99a: the old modules, one data builder for every source) resumes to the rows of an
    uninterrupted run, and `analysis.recompute` reads it and scores its checkpoints again."""
    import json
    import os
    import signal

    import yaml

    from analysis.recompute import recompute
    from train.cli import run
    from train.core import rundir
    from train.core.saved_config import load_saved_config
    from train.loop import Trainer

    old = {**_saved("a87f99a-repeats.yaml"), "device": "cpu"}
    run(load_saved_config(old, "old"), tmp_path / "full")
    clean_loss = Trainer.loss

    def term_at_step_2(self, tokens):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return clean_loss(self, tokens)

    monkeypatch.setattr(Trainer, "loss", term_at_step_2)
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        run(load_saved_config(old, "old"), stopped)
    monkeypatch.setattr(Trainer, "loss", clean_loss)
    (stopped / rundir.CONFIG_FILE).write_text(yaml.safe_dump(old))
    for checkpoint in rundir.list_checkpoints(stopped):
        meta = rundir.read_meta(checkpoint)
        (checkpoint / rundir.META_FILE).write_text(json.dumps({**meta, "config": old}))
    run(compose_config([f"resume={stopped}"]), stopped)
    trained = rundir.read_metrics(stopped / "metrics.jsonl")
    assert trained == rundir.read_metrics(tmp_path / "full" / "metrics.jsonl")
    again, _ = recompute(stopped, ["attention", "copying"], out=tmp_path / "again.jsonl")
    by_step = {r["step"]: r for r in trained if "event" not in r}
    assert len(again) == len(rundir.list_checkpoints(stopped)) >= 4
    for row in again:
        assert row["prefix_matching/L1H0"] == pytest.approx(by_step[row["step"]]["prefix_matching/L1H0"], abs=1e-6)
