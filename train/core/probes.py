"""The fixed probe inputs every score runs on, built once per run (same probes at every
checkpoint): the main probes (`build_probes`: repeated random tokens, copy tokens, held-out
sequences), the robustness variants (`robustness_probes`), and the probe file an export carries
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
from train.core.data import BOS, Repetition, generator

PROBES_FILE = "probes.safetensors"  # an export's probe token ids (analysis/export.py)


class ProbeFileError(ValueError):
    """A probe file that cannot be read: one line, no traceback."""


@dataclass
class Probes:
    """Fixed probe inputs, built once per run (same probes at every checkpoint)."""

    repeated: torch.Tensor  # [n, 1 + period * repeats]: BOS + random segment tiled
    period: int
    repeats: int
    copy_tokens: torch.Tensor  # [k] random tokens for the copying score
    heldout: torch.Tensor  # [n_heldout, n_ctx] training-distribution sequences
    allowed: torch.Tensor  # the tokens random probes draw from (see probe_tokens); kept on the CPU
    heldout_mixture: torch.Tensor | None = None  # held-out sequences with the training repetition

    def to(self, device) -> "Probes":
        """Move the probe tensors to `device` (in place); returns self."""
        self.repeated, self.copy_tokens, self.heldout = (
            self.repeated.to(device), self.copy_tokens.to(device), self.heldout.to(device))
        if self.heldout_mixture is not None:
            self.heldout_mixture = self.heldout_mixture.to(device)
        return self


def repeated_random_tokens(
    n: int, period: int, repeats: int, allowed: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """BOS followed by `period` distinct random tokens (drawn from `allowed`) repeated `repeats` times."""
    if allowed.numel() < period:
        raise ValueError(f"probe period {period} needs at least {period} distinct allowed tokens, have {allowed.numel()}")
    segs = torch.stack([allowed[torch.randperm(allowed.numel(), generator=g)[:period]] for _ in range(n)])
    body = segs.repeat(1, repeats)
    return torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)


def probe_tokens(frequencies: torch.Tensor, exclude_fraction: float = 0.1) -> torch.Tensor:
    """The regular tokens that occur in the data, minus the most and least common
    `exclude_fraction` of them each (Olsson et al.). Tokens that never occur (a byte or BPE
    vocabulary larger than the corpus uses) are never probe tokens: their embeddings are untrained."""
    regular = torch.arange(1, frequencies.numel())
    order = regular[frequencies[1:].argsort(descending=True, stable=True)]
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
    allowed = probe_tokens(frequencies)
    if allowed.numel() < period:
        raise ValueError(f"probes.period: the prefix-matching probe repeats {period} distinct tokens (its period, "
                         f"scaled to data.n_ctx={n_ctx}), but data.vocab_size={frequencies.numel()} leaves "
                         f"{allowed.numel()} probe tokens (regular tokens minus the 10% most and least common); "
                         f"raise data.vocab_size or lower probes.period")
    repeated = repeated_random_tokens(n_probes, period, repeats, allowed, g)
    copy_tokens = allowed[torch.randperm(allowed.numel(), generator=g)[:n_copy_tokens]]
    n_mixture = n_heldout if n_heldout_mixture is None else n_heldout_mixture
    mixture = data.mixture(n_mixture, seed) if isinstance(data, Repetition) else None
    return Probes(repeated, period, repeats, copy_tokens, data.heldout(n_heldout, seed), allowed, mixture)


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
      tokens of each of the last `n_probes` held-out sequences, tiled `repeats` times.

    Variants that do not fit the context (or need more distinct tokens than the main probes'
    token set has, or fewer than 2 repeats) are left out."""
    heldout = probes.heldout.cpu()
    n_ctx = min(heldout.shape[1], n_ctx)
    allowed = probes.allowed
    g = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, torch.Tensor]] = []
    for period, repeats in variants:
        if 1 + period * repeats <= n_ctx and period <= allowed.numel() and repeats >= 2:
            sets.append((f"p{period}x{repeats}", repeated_random_tokens(n_probes, period, repeats, allowed, g)))
    for period, repeats in heldout_segments:
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


# -- the probe file of an export ------------------------------------------------------------
def write_probe_file(path: Path, tensors: dict[str, torch.Tensor], settings: dict[str, int]) -> None:
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
