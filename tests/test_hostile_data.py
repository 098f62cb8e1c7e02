"""The hostile-user cases of the data and the settings (each a row of the README's faults table): a
token cache that was damaged or left half-built, a corpus that changed under a resumed run,
results that meant nothing (a series that scored nothing, settings out of range, non-finite
weights), and configs that ask more than the machine has."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose_config, one_line_error
from tests.victims import HAND_RUN, export, plant, refused, report
from train.cli import run
from train.core import rundir


# -- the token cache -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("corpus") / "help.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:30_000])
    return path


def _build(corpus: Path, cache: Path) -> Path:
    from train.core.token_cache import build_shards

    return build_shards(str(corpus), str(cache), tokenizer="bpe", vocab_size=300)


@pytest.fixture(scope="module")
def built_cache(corpus, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    _build(corpus, cache)
    return cache


@pytest.fixture
def cache(built_cache, tmp_path) -> tuple[Path, Path]:
    cache = Path(shutil.copytree(built_cache, tmp_path / "cache"))
    return cache, next(p for p in cache.iterdir() if p.is_dir())


@pytest.mark.parametrize("damage", ["other_ids_same_size", "ids_out_of_range", "truncated"])
def test_a_damaged_token_cache_is_refused(damage, corpus, cache):
    from train.core.config import ConfigError

    root, entry = cache
    shard = entry / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    if damage == "other_ids_same_size":
        np.random.default_rng(0).permutation(ids).tofile(shard)
    elif damage == "ids_out_of_range":
        ids[::7] = 60000
        ids.tofile(shard)
    else:
        ids[:-10].tofile(shard)
    with pytest.raises(ConfigError, match=f"the token cache entry {entry} is damaged: shard train_00000.bin"):
        _build(corpus, root)


def test_token_batches_refuse_ids_outside_the_vocabulary():
    """The last word after the shards' digests (a large shard is hashed by sampled blocks)."""
    from train.core.config import ConfigError
    from train.core.tokens import TokenStream

    stream = np.arange(1000, dtype=np.uint16) % 50
    stream[500:] = 999
    data = TokenStream([stream], [stream], n_ctx=16, vocab_size=64)
    with pytest.raises(ConfigError, match="token id 999 >= data.vocab_size"):
        [data.batch(s, 8) for s in range(20)]


def test_what_killed_builds_left_is_recovered(corpus, cache):
    root, entry = cache
    (entry / "meta.json").unlink()  # an entry without its meta.json
    stale = plant(root / f"{entry.name}.tmp-99999", ("junk.bin",))  # a killed build's temporary
    assert _build(corpus, root) == entry and (entry / "meta.json").is_file()
    assert not stale.exists()


