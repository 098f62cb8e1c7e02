"""The tools around training used as a careless or hostile user would: one test per case of the
issue "never lose a user's file, never run a stranger's code" (the README's faults table names
each). Victim files (tests/victims.py) must keep their hashes; every refusal is one line and
leaves nothing behind. The tools run in-process (`main(argv)`) on a run directory made by hand;
the few that need a real process (signals, file-size limits) are marked slow.

The rule the tools follow: train/core/outputs.py (its own tests: tests/test_outputs.py)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import ROOT, cli_env, compose_config, one_line_error
from tests.presets import FAULTS, SIX_STEPS
from tests.victims import HAND_RUN, edit_json, hand_run, hashes, plant
from train.cli import run
from train.core import names as N
from train.core import outputs, rundir


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    return hand_run(tmp_path_factory.mktemp("made") / "run")


@pytest.fixture
def a_run(made_run, tmp_path) -> Path:
    return Path(shutil.copytree(made_run, tmp_path / "run", symlinks=True))


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


# -- deleting what is not ours ----------------------------------------------------------------------
EXPORT_TARGETS = {  # the --out given, and the line that refuses it
    "a_users_directory": (lambda tmp, run: plant(tmp / "mine"), "holds files that are not an export's"),
    "the_run_itself": (lambda tmp, run: run, "is a run directory"),
    "the_parent_of_runs": (lambda tmp, run: tmp, "holds files that are not an export's"),
    "the_runs_checkpoints": (lambda tmp, run: run / rundir.CHECKPOINTS, "lies inside the run"),
    "one_checkpoint": (lambda tmp, run: rundir.list_checkpoints(run)[0], "lies inside the run"),
    "a_file": (lambda tmp, run: plant(tmp, ("notes.txt",)) / "notes.txt", "is not a directory"),
}


@pytest.mark.parametrize("target", list(EXPORT_TARGETS))
def test_export_refuses_an_out_that_is_not_an_export(target, a_run, tmp_path, capsys):
    make, message = EXPORT_TARGETS[target]
    out = make(tmp_path, a_run)
    before = hashes(tmp_path)
    refused(export(a_run, "--out", out), capsys, message)
    assert hashes(tmp_path) == before and not leftovers(tmp_path)


def test_export_never_touches_what_lies_beside_its_out(a_run, tmp_path, capsys):
    """An unrelated DIR.tmp beside --out DIR stays; a second export replaces the first; --force
    writes into a user's directory beside the user's files."""
    beside = plant(tmp_path / "exp.tmp")
    before = hashes(beside)
    assert export(a_run, "--out", tmp_path / "exp") == 0
    assert export(a_run, "--out", tmp_path / "exp") == 0  # its own export: replaced
    mine = plant(tmp_path / "mine")
    users = hashes(mine)
    assert export(a_run, "--out", mine, "--force") == 0
    assert (mine / "model.safetensors").is_file() and all(hashes(mine)[k] == v for k, v in users.items())
    assert hashes(beside) == before and not leftovers(tmp_path)
    capsys.readouterr()


def test_report_refuses_a_users_directory_and_force_keeps_its_files(a_run, tmp_path, capsys):
    out = plant(tmp_path / "mine", ("precious.txt", "figures/my_plot.png"))
    before = hashes(out)
    refused(report(a_run, "--out", out), capsys, "holds files that are not a report's")
    assert hashes(out) == before


def test_report_is_a_file_is_refused(a_run, capsys):
    (a_run / "report").write_text("my notes")
    before = hashes(a_run)
    refused(report(a_run), capsys, "is not a directory")
    assert hashes(a_run) == before


def _startup(run_dir: Path, *overrides: str):
    """The Hydra callback that prepares a start before Hydra writes into the run directory (what
    `python -m train hydra.run.dir=...` runs first), in this process."""
    from hydra import compose, initialize_config_dir

    from train.cli import RunDirCheck

    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SIX_STEPS, *overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    try:
        RunDirCheck().on_run_start(cfg)
    finally:
        HydraConfig.instance().cfg = None  # the job's Hydra config ends with the job


@pytest.mark.parametrize("config", ["good", "refused"])
def test_a_new_run_refuses_a_users_directory_and_deletes_nothing_there(config, tmp_path, capsys):
    """hydra.run.dir at someone's folder (its own `.hydra/` and logs): refused before Hydra writes
    anything, and a refused config's clean-up deletes nothing there."""
    d = plant(tmp_path / "mine", ("precious.txt", ".hydra/config.yaml", "app.log", "__main__.log"))
    before = hashes(d)
    with pytest.raises(SystemExit) as exc:
        _startup(d, *(["optim.lr=-1"] if config == "refused" else []))
    assert exc.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert ("optim.lr must be positive" if config == "refused" else "holds files of its own") in line
    assert hashes(d) == before


