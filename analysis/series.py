"""Induction-head scores over a checkpoint series of any Hugging Face causal LM.

    uv run python -m analysis.series EleutherAI/pythia-70m --revisions pythia --text FILE --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions step1000 step2000 --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions 1000:143000:1000 --out RUN_DIR
    uv run python -m analysis.series EXPORT_DIR --out RUN_DIR [--callbacks attention heldout]

SOURCE is a hub model name (revisions: names, START:STOP:STEP ranges of steps written `step{N}`, or
`pythia`: steps 0, 1, 2, 4, ..., 512, then every 1000 to 143000) or a local directory of
checkpoint directories loadable by `AutoModelForCausalLM.from_pretrained` (`python -m
analysis.export RUN --all`); analysis/series_source.py finds and reads them. Steps: an export's
induction_tracker.json, else the digits ending a revision or directory name; tokens = step x
--tokens-per-step (Pythia's for Pythia) unless recorded. A checkpoint or tokenizer that names code
of its own to run (`auto_map`) is refused unless --trust-remote-code (the project's exports load
with the project's classes).

Each checkpoint is loaded by `transformers` (eager attention; --dtype fp32 or bf16; --device auto:
cuda, mps, cpu) and scored by the training run's `train.core.callbacks.evaluate_checkpoint`, with
the callbacks of conf/callbacks/default.yaml or those --callbacks names (and those whose results
they read): same definitions and row keys (train/core/names.py), each at its `every` over the
series. Through the model's adapter (train/core/adapter.py): the project's exports are the
project's model; GPT-2, GPT-NeoX and Llama / Mistral / Qwen2 get every score; other families the
behavioural scores, and a note names the callbacks left out.

Probes (train/core/probes.py): --probes (a probes.safetensors as `analysis.export` writes, or its
directory), else the checkpoint's own probe file (an export: the run's exact probes), else
`build_probes` over the text set (--text: a .txt file, a `datasets` directory or a hub data set
with a `text` column, read with the model's tokenizer into BOS + n_ctx - 1 token windows, the
held-out sequences): probe tokens from its mid-frequency tokens, special ids left out (no text
set: ids 10%..50% of the vocabulary, and no held-out scores).

Rows go to RUN_DIR/metrics.jsonl in a training run's format (train/core/rundir.py), so `python -m
analysis RUN_DIR` reads them unchanged; steps already there are skipped (resume). RUN_DIR is new,
empty or a series (train/core/outputs.py; --force for another directory), and the options, the
checkpoints' code, the probe file and the text set are checked before anything is written there.
A checkpoint that fails (a missing revision, no attention weights, a vocabulary mismatch) is
recorded as a row {"event": "checkpoint_failed", "step", "revision", "message"} and the series
goes on; when every checkpoint failed, status.json says `failed` and the command exits 2. Hub
revisions are removed from the download cache after use unless --keep-cache.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.core import edge, outputs, rundir
from train.core import names as N
from train.core import probes as P
from train.core.adapter import adapt
from train.core.callbacks import RunContext, evaluate_checkpoint, instantiate_callbacks, prepare_callbacks
from train.core.config import ConfigError
from train.core.config import ProbeConfig as _Probes
from train.core.device import select_device
from train.core.probes import ProbeFileError
from analysis.series_source import (PYTHIA_TOKENS_PER_STEP, Checkpoint, HubUnreachable, RemoteCode, SeriesError,
                                    check_remote_code, fetch, free_revision, load_model, load_tokenizer, read_text,
                                    series_checkpoints)

FAILED = "checkpoint_failed"  # the event of a row that records a checkpoint the series could not score
SERIES_FILE = "series.json"  # what the series was made from


# -- probes and callbacks ----------------------------------------------------------------------
@dataclass
class Options:
    revisions: list[str] | None = None
    tokens_per_step: int | None = None
    probes: Path | None = None
    text: str | None = None
    text_split: str = "train"
    n_ctx: int = 512  # text windows, BOS included (at most the model's context)
    n_text: int = _Probes.n_heldout  # text windows (the held-out sequences)
    n_probes: int = _Probes.n_probes
    period: int = _Probes.period
    repeats: int = _Probes.repeats
    n_copy_tokens: int = _Probes.n_copy_tokens
    seed: int = _Probes.seed
    callbacks: list[str] | None = None  # names in conf/callbacks/ (None: default.yaml's)
    dtype: str = "fp32"
    device: str = "auto"
    keep_cache: bool = False
    trust_remote_code: bool = False


def series_probes(path: Path, tokenizer, model, opts: Options,
                  documents: list[str] | None = None) -> tuple[P.Probes, dict[str, int]]:
    """The probes and the probe file's settings (see the module docstring for which probes);
    `documents`: the text set, read already."""
    given = opts.probes or (path if (path / P.PROBES_FILE).is_file() else None)
    if given is not None:
        return P.probes_from_file(given)
    if tokenizer is None:
        raise SeriesError("the checkpoint has no tokenizer; give probe token ids with --probes")
    n_ctx = min(opts.n_ctx, model.n_ctx)
    if documents is None and opts.text:
        documents = read_text(opts.text, opts.text_split)
    data = P.TokenWindows.from_text(documents, tokenizer, n_ctx, opts.n_text)
    return P.build_probes(data, n_ctx, opts.n_probes, opts.period, opts.repeats, opts.n_copy_tokens, opts.n_text,
                          opts.seed), {}


def series_callbacks(names: list[str] | None, settings: dict[str, int]) -> dict[str, Any]:
    """{name: config} of the callbacks to run (conf/callbacks/, as analysis.recompute picks them),
    with a probe file's ICL indices and previous-token sequences."""
    from omegaconf import OmegaConf

    from analysis.recompute import RecomputeError, callback_configs

    probes = {"icl_early": settings.get("icl_early"), "icl_late": settings.get("icl_late"),
              "icl_window": _Probes.icl_window}
    saved = {"attention": {"n_heldout": settings["n_previous_token"]}} if "n_previous_token" in settings else {}
    try:
        return callback_configs(OmegaConf.create({"probes": probes, "callbacks": saved}), names)
    except RecomputeError as e:
        raise SeriesError(str(e)) from None


