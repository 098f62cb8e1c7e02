"""Induction-head scores over a checkpoint series of any Hugging Face causal LM.

    uv run python -m analysis.series EleutherAI/pythia-70m --revisions pythia --text FILE --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions step1000 step2000 --out RUN_DIR
    uv run python -m analysis.series EleutherAI/pythia-70m --revisions 1000:143000:1000 --out RUN_DIR
    uv run python -m analysis.series EXPORT_DIR --probes EXPORT_DIR/step_0000000 --out RUN_DIR

SOURCE is a hub model name (its revisions: names, a range START:STOP:STEP of steps written
`step{N}`, or `pythia`, Pythia's 154 checkpoints: steps 0, 1, 2, 4, ..., 512, then every 1000 to
143000) or a local directory of checkpoint directories (each loadable by
`AutoModelForCausalLM.from_pretrained`, e.g. `python -m analysis.export RUN --all`). Steps come from
an export's induction_tracker.json, else from the digits ending a revision or directory name;
tokens = step x --tokens-per-step (Pythia: 2,097,152) unless the export records them.

At each checkpoint, with the model loaded by `transformers` (eager attention; --dtype fp32 or
bf16; --device auto: cuda, mps, cpu), the scores of a training run (train/core/metrics.py, same
definitions and row keys, train/core/names.py) are computed:

* prefix-matching and duplicate-token scores per head on BOS + `period` random tokens x
  `repeats`, the tokens drawn from the mid-frequency tokens of the text set (the most and least
  common 10% of the tokens it contains left out, train.core.data.probe_tokens; without a text set,
  token ids 10%..50% of the vocabulary, the frequent half of a BPE vocabulary), or the token ids
  given by --probes (a probes.safetensors as analysis.export writes: the run's own probes);
* the previous-token score on the first `n_previous_token` text sequences (the probes without
  a text set);
* per-position loss, held-out loss and the ICL score on the text set (--text: a .txt file, a
  `datasets` directory saved with save_to_disk, or a hub data set name, with a `text` column;
  tokenized with the model's tokenizer into BOS + n_ctx - 1 token windows);
* the copying score and the OV eigen-score per head, where the weights map onto W_E / W_V /
  W_O / W_U (this project's model type, GPT-2, GPT-NeoX and Llama families: `weight_view`).
  Their MLPs are left out (the direct path through one head); other architectures get the
  behavioral scores and a note.

Rows go to RUN_DIR/metrics.jsonl in a training run's format (train/core/rundir.py), so `python -m
analysis RUN_DIR` reads them unchanged. Steps already in the file are skipped (resume). A
checkpoint that fails (a missing revision, a model without attention weights, a vocabulary
mismatch) is recorded as a row {"event": "checkpoint_failed", "step", "revision", "message"} and
the series goes on. Hub revisions are removed from the download cache after use unless --keep-cache.
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
from torch import nn

from train.core import data as D
from train.core import probes as P
from train.core import metrics as M
from train.core import names as N
from train.core import rundir
from train.core.circuits import ov_eigen_score
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
def register_project_model() -> None:
    """This project's exports load with its own classes (no remote code needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from train.core.hf_model import MODEL_TYPE, AttnOnlyConfig, AttnOnlyForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, AttnOnlyConfig)
        AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM)
    except ValueError:  # already registered
        pass


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


# -- weights as W_E / W_V / W_O / W_U ------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, W_V: torch.Tensor, W_O: torch.Tensor):
        super().__init__()
        self.W_V, self.W_O = nn.Parameter(W_V, requires_grad=False), nn.Parameter(W_O, requires_grad=False)


class _Block(nn.Module):
    def __init__(self, ln1: nn.Module, attn: _Attn):
        super().__init__()
        self.ln1, self.attn = ln1, attn