def test_series_refuses_an_out_with_a_status_of_someone_elses(a_run, tmp_path, capsys):
    from analysis.series import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / rundir.STATUS_FILE).write_text('{"mine": true}')
    before = hashes(out)
    refused(main([str(a_run), "--out", str(out)]), capsys, "is a run directory")  # status.json: a run's file
    assert hashes(out) == before


# -- links and planted code ---------------------------------------------------------------------------
def test_report_never_writes_through_a_link(a_run, tmp_path, capsys):
    target = plant(tmp_path / "elsewhere", ("figures/keep.png", "summary.json"))
    os.symlink(target, a_run / "report")
    before = hashes(target)
    refused(report(a_run), capsys, "is a symbolic link")
    assert hashes(target) == before


def test_by_config_never_writes_through_a_link(a_run, tmp_path, capsys):
    from analysis.by_config import main

    target = plant(tmp_path / "elsewhere")
    os.symlink(target, tmp_path / "by_config")
    before = hashes(target)
    refused(main([str(tmp_path), "--key", "seed"]), capsys, "is a symbolic link")
    assert hashes(target) == before


def test_resume_refuses_a_run_whose_checkpoints_are_a_link(a_run, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    shutil.move(a_run / rundir.CHECKPOINTS, target)
    os.symlink(target, a_run / rundir.CHECKPOINTS)
    plant(target, ("step_0000099.tmp/precious.txt",))  # what a resume would delete as a half-written checkpoint
    edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
    before = hashes(target, a_run)
    with pytest.raises(SystemExit) as exc:
        run(compose_config([f"resume={a_run}"]), a_run)
    assert exc.value.code == 2
    assert "is a symbolic link" in one_line_error(capsys.readouterr().err)
    assert hashes(target, a_run) == before


def _tokenizer_dir(root: Path) -> Path:
    from train.core.text import train_bpe

    train_bpe(iter(["the tokenizer of a text run " * 50]), 300).save(root / rundir.TOKENIZER_DIR)
    return root / rundir.TOKENIZER_DIR


@pytest.mark.parametrize("planted", ["model_code", "link_out"])
def test_export_saves_the_tokenizer_again_and_carries_nothing_planted(planted, a_run, tmp_path, capsys):
    from analysis.export import MODELING_FILE, ExportError, write_tokenizer
    from train.core.runs import Run

    tokenizer = _tokenizer_dir(a_run)
    out = tmp_path / "out"
    out.mkdir()
    if planted == "model_code":  # it would replace the export's model code, run by trust_remote_code=True
        (tokenizer / MODELING_FILE).write_text("open('PWNED', 'w')\n")
        write_tokenizer(Run(a_run), out)
        assert not (out / MODELING_FILE).exists() and (out / "tokenizer.json").is_file()
    else:  # a link would copy an outside file's content into the export
        secret = plant(tmp_path / "secret", ("key.txt",)) / "key.txt"
        os.symlink(secret, tokenizer / "notes.txt")
        with pytest.raises(ExportError, match="holds notes.txt, a link or directory"):
            write_tokenizer(Run(a_run), out)
        assert list(out.iterdir()) == []


def _evil_tokenizer(directory: Path, trap: Path) -> Path:
    """A checkpoint directory whose tokenizer names code of its own; the code, if run, writes `trap`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                       "vocab_size": 64}))
    (directory / "evil_tok.py").write_text(f"open({str(trap)!r}, 'w').close()\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    return directory


def test_series_refuses_code_a_tokenizer_names_unless_trusted(tmp_path, capsys):
    from analysis.series import main

    _evil_tokenizer(tmp_path / "m" / "step1", tmp_path / "PWNED")
    before = hashes(tmp_path)
    refused(main([str(tmp_path / "m"), "--out", str(tmp_path / "s")]), capsys, "give --trust-remote-code to run it")
    assert hashes(tmp_path) == before and not (tmp_path / "s").exists()


def test_a_training_tokenizer_that_names_code_is_refused(tmp_path):
    from train.core.config import ConfigError
    from train.core.text import pretrained_tokenizer

    _evil_tokenizer(tmp_path, tmp_path / "PWNED")
    with pytest.raises(ConfigError, match="names code of its own"):
        pretrained_tokenizer(str(tmp_path))
    assert not (tmp_path / "PWNED").exists()


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
    from train.core.data import TokenStream

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
    from train.core.data import RepeatsLanguage, generator

    lang = RepeatsLanguage()
    g, n = generator(lang.seed, 0xC4A1), lang.vocab_size - 1
    assert torch.equal(lang.successors, torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(n)]) + 1)


# -- tracebacks that are one line now ---------------------------------------------------------------
META_DAMAGE = {
    "n_layers_a_string": (lambda m: m["model"].update(n_layers="two"), "model.n_layers='two' is not a positive integer"),
    "no_tokens": (lambda m: m.pop("tokens"), "tokens=None is not a token count"),
    "huge_d_vocab": (lambda m: m["model"].update(d_vocab=10 ** 12), "far larger than its weights file"),
}


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_damaged_checkpoint_metadata_is_one_line(damage, a_run, tmp_path, capsys):
    from analysis.recompute import main as recompute

    change, message = META_DAMAGE[damage]
    for ckpt in rundir.list_checkpoints(a_run):
        edit_json(ckpt / rundir.META_FILE, change)
    before = hashes(a_run)
    refused(recompute([str(a_run), "--callbacks", "copying"]), capsys, message)
    refused(export(a_run, "--out", tmp_path / "exp"), capsys, message)
    assert hashes(a_run) == before and not (tmp_path / "exp").exists()


def test_deeply_nested_metadata_is_one_line(a_run, capsys):
    from analysis.recompute import main as recompute

    meta = rundir.list_checkpoints(a_run)[0] / rundir.META_FILE
    meta.write_text(meta.read_text()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(recompute([str(a_run)]), capsys, "nests too deeply")


@pytest.mark.slow
def test_odd_metrics_rows_still_give_a_report(made_run, tmp_path, capsys):
    """A row whose step is a string, and rows of values near the largest float (plots overflowed):
    read as a run's rows are (beyond float32's range: not a number), and reported."""
    for case in ("step_a_string", "values_1e308"):
        run_dir = Path(shutil.copytree(made_run, tmp_path / "sweep" / case))
        rows = rundir.read_metrics(run_dir)
        for row in rows[1:]:
            if case == "step_a_string":
                row[N.STEP] = "abc"
            else:
                row[N.LOSS_HELDOUT], row[N.ICL_SCORE] = 1e308, -1e308
        (run_dir / rundir.METRICS_FILE).write_text("".join(rundir.format_row(r) for r in rows))
    assert report(tmp_path / "sweep") == 0
    assert (tmp_path / "sweep" / "report" / "report.html").is_file() and "Traceback" not in capsys.readouterr().err


def test_by_config_checks_its_keys_before_writing(a_run, tmp_path, capsys):
    from analysis.by_config import main

    refused(main([str(tmp_path), "--key", "no.such.key"]), capsys, "--key no.such.key: no run's config.yaml has it")
    refused(main([str(tmp_path), "--key", "data"]), capsys, "a section or a list")
    assert not (tmp_path / "by_config").exists()


@pytest.mark.slow
def test_by_config_places_a_key_of_names_along_its_axis(a_run, tmp_path, capsys):
    from analysis.by_config import main

    shutil.copytree(a_run, tmp_path / "other")
    assert main([str(tmp_path), "--key", "data.repeat.form"]) == 0
    assert sorted(p.name for p in (tmp_path / "by_config").iterdir()) == [outputs.MARKER, "by_config.md", "by_config.png"]
    assert "| tile | 1/2" not in capsys.readouterr().out  # both runs in one group


def test_recompute_counts_what_each_callback_did(a_run, capsys):
    from analysis.recompute import main as recompute

    assert recompute([str(a_run), "--callbacks", "copying"]) == 0
    captured = capsys.readouterr()
    assert "(copying at 3 of 3)" in captured.out and "step 6 (3/3): copying" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["analysis", "recompute"])
def test_a_full_disk_in_the_tools_is_one_line_and_leaves_nothing(tool, a_run, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) fails writes as a full disk does, in a real process (the
    export stages its files the same way: tests/test_outputs.py)."""
    argv = {"analysis": ["analysis", str(a_run), "--no-wandb", "--out", str(tmp_path / "out")],
            "recompute": ["analysis.recompute", str(a_run), "--callbacks", "copying", "--out", str(tmp_path / "re.jsonl")]}
    before = hashes(a_run)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    proc = subprocess.run([sys.executable, "-m", *argv[tool]], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "File too large" in one_line_error(proc.stderr)
    assert hashes(a_run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_a_run_whose_first_checkpoint_fails_says_it_has_none(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train", *SIX_STEPS, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300,  # checkpoints of ~100 kB
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert proc.returncode == 4 and "nothing was trained" in one_line_error(proc.stderr)
    status = rundir.read_status(run_dir)
    assert status["state"] == rundir.FAILED and status["step"] is None and not rundir.list_checkpoints(run_dir)


# -- inputs that block or blow up ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["token_file", "config_yaml"])
def test_a_fifo_is_refused_not_read(kind, a_run, tmp_path, capsys):
    """A read from a FIFO blocks until someone writes into it: refused before it is opened."""
    if kind == "token_file":
        os.mkfifo(tmp_path / "tokens.npy")
        overrides, run_dir = ["logger=none", "device=cpu", "data=tokens", f"data.path={tmp_path / 'tokens.npy'}"], tmp_path / "r"
    else:
        (a_run / rundir.CONFIG_FILE).unlink()
        os.mkfifo(a_run / rundir.CONFIG_FILE)
        edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
        overrides, run_dir = [f"resume={a_run}"], a_run
    with pytest.raises(SystemExit) as exc:
        run(compose_config(overrides), run_dir)
    assert exc.value.code == 2
    assert "regular file" in one_line_error(capsys.readouterr().err)


def test_a_config_of_billions_of_aliased_nodes_is_refused(a_run, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    (a_run / rundir.CONFIG_FILE).write_text(bomb)
    shutil.rmtree(a_run / rundir.CHECKPOINTS)
    edit_json(a_run / rundir.STATUS_FILE, lambda s: s.update(state=rundir.INTERRUPTED))
    with pytest.raises(SystemExit) as exc:
        run(compose_config([f"resume={a_run}"]), a_run)
    assert exc.value.code == 2 and "YAML nodes (aliases)" in one_line_error(capsys.readouterr().err)


def _signal_when(proc: subprocess.Popen, ready, signals: list[int], gap: float = 0.05, timeout: float = 120) -> float:
    start = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.05)
    sent = time.monotonic()
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(gap)
    proc.wait(timeout=timeout)
    return time.monotonic() - sent


@pytest.mark.slow
def test_bpe_training_stops_at_sigterm_and_leaves_nothing(tmp_path):
    """A BPE on 20 MB of one repeated word runs for a long time inside the tokenizers library;
    SIGTERM ends it within seconds (exit 143), with no cache entry and no run directory."""
    corpus = tmp_path / "one.txt"
    corpus.write_text(("aaaa " * 200 + "\n\n") * 20_000)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "logger=none", "device=cpu", "data=text",
                             f"data.source={corpus}", f"data.cache_dir={cache}", "data.vocab_size=4096",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE, text=True)
    took = _signal_when(proc, lambda: cache.is_dir() and any(p.name.count(".tmp-") for p in cache.iterdir()),
                        [signal.SIGTERM], gap=1.0)
    err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "while building the token cache" in one_line_error(err) and took < 10
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [] and not run_dir.exists()


@pytest.mark.slow
def test_a_sigterm_repeated_by_a_launcher_counts_once(tmp_path, monkeypatch, capsys):
    """`kill -- -PGID` (SLURM) reaches the run directly and again through `uv run`: both within a
    moment count as one stop, which writes its checkpoint (exit 143, not 'a second signal'). The
    handler is the command line's in every launch mode (train/signals.py)."""
    from train.loop import Trainer
    from train.signals import STOP

    clean_loss = Trainer.loss

    def twice_at_step_2(self, tokens):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return clean_loss(self, tokens)

    monkeypatch.setattr(Trainer, "loss", twice_at_step_2)
    installed = STOP.installed
    STOP.install()
    try:
        with pytest.raises(SystemExit) as exc:
            run(compose_config(FAULTS), tmp_path / "run")
    finally:
        if not installed:
            STOP.uninstall()
    assert exc.value.code == 128 + signal.SIGTERM
    assert rundir.read_status(tmp_path / "run")["state"] == rundir.INTERRUPTED
    assert rundir.resume_point(tmp_path / "run") is not None
    capsys.readouterr()


# -- the edge of every command ------------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_the_traceback_waits_for_debug(tmp_path, capsys, monkeypatch):
    from train.core import edge

    @edge.command
    def main(argv):
        if argv and argv[0] == "disk":
            raise OSError(28, "No space left on device", str(tmp_path / "out"))
        raise KeyError("a bug")

    monkeypatch.delenv(edge.DEBUG_ENV, raising=False)
    assert main([]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "unexpected KeyError: 'a bug'" in line and f"--debug or {edge.DEBUG_ENV}=1" in line
    assert main(["disk"]) == 4
    assert f"No space left on device: {tmp_path / 'out'}" in one_line_error(capsys.readouterr().err)
    assert main(["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