def test_a_resumed_text_run_refuses_a_corpus_that_changed(corpus, tmp_path):
    from train.core.config import ConfigError
    from train.core.token_cache import entry_key
    from train.startup import check_corpus

    text = tmp_path / "corpus.txt"
    shutil.copy(corpus, text)
    cfg = compose_config(["data=text", f"data.source={text}", "data.vocab_size=300"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_json_atomic(run_dir / rundir.TOKEN_CACHE_FILE, {"key": entry_key(cfg.data)})
    check_corpus(cfg, run_dir)  # unchanged: fine
    text.write_text(text.read_text().replace("the", "THE"))
    with pytest.raises(ConfigError, match="changed since the run started"):
        check_corpus(cfg, run_dir)
    (run_dir / rundir.TOKEN_CACHE_FILE).unlink()  # the user accepts the corpus as it is now
    check_corpus(cfg, run_dir)


# -- results that meant nothing ---------------------------------------------------------------------
def test_a_series_that_scored_nothing_fails(a_run, tmp_path, capsys):
    """A text set that cannot be read, a device that is not there, a probe file that is missing:
    refused before anything is written (they failed every checkpoint, exit 0 'finished')."""
    from analysis.series import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe bad bytes")
    assert export(a_run, "--out", tmp_path / "exp") == 0
    source = [str(tmp_path / "exp"), "--out", str(tmp_path / "s")]
    refused(main([*source, "--text", str(bad)]), capsys, "it is not UTF-8 text")
    refused(main([*source, "--device", f"cuda:{torch.cuda.device_count()}"]), capsys, "--device cuda:")
    refused(main([*source, "--probes", str(tmp_path / "nope")]), capsys, "cannot read probe token ids")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def base_config():
    return compose_config(HAND_RUN)


def refused_start(cfg, run_dir: Path, capsys, message: str) -> None:
    """`python -m train` with `cfg` exits 2 with one line and leaves no directory."""
    with pytest.raises(SystemExit) as exc:
        run(cfg, run_dir)
    assert exc.value.code == 2 and message in one_line_error(capsys.readouterr().err)
    assert not run_dir.exists()


CALLBACK_SETTINGS = {  # a setting, and the line that refuses it
    "icl_window_negative": ("callbacks.heldout.icl_window", -1, "callbacks.heldout: icl_window must be an integer >= 0"),
    "induction_threshold_nan": ("callbacks.induction.prefix_matching", float("nan"),
                                "callbacks.induction: prefix_matching must be a finite number, got nan"),
    "baseline_samples_zero": ("callbacks.circuits.baseline_samples", 0, "callbacks.circuits: baseline_samples must be"),
    "attention_n_heldout_zero": ("callbacks.attention.n_heldout", 0, "callbacks.attention: n_heldout must be"),
}


@pytest.mark.parametrize("case", list(CALLBACK_SETTINGS))
def test_callback_settings_out_of_range_are_one_line(case, base_config, tmp_path, capsys):
    key, value, message = CALLBACK_SETTINGS[case]
    cfg = base_config.copy()
    OmegaConf.update(cfg, key, value)
    refused_start(cfg, tmp_path / "run", capsys, message)


@pytest.mark.parametrize("value", ["nan", "0", "-1"])
def test_detection_parameters_out_of_range_are_refused(value, a_run, capsys):
    refused(report(a_run, "--set", f"bandwidth={value}"), capsys, "bandwidth must be a finite number > 0")
    assert not (a_run / "report").exists()


def test_export_refuses_non_finite_weights(a_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    weights = rundir.list_checkpoints(a_run)[-1] / rundir.MODEL_FILE
    sd = load_file(weights)
    sd["W_E"][0, 0] = float("nan")
    save_file(sd, weights)
    refused(export(a_run, "--out", tmp_path / "exp"), capsys, "has non-finite weights (W_E)")
    assert not (tmp_path / "exp").exists()


CONFIG_VALUES = {  # values that were accepted and then failed with a traceback (or exhausted memory)
    "lr_1e308": ({"optim.lr": 1e308}, "optim.lr=1e+308 is above 1000"),
    "n_ctx_50000": ({"data.n_ctx": 50000, "model.n_ctx": 50000, "train.total_tokens": 4_000_000}, "needs at least"),
    "n_layers_200000": ({"model.n_layers": 200_000}, "needs at least"),
    "repeats_vocab_above_its_limit": ({"data.vocab_size": 100_000, "model.d_vocab": 100_000},
                                      "the most data=repeats makes"),
}


@pytest.mark.parametrize("case", list(CONFIG_VALUES))
def test_config_values_beyond_the_machine_are_one_line(case, base_config, tmp_path, capsys):
    values, message = CONFIG_VALUES[case]
    cfg = base_config.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    refused_start(cfg, tmp_path / "run", capsys, message)


def test_a_bpe_vocabulary_beyond_the_machine_is_refused_before_it_is_trained(corpus, tmp_path, capsys):
    """data.vocab_size=1e9 with a BPE aborted the process from Rust while allocating 70 GB."""
    cfg = compose_config(["logger=none", "device=cpu", "data=text", f"data.source={corpus}",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=1000000000"])
    refused_start(cfg, tmp_path / "run", capsys, "needs at least")
    assert not (tmp_path / "cache").exists()


def test_the_embedded_datas_draws_are_unchanged():
    """The bigram chain's successor table (copied row by row now: memory linear in the vocabulary)
    is the one the earlier code drew, row views of whole permutations."""
    from train.core.language import RepeatsLanguage, generator

    lang = RepeatsLanguage()
    g, n = generator(lang.seed, 0xC4A1), lang.vocab_size - 1
    assert torch.equal(lang.successors, torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(n)]) + 1)