class WeightView(nn.Module):
    """The weights the copying and OV eigen-scores read, with this project's names and shapes:
    W_E [d_vocab, d_model], blocks[l].ln1, blocks[l].attn.W_V [n_heads, d_model, d_head],
    blocks[l].attn.W_O [n_heads, d_head, d_model], ln_final, W_U [d_model, d_vocab] (fp32)."""

    def __init__(self, W_E, blocks: list[_Block], ln_final: nn.Module, W_U, d_vocab: int | None = None):
        super().__init__()
        d_vocab = d_vocab or W_E.shape[0]
        self.W_E = nn.Parameter(W_E[:d_vocab].float(), requires_grad=False)
        self.W_U = nn.Parameter(W_U[:, :d_vocab].float(), requires_grad=False)
        self.blocks, self.ln_final = nn.ModuleList(blocks), ln_final.float()
        self.n_layers, self.n_heads = len(blocks), blocks[0].attn.W_V.shape[0] if blocks else 0
        self.d_model = self.W_E.shape[1]


def _norm(module: nn.Module, d_model: int) -> nn.Module:
    """A copy of a family's LayerNorm / RMSNorm as torch's own (fp32)."""
    weight = module.weight.detach().float()
    if isinstance(module, nn.LayerNorm):
        ln = nn.LayerNorm(d_model, eps=module.eps)
        ln.weight.data, ln.bias.data = weight.clone(), module.bias.detach().float().clone()
        return ln
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    ln = nn.RMSNorm(d_model, eps=eps)
    ln.weight.data = weight.clone()
    return ln


