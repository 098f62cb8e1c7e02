"""Induction-head scores over a checkpoint series of any Hugging Face causal LM.

    uv run python -m analysis.series EleutherAI/pythia-70m --revisions pythia --text FILE --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions step1000 step2000 --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions 1000:143000:1000 --out RUN_DIR
    uv run python -m analysis.series EXPORT_DIR --out RUN_DIR [--callbacks attention heldout]

SOURCE is a hub model name (revisions: names, START:STOP:STEP ranges of steps written `step{N}`, or
`pythia`: steps 0, 1, 2, 4, ..., 512, then every 1000 to 143000) or a local directory of
checkpoint directories loadable by `AutoModelForCausalLM.from_pretrained` (`python -m
analysis.export RUN --all`). Steps: an export's induction_tracker.json, else the digits ending a
revision or directory name; tokens = step x --tokens-per-step (Pythia's for Pythia) unless recorded.

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
analysis RUN_DIR` reads them unchanged; steps already there are skipped (resume). A checkpoint that
fails (a missing revision, no attention weights, a vocabulary mismatch) is recorded as a row
{"event": "checkpoint_failed", "step", "revision", "message"} and the series goes on. Hub
revisions are removed from the download cache after use unless --keep-cache.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.core import names as N
from train.core import probes as P
from train.core import rundir
from train.core.adapter import adapt
from train.core.callbacks import RunContext, evaluate_checkpoint, instantiate_callbacks, prepare_callbacks
from train.core.config import ConfigError
from train.core.config import ProbeConfig as _Probes
from train.core.device import select_device
from train.core.probes import ProbeFileError

PYTHIA_STEPS = [0, *(2 ** i for i in range(10)), *range(1000, 143001, 1000)]
PYTHIA_TOKENS_PER_STEP = 2_097_152
FAILED = "checkpoint_failed"  # the event of a row that records a checkpoint the series could not score
SERIES_FILE = "series.json"  # what the series was made from


class SeriesError(ValueError):
    """A problem with a checkpoint or the series' input: one line, no traceback."""


@dataclass
class Checkpoint:
    name: str  # revision or directory name
    step: int
    tokens: int | None = None  # when the checkpoint records them
    path: Path | None = None  # a local checkpoint directory
    revision: str | None = None  # a hub revision


# -- which checkpoints ---------------------------------------------------------------------------
def step_of(name: str) -> int | None:
    """The digits ending a revision or directory name ("step1000", "step_0001000"), or None."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def hub_revisions(spec: list[str]) -> list[str]:
    """Revision names: `pythia` (the named schedule), START:STOP:STEP ranges of steps, or names."""
    out: list[str] = []
    for item in spec:
        if item == "pythia":
            out += [f"step{s}" for s in PYTHIA_STEPS]
        elif re.fullmatch(r"\d+:\d+(:\d+)?", item):
            start, stop, *step = (int(x) for x in item.split(":"))
            out += [f"step{s}" for s in range(start, stop + 1, step[0] if step else 1)]
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def local_series(root: Path) -> list[Checkpoint]:
    """The checkpoint directories under `root` (those with a config.json), by step; `root` itself
    when it is one."""
    import json

    from analysis.export import INFO_FILE

    dirs = [root] if (root / "config.json").is_file() else sorted(d for d in root.iterdir() if (d / "config.json").is_file())
    found = []
    for d in dirs:
        info = json.loads((d / INFO_FILE).read_text()) if (d / INFO_FILE).is_file() else {}
        step = info.get("step", step_of(d.name))
        if step is None:
            raise SeriesError(f"cannot tell the step of {d} (no {INFO_FILE}, no digits ending its name)")
        found.append(Checkpoint(d.name, int(step), info.get("tokens"), path=d))
    if not found:
        raise SeriesError(f"{root} holds no checkpoint directories (directories with a config.json)")
    return sorted(found, key=lambda c: c.step)


# -- loading -------------------------------------------------------------------------------------
def fetch(repo: str, revision: str) -> Path:
    """Download one hub revision's model and tokenizer files; the local snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as E

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.tiktoken"]))
    except E.RevisionNotFoundError:
        raise SeriesError(f"{repo} has no revision {revision!r}") from None
    except (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError) as e:
        raise HubUnreachable(f"cannot reach the Hugging Face hub for {repo}@{revision} and it is not "
                             f"in the cache ({type(e).__name__})") from None
    except E.RepositoryNotFoundError:
        raise HubUnreachable(f"no model {repo!r} on the Hugging Face hub (or it is private)") from None
    except OSError as e:  # connection errors
        raise HubUnreachable(f"cannot reach the Hugging Face hub for {repo}@{revision}: {e}") from None


class HubUnreachable(SeriesError):
    """Offline or no such model: no checkpoint of the series can be loaded."""


def free_revision(snapshot: Path) -> None:
    """Remove one downloaded revision from the Hugging Face cache (blobs other revisions share stay)."""
    from huggingface_hub import scan_cache_dir

    try:
        scan_cache_dir(snapshot.parents[2]).delete_revisions(snapshot.name).execute()
    except Exception as e:  # noqa: BLE001 - a cache we cannot clean only costs disk
        print(f"note: could not free {snapshot} from the cache ({e})", file=sys.stderr)


