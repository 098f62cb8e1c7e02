"""The fixed probe inputs every score runs on, built once per run (same probes at every
checkpoint): the main probes (`build_probes`: repeated random tokens, copy tokens, held-out
sequences), the robustness variants (`robustness_probes`), the building blocks of the
out-of-distribution sets (train/core/ood.py: `distinct_draws`, `tiled`, `substitute`,
`induction_targets`), and the probe file an export carries
(`write_probe_file`, `read_probe_file`: the exact token ids, so that other tools score an export
on the run's own probes). Definitions of what is measured on them: docs/METRICS.md. Defaults are
the config schema's (train/core/config.py ProbeConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from train.core.config import ProbeConfig as _Probes
from train.core.language import BOS, generator
from train.core.data import Repetition

PROBES_FILE = "probes.safetensors"  # an export's probe token ids (analysis/export.py)


class ProbeFileError(ValueError):
    """A probe file that cannot be read: one line, no traceback."""


# What a callback may need of the probes besides the main probes and copy tokens (Callback.requires).
HELDOUT, ALLOWED = "heldout", "allowed"


@dataclass
class Probes:
    """Fixed probe inputs, built once per run (same probes at every checkpoint)."""

    repeated: torch.Tensor  # [n, 1 + period * repeats]: BOS + random segment tiled
    period: int
    repeats: int
    copy_tokens: torch.Tensor  # [k] random tokens for the copying score
    heldout: torch.Tensor | None  # [n_heldout, n_ctx] training-distribution sequences (None: no text set)
    allowed: torch.Tensor | None  # the tokens random probes draw from (probe_tokens), on the CPU; None: unknown
    heldout_mixture: torch.Tensor | None = None  # held-out sequences with the training repetition
    reserved: torch.Tensor | None = None  # tokens training kept out of repeated segments (data.reserved_tokens), CPU

    def to(self, device) -> "Probes":
        """Move the probe tensors to `device` (in place); returns self."""
        self.repeated, self.copy_tokens = self.repeated.to(device), self.copy_tokens.to(device)
        if self.heldout is not None:
            self.heldout = self.heldout.to(device)
        if self.heldout_mixture is not None:
            self.heldout_mixture = self.heldout_mixture.to(device)
        return self

    def inputs(self) -> set[str]:
        """Which of the optional inputs (HELDOUT, ALLOWED) these probes have."""
        return {name for name, t in ((HELDOUT, self.heldout), (ALLOWED, self.allowed)) if t is not None}

    @property
    def bos(self) -> int:
        """The BOS id the probes start with."""
        return int(self.repeated[0, 0])


def repeated_random_tokens(
    n: int, period: int, repeats: int, allowed: torch.Tensor, g: torch.Generator, bos: int = BOS
) -> torch.Tensor:
    """`bos` followed by `period` distinct random tokens (drawn from `allowed`) repeated `repeats` times."""
    if allowed.numel() < period:
        raise ValueError(f"probe period {period} needs at least {period} distinct allowed tokens, have {allowed.numel()}")
    segs = torch.stack([allowed[torch.randperm(allowed.numel(), generator=g)[:period]] for _ in range(n)])
    body = segs.repeat(1, repeats)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


def probe_tokens(frequencies: torch.Tensor, exclude_fraction: float = 0.1, exclude=(BOS,)) -> torch.Tensor:
    """The regular tokens (all ids but those in `exclude`: BOS, or a tokenizer's special ids) that
    occur in the data, minus the most and least common `exclude_fraction` of them each (Olsson et
    al.; ties by id). Tokens that never occur (a byte or BPE vocabulary larger than the corpus
    uses) are never probe tokens: their embeddings are untrained."""
    keep = torch.ones(frequencies.numel(), dtype=torch.bool)
    keep[list(exclude)] = False
    regular = keep.nonzero().flatten()
    order = regular[frequencies[regular].argsort(descending=True, stable=True)]
    order = order[frequencies[order] > 0]
    k = int(len(order) * exclude_fraction)
    return order[k : len(order) - k].sort().values


def build_probes(
    data,
    n_ctx: int,
    n_probes: int = _Probes.n_probes,
    period: int = _Probes.period,
    repeats: int = _Probes.repeats,
    n_copy_tokens: int = _Probes.n_copy_tokens,
    n_heldout: int = _Probes.n_heldout,
    seed: int = _Probes.seed,
    n_heldout_mixture: int | None = _Probes.n_heldout_mixture,
) -> Probes:
    """Olsson's prefix-matching probe (BOS + 25 random tokens x 4) when it fits the context;
    otherwise the period is scaled down so that `repeats` copies fit."""
    if repeats < 2:
        raise ValueError(f"probes need at least 2 repeats, got {repeats}")
    if 1 + period * repeats > n_ctx:
        period = (n_ctx - 1) // repeats
        if period < 2:
            raise ValueError(f"context n_ctx={n_ctx} is too short for a probe with {repeats} repeats")
    g = generator(seed, 7)
    frequencies = data.token_frequencies()
    bos = getattr(data, "bos", BOS)
    reserved = tuple(getattr(data, "reserved_ids", ()))  # never in a training repeat: never in these probes
    allowed = probe_tokens(frequencies, exclude=(*getattr(data, "excluded_ids", (bos,)), *reserved))
    if allowed.numel() < period:
        raise ValueError(f"probes.period: the prefix-matching probe repeats {period} distinct tokens (its period, "
                         f"scaled to data.n_ctx={n_ctx}), but data.vocab_size={frequencies.numel()} leaves "
                         f"{allowed.numel()} probe tokens (regular tokens minus the 10% most and least common); "
                         f"raise data.vocab_size or lower probes.period")
    repeated = repeated_random_tokens(n_probes, period, repeats, allowed, g, bos)
    copy_tokens = allowed[torch.randperm(allowed.numel(), generator=g)[:n_copy_tokens]]
    n_mixture = n_heldout if n_heldout_mixture is None else n_heldout_mixture
    mixture = data.mixture(n_mixture, seed) if isinstance(data, Repetition) else None
    return Probes(repeated, period, repeats, copy_tokens, data.heldout(n_heldout, seed), allowed, mixture,
                  torch.tensor(reserved, dtype=torch.long) if reserved else None)


class TokenWindows:
    """A data source for `build_probes` over a fixed tokenized text set, e.g. text read with a
    model's tokenizer (analysis/series.py): `windows` [n, n_ctx], each BOS + text tokens, or None
    (no text set). Token frequencies: the counts of the windows' text tokens, the ids in
    `excluded_ids` (a tokenizer's special ids) left out; without a text set, a frequency falling
    over the ids 10%..50% of the vocabulary (BPE ids grow as tokens get rarer: the frequent half
    of the vocabulary, its most frequent tenth left out). held-out sequences: the windows."""

    def __init__(self, windows: torch.Tensor | None, vocab_size: int, bos: int, excluded_ids=()):
        self.windows, self.vocab_size, self.bos = windows, vocab_size, bos
        self.excluded_ids = sorted(set(excluded_ids))

    @classmethod
    def from_text(cls, documents: list[str] | None, tokenizer, n_ctx: int, n_seq: int) -> "TokenWindows":
        """Up to `n_seq` windows of the documents (None: no text set) read with a `transformers`
        tokenizer: its BOS id (else its end-of-text id, else 0), then n_ctx - 1 consecutive tokens of
        the documents joined with the end-of-text token; its special ids are excluded."""
        bos = next((int(t) for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
        windows, eos = None, tokenizer.eos_token_id
        if documents is not None:
            stream: list[int] = []
            for doc in documents:
                stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                if len(stream) >= n_seq * (n_ctx - 1):
                    break
            n = min(n_seq, len(stream) // (n_ctx - 1))
            if n < 1:
                raise ValueError(f"the text set holds {len(stream)} tokens, fewer than one window of {n_ctx - 1}")
            body = torch.tensor(stream[: n * (n_ctx - 1)]).view(n, n_ctx - 1)
            windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)
        return cls(windows, len(tokenizer), bos, getattr(tokenizer, "all_special_ids", None) or ())

    def token_frequencies(self) -> torch.Tensor:
        if self.windows is not None:
            return torch.bincount(self.windows[:, 1:].flatten(), minlength=self.vocab_size).float()
        ids, v = torch.arange(self.vocab_size), self.vocab_size
        return torch.where((ids >= v // 10) & (ids < v // 2), (v - ids).float(), 0.0)

    def heldout(self, n_seq: int, seed: int) -> torch.Tensor | None:
        return None if self.windows is None else self.windows[:n_seq]


def probes_from_config(data, n_ctx: int, probes_cfg) -> Probes:
    """The run's probes from its `probes` config section (training and re-analysis alike)."""
    p = probes_cfg
    return build_probes(data, n_ctx, p.n_probes, p.period, p.repeats, p.n_copy_tokens, p.n_heldout, p.seed,
                        p.get("n_heldout_mixture"))


def robustness_probes(probes: Probes, n_ctx: int, variants: list[tuple[int, int]],
                      heldout_segments: list[tuple[int, int]], n_probes: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Prefix-matching probe variants, as (name, tokens [n_probes, 1 + period * repeats]):

    * `p{period}x{repeats}` for each (period, repeats) in `variants`: repeated random tokens from
      the main probes' token set (`probes.allowed`), seeded by `seed`;
    * `text_p{period}x{repeats}` for each pair in `heldout_segments`: BOS + the first `period`
      tokens of each of the last `n_probes` held-out sequences, tiled `repeats` times (none
      without held-out sequences).

    Variants that do not fit the context (or need more distinct tokens than the main probes'
    token set has, or fewer than 2 repeats) are left out."""
    heldout = probes.heldout.cpu() if probes.heldout is not None else None
    n_ctx = min(heldout.shape[1], n_ctx) if heldout is not None else n_ctx
    allowed = probes.allowed
    g = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, torch.Tensor]] = []
    for period, repeats in variants:
        if 1 + period * repeats <= n_ctx and period <= allowed.numel() and repeats >= 2:
            sets.append((f"p{period}x{repeats}", repeated_random_tokens(n_probes, period, repeats, allowed, g, probes.bos)))
    for period, repeats in heldout_segments if heldout is not None else ():
        if 1 + period * repeats <= n_ctx and repeats >= 2:
            segment = heldout[-n_probes:, 1 : 1 + period]
            sets.append((f"text_p{period}x{repeats}", torch.cat([heldout[-n_probes:, :1], segment.repeat(1, repeats)], 1)))
    return sets


def concat_padded(batches: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """Token batches [n_i, len_i] as one batch [sum n_i, max len_i], each padded at the end with
    BOS (causal attention: padding changes nothing before it), and the rows of each batch."""
    length = max(t.shape[1] for t in batches)
    rows, start = [], 0
    for t in batches:
        rows.append(slice(start, start + t.shape[0]))
        start += t.shape[0]
    return torch.cat([F.pad(t, (0, length - t.shape[1]), value=BOS) for t in batches]), rows


# -- building blocks of the out-of-distribution sets (train/core/ood.py) ----------------------
def distinct_draws(n: int, k: int, pool: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[n, k]: per row, k distinct tokens of `pool` in random order."""
    return torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:k]] for _ in range(n)])