def _heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[d_model, n_heads * d_head] (input-major) -> [n_heads, d_model, d_head]."""
    d = w.shape[0]
    return w.reshape(d, n_heads, -1).permute(1, 0, 2)


def weight_view(model, d_vocab: int | None = None) -> WeightView | None:
    """The model's weights as a WeightView for the families this knows (None for others)."""
    kind = model.config.model_type
    f = lambda t: t.detach().float()  # noqa: E731
    if kind == "induction_tracker":
        return model.model
    if kind == "gpt2":
        t, h = model.transformer, model.config.n_head
        d = model.config.n_embd
        blocks = [_Block(_norm(b.ln_1, d), _Attn(_heads(f(b.attn.c_attn.weight)[:, 2 * d:], h),
                                                 f(b.attn.c_proj.weight).reshape(h, -1, d))) for b in t.h]
        return WeightView(f(t.wte.weight), blocks, _norm(t.ln_f, d), f(model.get_output_embeddings().weight).T, d_vocab)
    if kind == "gpt_neox":
        t, h, d = model.gpt_neox, model.config.num_attention_heads, model.config.hidden_size
        blocks = []
        for b in t.layers:
            qkv = f(b.attention.query_key_value.weight).reshape(h, 3, -1, d)  # [h, q/k/v, e, d]
            blocks.append(_Block(_norm(b.input_layernorm, d),
                                 _Attn(qkv[:, 2].transpose(1, 2), f(b.attention.dense.weight).T.reshape(h, -1, d))))
        return WeightView(f(t.embed_in.weight), blocks, _norm(t.final_layer_norm, d), f(model.get_output_embeddings().weight).T, d_vocab)
    if kind in ("llama", "mistral", "qwen2"):
        t, c = model.model, model.config
        h, d = c.num_attention_heads, c.hidden_size
        groups = h // (getattr(c, "num_key_value_heads", None) or h)
        blocks = []
        for b in t.layers:
            w_v = _heads(f(b.self_attn.v_proj.weight).T, h // groups).repeat_interleave(groups, dim=0)
            blocks.append(_Block(_norm(b.input_layernorm, d),
                                 _Attn(w_v, f(b.self_attn.o_proj.weight).T.reshape(h, -1, d))))
        return WeightView(f(t.embed_tokens.weight), blocks, _norm(t.norm, d), f(model.get_output_embeddings().weight).T, d_vocab)
    return None


# -- probes and text -----------------------------------------------------------------------------
@dataclass
class SeriesProbes:
    repeated: torch.Tensor | None  # [n, 1 + period * repeats]
    copy_tokens: torch.Tensor | None  # [k]
    text: torch.Tensor | None  # [n_text, n_ctx] BOS + tokens
    n_previous_token: int = 64
    icl: tuple[int, int] | None = None  # (early, late) indices of the per-position loss


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


def text_windows(documents: list[str], tokenizer, n_ctx: int, n_seq: int, bos: int) -> torch.Tensor:
    """[n_seq, n_ctx]: BOS followed by consecutive n_ctx - 1 token windows of the documents, joined
    with the end-of-text token."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(stream) >= n_seq * (n_ctx - 1):
            break
    n = min(n_seq, len(stream) // (n_ctx - 1))
    if n < 1:
        raise SeriesError(f"the text set holds {len(stream)} tokens, fewer than one window of {n_ctx - 1}")
    body = torch.tensor(stream[: n * (n_ctx - 1)]).view(n, n_ctx - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


def mid_frequency_tokens(d_vocab: int, exclude: set[int], text: torch.Tensor | None) -> torch.Tensor:
    """Token ids the probes draw from (see the module docstring)."""
    if text is not None:
        counts = torch.bincount(text[:, 1:].flatten(), minlength=d_vocab).float()
    else:  # BPE ids grow as tokens get rarer: a falling "frequency" over the ids 10%..50%
        ids = torch.arange(d_vocab)
        counts = torch.where((ids >= d_vocab // 10) & (ids < d_vocab // 2), (d_vocab - ids).float(), 0.0)
    if exclude:
        counts[list(exclude)] = 0
    seen = counts.nonzero().flatten()
    # train.core.data.probe_tokens leaves out index 0 (BOS) and the most/least common tenths.
    return seen[P.probe_tokens(torch.cat([counts.new_zeros(1), counts[seen]])) - 1]


def build_series_probes(tokenizer, d_vocab: int, text: torch.Tensor | None, n_probes: int, period: int,
                        repeats: int, n_copy: int, seed: int) -> SeriesProbes:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = mid_frequency_tokens(d_vocab, special, text)
    g = D.generator(seed, 7)
    repeated = P.repeated_random_tokens(n_probes, period, repeats, allowed, g)
    repeated[:, 0] = bos_id(tokenizer)
    copy_tokens = allowed[torch.randperm(allowed.numel(), generator=g)[:n_copy]]
    icl = M.icl_indices(text.shape[1]) if text is not None else None
    return SeriesProbes(repeated, copy_tokens, text, icl=icl)


def bos_id(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def given_probes(path: Path) -> SeriesProbes:
    from train.core.probes import read_probe_file

    tensors, settings = read_probe_file(path)
    text = tensors["heldout"]
    icl = (settings["icl_early"], settings["icl_late"]) if "icl_early" in settings else M.icl_indices(text.shape[1])
    return SeriesProbes(tensors["repeated"], tensors["copy_tokens"], text,
                        settings.get("n_previous_token", 64), icl)


# -- one checkpoint --------------------------------------------------------------------------------
@torch.no_grad()
def hf_attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """[n_layers, batch, n_heads, query, key] attention patterns (fp32) of a transformers model."""
    out = model(tokens, output_attentions=True)
    if not out.attentions or any(a is None for a in out.attentions):
        raise SeriesError(f"{type(model).__name__} returns no attention weights (no eager attention path)")
    return torch.stack([a.float() for a in out.attentions])


@torch.no_grad()
def checkpoint_scores(model, probes: SeriesProbes, d_vocab: int | None = None) -> tuple[dict[str, Any], str | None]:
    """The results of one checkpoint by metric name (train/core/names.py), and a note on what was
    left out (None when nothing was)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    for name, t in (("probe", probes.repeated), ("text", probes.text), ("copy", probes.copy_tokens)):
        if t is not None and int(t.max()) >= vocab:
            raise SeriesError(f"{name} token id {int(t.max())} is outside the model's vocabulary of {vocab}")
    results: dict[str, Any] = {}
    repeated = probes.repeated.to(device)
    patterns = hf_attention_patterns(model, repeated)
    results[N.PREFIX_MATCHING] = M.prefix_matching_score(patterns, repeated).cpu()
    results[N.DUPLICATE_TOKEN] = M.duplicate_token_score(patterns, repeated).cpu()
    text = probes.text.to(device) if probes.text is not None else None
    prev_tokens = text[: probes.n_previous_token] if text is not None else repeated
    results[N.PREVIOUS_TOKEN] = M.previous_token_score(hf_attention_patterns(model, prev_tokens)).cpu()
    weights = weight_view(model, d_vocab)
    note = None
    if weights is not None:
        results[N.COPYING] = M.copying_score(weights, probes.copy_tokens.to(weights.W_E.device)).cpu()
    else:
        note = f"{model.config.model_type}: weights do not map onto W_E/W_V/W_O/W_U; copying and OV scores left out"
    if text is not None:
        losses = M.per_position_loss(model, text, batch_size=32).float().cpu()
        early, late = probes.icl
        results |= {N.LOSS_HELDOUT: float(losses.mean()), N.ICL_SCORE: float(M.icl_score(losses, early, late)),
                    N.ICL_EARLY: early, N.ICL_LATE: late, N.PER_POSITION_LOSS: losses}
    if weights is not None:
        results[N.OV_COPYING] = ov_eigen_score(weights).cpu()
    return results, note


# -- the series ----------------------------------------------------------------------------------
@dataclass
class Options:
    revisions: list[str] | None = None
    tokens_per_step: int | None = None
    probes: Path | None = None
    text: str | None = None
    text_split: str = "train"
    n_text: int = 256
    n_ctx: int = 512
    n_probes: int = 16
    period: int = 25
    repeats: int = 4
    n_copy_tokens: int = 48
    seed: int = 1234
    dtype: str = "fp32"
    device: str = "auto"
    keep_cache: bool = False
    trust_remote_code: bool = False


def run_series(source: str, out: Path, opts: Options, log=print) -> list[dict[str, Any]]:
    """Score every checkpoint of `source` not yet in out/metrics.jsonl; returns the new rows."""
    if (out / rundir.CONFIG_FILE).exists() or (out / rundir.CHECKPOINTS).exists():
        raise SeriesError(f"{out} holds a training run; write the series to a directory of its own")
    register_project_model()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SeriesError(f"{source} is not a directory of checkpoints")
        checkpoints = local_series(local)
    else:
        if not opts.revisions:
            raise SeriesError(f"{source} is not a local directory; give the hub revisions with --revisions")
        checkpoints = []
        for rev in hub_revisions(opts.revisions):
            step = step_of(rev)
            if step is None:
                raise SeriesError(f"cannot tell the step of revision {rev!r} (no digits at its end)")
            checkpoints.append(Checkpoint(rev, step, revision=rev))
    per_step = opts.tokens_per_step or (PYTHIA_TOKENS_PER_STEP if "pythia" in source.lower() else None)
    out.mkdir(parents=True, exist_ok=True)
    rundir.check_writable(out)
    done: set[int] = set()
    if (out / rundir.METRICS_FILE).is_file():
        done = {r[N.STEP] for r in rundir.read_metrics(out) if N.EVENT not in r and N.STEP in r}
    todo = [c for c in checkpoints if c.step not in done]
    log(f"{len(checkpoints)} checkpoints, {len(checkpoints) - len(todo)} already in {out / rundir.METRICS_FILE}")
    rundir.write_json_atomic(out / SERIES_FILE, {"source": source, "revisions": [c.name for c in checkpoints],
                                                 "tokens_per_step": per_step, "options": {
                                                     k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(opts).items()}})
    device = select_device(opts.device)
    probes: SeriesProbes | None = given_probes(opts.probes) if opts.probes else None
    d_vocab: int | None = None
    notes: set[str] = set()
    metrics = rundir.MetricsFile(out)
    rows = []
    try:
        for ck in todo:
            t0 = time.perf_counter()
            snapshot = None
            try:
                path = ck.path
                if path is None:
                    path = snapshot = fetch(source, ck.revision)
                model = load_model(path, opts.dtype, device, opts.trust_remote_code)
                if probes is None or d_vocab is None:
                    tokenizer = load_tokenizer(path)
                    if tokenizer is not None:
                        d_vocab = check_vocab(tokenizer, model)
                    if probes is None:
                        probes = probes_for(tokenizer, model, opts)
                results, note = checkpoint_scores(model, probes, d_vocab)
            except HubUnreachable:
                raise
            except Exception as e:  # noqa: BLE001 - any bad checkpoint is recorded and passed
                message = " ".join(str(e).split()) or type(e).__name__
                log(f"error: {ck.name}: {message} (recorded; going on)")
                metrics.write({N.EVENT: FAILED, N.STEP: ck.step, "revision": ck.name, "message": message})
                continue
            finally:
                if snapshot is not None and not opts.keep_cache:
                    free_revision(snapshot)
            if note and note not in notes:
                notes.add(note)
                log(f"note: {note}")
            tokens = ck.tokens if ck.tokens is not None else ck.step * per_step if per_step else ck.step
            row = {N.STEP: ck.step, N.TOKENS: tokens} | N.flatten(results)
            metrics.write(row)
            rows.append(row)
            pm = results[N.PREFIX_MATCHING]
            log(f"{ck.name}: step {ck.step}, max prefix matching {float(pm.max()):.3f}"
                + (f", ICL score {results[N.ICL_SCORE]:.3f}" if N.ICL_SCORE in results else "")
                + f" ({time.perf_counter() - t0:.1f} s)")
            del model
    finally:
        metrics.close()
    last = max([c.step for c in checkpoints], default=0)
    rundir.write_status(out, rundir.FINISHED, last, None)
    return rows


def check_vocab(tokenizer, model) -> int:
    """The number of token ids scored (the tokenizer's); refuses a tokenizer larger than the model."""
    n_model, n_tok = model.config.vocab_size, len(tokenizer)
    if n_tok > n_model:
        raise SeriesError(f"the tokenizer has {n_tok} tokens but the model's vocabulary only {n_model}")
    return n_tok


def probes_for(tokenizer, model, opts: Options) -> SeriesProbes:
    if tokenizer is None:
        raise SeriesError("the checkpoint has no tokenizer; give probe token ids with --probes")
    n_ctx = min(opts.n_ctx, getattr(model.config, "max_position_embeddings", opts.n_ctx) or opts.n_ctx)
    text = None
    if opts.text:
        text = text_windows(read_text(opts.text, opts.text_split), tokenizer, n_ctx, opts.n_text, bos_id(tokenizer))
    vocab = len(tokenizer)
    return build_series_probes(tokenizer, vocab, text, opts.n_probes, opts.period, opts.repeats,
                               opts.n_copy_tokens, opts.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="hub model name, or a local directory of checkpoint directories")
    parser.add_argument("--out", type=Path, required=True, help="run directory for metrics.jsonl")
    parser.add_argument("--revisions", nargs="+", metavar="REV", help="hub revisions: names, START:STOP:STEP, or pythia")
    parser.add_argument("--tokens-per-step", type=int, help="tokens per step (default: Pythia's for Pythia models)")
    parser.add_argument("--probes", type=Path, help="probe token ids: a probes.safetensors (analysis.export), or its directory")
    parser.add_argument("--text", help="text set: .txt file, datasets directory, or hub data set name")
    parser.add_argument("--text-split", default="train")
    parser.add_argument("--n-text", type=int, default=256, help="text sequences (default 256)")
    parser.add_argument("--n-ctx", type=int, default=512, help="text sequence length incl. BOS (default 512)")
    parser.add_argument("--n-probes", type=int, default=16)
    parser.add_argument("--period", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-cache", action="store_true", help="keep downloaded revisions in the cache")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow models whose code is in their repository")
    args = parser.parse_args(argv)
    opts = Options(args.revisions, args.tokens_per_step, args.probes, args.text, args.text_split, args.n_text,
                   args.n_ctx, args.n_probes, args.period, args.repeats, seed=args.seed, dtype=args.dtype,
                   device=args.device, keep_cache=args.keep_cache, trust_remote_code=args.trust_remote_code)
    t0 = time.perf_counter()
    try:
        rows = run_series(args.source, args.out, opts, log=lambda m: print(m, file=sys.stderr if m.startswith(
            ("error:", "note:")) else sys.stdout))
    except (SeriesError, ProbeFileError, rundir.CheckpointError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    per = f", {seconds / len(rows):.2f} s per checkpoint" if rows else ""
    print(f"scored {len(rows)} checkpoints in {seconds:.1f} s{per} -> {args.out / rundir.METRICS_FILE}; "
          f"next: uv run python -m analysis {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