def check_ids(probes: P.Probes, vocab: int) -> None:
    for name, t in (("probe", probes.repeated), ("text", probes.heldout), ("copy", probes.copy_tokens)):
        if t is not None and int(t.max()) >= vocab:
            raise SeriesError(f"{name} token id {int(t.max())} is outside the model's vocabulary of {vocab}")


# -- the series ----------------------------------------------------------------------------------
class Scorer:
    """Scores the checkpoints of one series on the same probes with the same callbacks (set up at
    the first checkpoint), writing each one's row, or a failure row, to `metrics`; `documents`:
    the text set, read already."""

    def __init__(self, source: str, opts: Options, metrics: rundir.MetricsFile, log,
                 documents: list[str] | None = None):
        self.source, self.opts, self.metrics, self.log, self.documents = source, opts, metrics, log, documents
        self.device = select_device(opts.device)
        self.ctx, self.callbacks, self.d_vocab = None, None, None
        self.failures: list[str] = []  # one line per checkpoint that could not be scored

    def score(self, path: Path, step: int, tokens: int, index: int) -> dict[str, Any]:
        """The row of the checkpoint at `path`, the `index`-th of the series."""
        check_remote_code(path, self.opts.trust_remote_code)
        hf = load_model(path, self.opts.dtype, self.device, self.opts.trust_remote_code)
        if self.ctx is None or self.d_vocab is None:
            tokenizer = load_tokenizer(path, self.opts.trust_remote_code)
            if tokenizer is not None:  # the token ids scored: the tokenizer's
                if len(tokenizer) > hf.config.vocab_size:
                    raise SeriesError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                                      f"only {hf.config.vocab_size}")
                self.d_vocab = len(tokenizer)
            if self.ctx is None:
                probes, settings = series_probes(path, tokenizer, adapt(hf), self.opts, self.documents)
                self.configs = series_callbacks(self.opts.callbacks, settings)
                self.ctx = RunContext(None, probes.to(self.device))
        check_ids(self.ctx.probes, hf.config.vocab_size)
        self.ctx.model = adapt(hf, self.d_vocab)
        if self.callbacks is None:
            self.callbacks = prepare_callbacks(instantiate_callbacks(self.configs), self.ctx)
        self.ctx.step, self.ctx.tokens, self.ctx.checkpoint_index = step, tokens, index
        return {N.STEP: step, N.TOKENS: tokens} | evaluate_checkpoint(self.callbacks, self.ctx)

    def __call__(self, ck: Checkpoint, index: int, tokens: int) -> dict[str, Any] | None:
        """Score and record one checkpoint; its row, or None when it failed."""
        t0, snapshot = time.perf_counter(), None
        try:
            path = ck.path or (snapshot := fetch(self.source, ck.revision))
            row = self.score(path, ck.step, tokens, index)
        except (HubUnreachable, RemoteCode, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - any bad checkpoint is recorded and passed
            message = " ".join(str(e).split()) or type(e).__name__
            self.log(f"error: {ck.name}: {message} (recorded; going on)")
            self.metrics.write({N.EVENT: FAILED, N.STEP: ck.step, "revision": ck.name, "message": message})
            self.failures.append(f"{ck.name}: {message}")
            return None
        finally:
            if snapshot is not None and not self.opts.keep_cache:
                free_revision(snapshot)
        while self.ctx.notes:  # what prepare_callbacks left out
            self.log(f"note: {self.ctx.notes.pop(0)}")
        self.metrics.write(row)
        pm = self.ctx.scores.get(N.PREFIX_MATCHING)
        self.log(f"{ck.name}: step {ck.step}" + (f", max prefix matching {float(pm.max()):.3f}" if pm is not None else "")
                 + (f", ICL score {row[N.ICL_SCORE]:.3f}" if N.ICL_SCORE in row else "")
                 + f" ({time.perf_counter() - t0:.1f} s)")
        return row


def check_options(opts: Options) -> None:
    """The numbers and the device of the options, before anything is written (SeriesError)."""
    for name, least in (("n_text", 1), ("n_ctx", 8), ("n_probes", 1), ("period", 2), ("repeats", 2),
                        ("n_copy_tokens", 1), ("tokens_per_step", 1)):
        value = getattr(opts, name)
        if value is not None and value < least:
            raise SeriesError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    try:
        select_device(opts.device)
    except (ValueError, RuntimeError) as e:
        raise SeriesError(f"--device {opts.device}: {e}") from None


SERIES_FILES = (rundir.METRICS_FILE, rundir.STATUS_FILE, SERIES_FILE)


def run_series(source: str, out: Path, opts: Options, log=print, force: bool = False) -> list[dict[str, Any]]:
    """Score every checkpoint of `source` not yet in out/metrics.jsonl; returns the new rows.
    Everything is checked before anything is written: the options, the checkpoints (their code:
    `check_remote_code`), the probe file and the text set, and `out` (train/core/outputs.py: new,
    empty or a series, or `force`). SeriesError when checkpoints failed and none was scored."""
    check_options(opts)
    outputs.check_output_dir(out, "series", force)
    links = [out / name for name in SERIES_FILES if (out / name).is_symlink()]
    if links:
        raise SeriesError(f"{links[0]} is a symbolic link; a series' files are its own")
    checkpoints = series_checkpoints(source, opts.revisions)
    for ck in checkpoints:
        if ck.path is not None:
            check_remote_code(ck.path, opts.trust_remote_code)
    if opts.probes is not None:
        if Path(opts.probes).exists() and not (Path(opts.probes).is_dir() or Path(opts.probes).is_file()):
            raise SeriesError(f"--probes {opts.probes} is neither a regular file nor a directory; refusing to read it")
        P.probes_from_file(opts.probes)
    documents = read_text(opts.text, opts.text_split) if opts.text and opts.probes is None else None
    per_step = opts.tokens_per_step or (PYTHIA_TOKENS_PER_STEP if "pythia" in source.lower() else None)
    outputs.claim(out, "series", force)
    outputs.check_writable(out)
    done: set[int] = set()
    if (out / rundir.METRICS_FILE).is_file():
        done = {r[N.STEP] for r in rundir.read_metrics(out) if N.EVENT not in r and N.STEP in r}
    log(f"{len(checkpoints)} checkpoints, {sum(c.step in done for c in checkpoints)} already in {out / rundir.METRICS_FILE}")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}
    rundir.write_json_atomic(out / SERIES_FILE, {"source": source, "revisions": [c.name for c in checkpoints],
                                                 "tokens_per_step": per_step, "options": options})
    rows = []
    metrics = rundir.MetricsFile(out)
    scorer = Scorer(source, opts, metrics, log, documents)
    try:
        for index, ck in enumerate(checkpoints):  # the index in the whole series: the callbacks' cadence
            if ck.step not in done:
                tokens = ck.tokens if ck.tokens is not None else ck.step * per_step if per_step else ck.step
                row = scorer(ck, index, tokens)
                rows += [row] if row is not None else []
    finally:
        metrics.close()
    last = max([c.step for c in checkpoints], default=0)
    if scorer.failures and not rows:
        rundir.write_status(out, rundir.FAILED, last, None, error=scorer.failures[0])
        raise SeriesError(f"no checkpoint was scored: {len(scorer.failures)} failed (first: {scorer.failures[0]}); "
                          f"each is recorded in {out / rundir.METRICS_FILE}")
    rundir.write_status(out, rundir.FINISHED, last, None)
    log(f"scored {len(rows)} of {len(checkpoints)} checkpoints ({len(scorer.failures)} failed, "
        f"{sum(c.step in done for c in checkpoints)} already there)")
    return rows