def tiled(segments: torch.Tensor, length: int, bos: int = BOS) -> torch.Tensor:
    """[n, length]: `bos` + each row of `segments` [n, period] tiled over the remaining positions
    (the last copy cut short where the length ends)."""
    n, period = segments.shape
    body = segments.repeat(1, -(-(length - 1) // period))[:, : length - 1]
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


def substitute(tokens: torch.Tensor, start: int, share: float, allowed: torch.Tensor,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with substitutions, substituted [n, length] bool): in each row, round(share x the
    positions from `start` on) of those positions, drawn at random, get distinct tokens of
    `allowed` that the row does not hold (fewer when there are not enough such tokens)."""
    out, where = tokens.clone(), torch.zeros_like(tokens, dtype=torch.bool)
    positions = tokens.shape[1] - start
    for row in range(tokens.shape[0]):
        fresh = allowed[~torch.isin(allowed, tokens[row])]
        k = min(round(share * positions), fresh.numel())
        at = start + torch.randperm(positions, generator=g)[:k]
        out[row, at] = fresh[torch.randperm(fresh.numel(), generator=g)[:k]]
        where[row, at] = True
    return out, where


def induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """[n, length - 1] bool: the predictions copying from context gets right, i.e. the prediction
    at i (of token i + 1) for which some j < i has token_j == token_i and token_{j+1} == token_{i+1}."""
    n = tokens.shape[1] - 1
    same = tokens[:, :n, None] == tokens[:, None, :n]  # [b, i, j]: token_i == token_j
    follows = tokens[:, 1:, None] == tokens[:, None, 1:]  # [b, i, j]: token_{i+1} == token_{j+1}
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    return (same & follows & earlier).any(-1)


# -- the probe file of an export ------------------------------------------------------------
def write_probe_file(path: Path, tensors: dict[str, torch.Tensor], settings: dict[str, int]) -> None:
    """`tensors`: repeated, copy_tokens, heldout, and optionally allowed and heldout_mixture (the
    Probes fields of the same names); `settings`: integers (period, repeats, icl_early, ...)."""
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in settings.items()})


def read_probe_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(tensors, settings) of a probes.safetensors (or of the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROBES_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            settings = {k: int(v) for k, v in (f.metadata() or {}).items()}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the same user-facing problem
        raise ProbeFileError(f"cannot read probe token ids from {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    missing = [k for k in ("repeated", "copy_tokens", "heldout") if k not in tensors]
    if missing:
        raise ProbeFileError(f"{path} lacks {', '.join(missing)}")
    return tensors, settings


def probes_from_file(path: str | Path) -> tuple[Probes, dict[str, int]]:
    """The Probes of a probe file (read_probe_file) and its settings. The period is the file's
    setting, else the smallest that repeats every probe; without `allowed` the token set is
    unknown (Probes.allowed None: the callbacks that draw new random probes are skipped)."""
    tensors, settings = read_probe_file(path)
    repeated = tensors["repeated"]
    period = settings.get("period") or _period(repeated)
    return Probes(repeated, period, (repeated.shape[1] - 1) // period, tensors["copy_tokens"], tensors["heldout"],
                  tensors.get("allowed"), tensors.get("heldout_mixture")), settings


def _period(repeated: torch.Tensor) -> int:
    body = repeated[:, 1:]
    n = body.shape[1]
    return next((p for p in range(1, n) if torch.equal(body[:, p:], body[:, :-p])), n)