def load_model(path: Path, dtype: str, device: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from train.core.hf_model import register_project_model

    register_project_model()  # the project's exports load with its own classes
    hf_logging.disable_progress_bar()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager",
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise SeriesError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no tokenizer: token ids must then be given
        return None


# -- text ----------------------------------------------------------------------------------------
def read_text(source: str, split: str) -> list[str]:
    """Documents of a .txt file (one), a `datasets` directory or a hub data set (`text` column)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - missing, offline or malformed data: one line
        raise SeriesError(f"cannot read the text set {source!r}: {str(e).splitlines()[0] if str(e) else e}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    if "text" not in ds.column_names:
        raise SeriesError(f"the text set {source!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


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


def series_probes(path: Path, tokenizer, model, opts: Options) -> tuple[P.Probes, dict[str, int]]:
    """The probes and the probe file's settings (see the module docstring for which probes)."""
    given = opts.probes or (path if (path / P.PROBES_FILE).is_file() else None)
    if given is not None:
        return P.probes_from_file(given)
    if tokenizer is None:
        raise SeriesError("the checkpoint has no tokenizer; give probe token ids with --probes")
    n_ctx = min(opts.n_ctx, model.n_ctx)
    data = P.TokenWindows.from_text(read_text(opts.text, opts.text_split) if opts.text else None, tokenizer, n_ctx,
                                    opts.n_text)
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
    the first checkpoint), writing each one's row, or a failure row, to `metrics`."""

    def __init__(self, source: str, opts: Options, metrics: rundir.MetricsFile, log):
        self.source, self.opts, self.metrics, self.log = source, opts, metrics, log
        self.device = select_device(opts.device)
        self.ctx, self.callbacks, self.d_vocab = None, None, None

    def score(self, path: Path, step: int, tokens: int, index: int) -> dict[str, Any]:
        """The row of the checkpoint at `path`, the `index`-th of the series."""
        hf = load_model(path, self.opts.dtype, self.device, self.opts.trust_remote_code)
        if self.ctx is None or self.d_vocab is None:
            tokenizer = load_tokenizer(path)
            if tokenizer is not None:  # the token ids scored: the tokenizer's
                if len(tokenizer) > hf.config.vocab_size:
                    raise SeriesError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                                      f"only {hf.config.vocab_size}")
                self.d_vocab = len(tokenizer)
            if self.ctx is None:
                probes, settings = series_probes(path, tokenizer, adapt(hf), self.opts)
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
        except (HubUnreachable, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - any bad checkpoint is recorded and passed
            message = " ".join(str(e).split()) or type(e).__name__
            self.log(f"error: {ck.name}: {message} (recorded; going on)")
            self.metrics.write({N.EVENT: FAILED, N.STEP: ck.step, "revision": ck.name, "message": message})
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


def series_checkpoints(source: str, opts: Options) -> list[Checkpoint]:
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SeriesError(f"{source} is not a directory of checkpoints")
        return local_series(local)
    if not opts.revisions:
        raise SeriesError(f"{source} is not a local directory; give the hub revisions with --revisions")
    revisions = hub_revisions(opts.revisions)
    for rev in revisions:
        if step_of(rev) is None:
            raise SeriesError(f"cannot tell the step of revision {rev!r} (no digits at its end)")
    return [Checkpoint(rev, step_of(rev), revision=rev) for rev in revisions]


def run_series(source: str, out: Path, opts: Options, log=print) -> list[dict[str, Any]]:
    """Score every checkpoint of `source` not yet in out/metrics.jsonl; returns the new rows."""
    if (out / rundir.CONFIG_FILE).exists() or (out / rundir.CHECKPOINTS).exists():
        raise SeriesError(f"{out} holds a training run; write the series to a directory of its own")
    checkpoints = series_checkpoints(source, opts)
    per_step = opts.tokens_per_step or (PYTHIA_TOKENS_PER_STEP if "pythia" in source.lower() else None)
    out.mkdir(parents=True, exist_ok=True)
    rundir.check_writable(out)
    done: set[int] = set()
    if (out / rundir.METRICS_FILE).is_file():
        done = {r[N.STEP] for r in rundir.read_metrics(out) if N.EVENT not in r and N.STEP in r}
    log(f"{len(checkpoints)} checkpoints, {sum(c.step in done for c in checkpoints)} already in {out / rundir.METRICS_FILE}")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}
    rundir.write_json_atomic(out / SERIES_FILE, {"source": source, "revisions": [c.name for c in checkpoints],
                                                 "tokens_per_step": per_step, "options": options})
    rows = []
    metrics = rundir.MetricsFile(out)
    scorer = Scorer(source, opts, metrics, log)
    try:
        for index, ck in enumerate(checkpoints):  # the index in the whole series: the callbacks' cadence
            if ck.step not in done:
                tokens = ck.tokens if ck.tokens is not None else ck.step * per_step if per_step else ck.step
                row = scorer(ck, index, tokens)
                rows += [row] if row is not None else []
    finally:
        metrics.close()
    rundir.write_status(out, rundir.FINISHED, max([c.step for c in checkpoints], default=0), None)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hub model name, or a local directory of checkpoint directories")
    parser.add_argument("--out", type=Path, required=True, help="run directory for metrics.jsonl")
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
    parser.add_argument("--trust-remote-code", action="store_true", help="allow models whose code is in their repository")
    args = vars(parser.parse_args(argv))
    source, out = args.pop("source"), args.pop("out")
    t0 = time.perf_counter()
    try:
        rows = run_series(source, out, Options(**args), log=lambda m: print(m, file=sys.stderr if m.startswith(
            ("error:", "note:")) else sys.stdout))
    except (SeriesError, ProbeFileError, ConfigError, rundir.CheckpointError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    per = f", {seconds / len(rows):.2f} s per checkpoint" if rows else ""
    print(f"scored {len(rows)} checkpoints in {seconds:.1f} s{per} -> {out / rundir.METRICS_FILE}; "
          f"next: uv run python -m analysis {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