@edge.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hub model name, or a local directory of checkpoint directories")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory for metrics.jsonl: new, empty or an earlier series (continued)")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing --out of other files (files of the same names are replaced)")
    parser.add_argument("--revisions", nargs="+", metavar="REV", help="hub revisions: names, START:STOP:STEP, or pythia")
    parser.add_argument("--tokens-per-step", type=int, help="tokens per step (default: Pythia's for Pythia models)")
    parser.add_argument("--probes", type=Path, help="probe token ids: a probes.safetensors (analysis.export), or its directory")
    parser.add_argument("--callbacks", nargs="+", metavar="NAME", help="callbacks (conf/callbacks/; default: default.yaml's)")
    parser.add_argument("--text", help="text set: .txt file, datasets directory, or hub data set name")
    parser.add_argument("--text-split", default="train")
    d = Options()
    for name, help in (("n_text", "text sequences"), ("n_ctx", "text sequence length incl. BOS"),
                       ("n_probes", "probes"), ("period", "probe period"), ("repeats", "probe repeats"),
                       ("n_copy_tokens", "copy-score tokens"), ("seed", "probe seed")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                            help=f"{help} (default {getattr(d, name)})")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-cache", action="store_true", help="keep downloaded revisions in the cache")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run code that a checkpoint or its tokenizer names (auto_map); refused without it")
    args = vars(parser.parse_args(argv))
    source, out, force = args.pop("source"), args.pop("out"), args.pop("force")
    t0 = time.perf_counter()
    try:
        rows = run_series(source, out, Options(**args), log=lambda m: print(m, file=sys.stderr if m.startswith(
            ("error:", "note:")) else sys.stdout), force=force)
    except (SeriesError, ProbeFileError, ConfigError, rundir.CheckpointError, outputs.OutputError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    per = f", {seconds / len(rows):.2f} s per checkpoint" if rows else ""
    print(f"scored {len(rows)} checkpoints in {seconds:.1f} s{per} -> {out / rundir.METRICS_FILE}; "
          f"next: uv run python -m analysis {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
