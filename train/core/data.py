"""The data a run trains on, one builder per `data=` option (its config's `_target_`): the
embedded language (`data=repeats`, train/core/language.py), token ids from disk (`data=tokens`)
or natural text through the token cache (`data=text`; both train/core/tokens.py), each wrapped in
the repetition knob (`Repetition`, with `data.repeat.p > 0`). The probes are built from the
source in train/core/probes.py. Builder defaults are the config schema's (train/core/config.py:
RepeatsDataConfig, TokensDataConfig, TextDataConfig)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType

import torch

from train.core.config import RepeatConfig as _Repeat
from train.core.config import TextDataConfig as _Text
from train.core.config import TokensDataConfig as _Tokens
from train.core.language import RepeatsLanguage, generator
from train.core.tokens import TextCorpus, token_file


class Repetition:
    """The repetition knob, for any data source: with probability `p` a training sequence repeats
    a span of its own text, `min_span`..`max_span` tokens long, starting right after BOS:

    * `tile`: the span tiled to fill the context (BOS + span, span, span, ...);
    * `copy`: one later copy, at a uniformly drawn position after the span's end (the rest stays
      the sequence's text).

    The repeated tokens are the sequence's own text, never random tokens; held-out sets stay plain
    (`mixture` gives held-out sequences with the same repetition, for measuring both)."""

    def __init__(self, source, p: float, min_span: int, max_span: int, form: str):
        self.source, self.p, self.min_span, self.max_span, self.form = source, p, min_span, max_span, form

    def __getattr__(self, name):  # everything but the batches is the source's
        if name == "source":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def apply(self, seqs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, length = seqs.shape
        body = length - 1
        span = torch.randint(self.min_span, self.max_span + 1, (n,), generator=g)
        chosen = torch.rand(n, generator=g) < self.p
        pos = torch.arange(body)[None]
        if self.form == "tile":
            source_pos = pos % span[:, None]
        else:  # one later copy: positions [at, at + span) take positions [0, span)
            room = (body - 2 * span).clamp(min=0)
            at = span + (torch.rand(n, generator=g) * (room + 1)).long().clamp(max=room)
            inside = (pos >= at[:, None]) & (pos < (at + span)[:, None])
            source_pos = torch.where(inside, pos - at[:, None], pos)
        out = seqs.clone()
        out[chosen, 1:] = seqs[:, 1:].gather(1, source_pos)[chosen]
        return out

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self.apply(self.source.batch(step, batch_size), generator(self.source.seed, 5, step))

    def mixture(self, n_seq: int, seed: int) -> torch.Tensor:
        return self.apply(self.source.heldout(n_seq, seed), generator(self.source.seed, 6, seed))


NO_REPEAT = MappingProxyType(asdict(_Repeat()))  # the repetition knob's defaults (off)


def with_repetition(data, repeat: Mapping = NO_REPEAT):
    """`data` wrapped in the repetition knob (`Repetition`) when `repeat.p > 0`, else `data`: every
    source's builder ends here."""
    if repeat["p"] > 0:
        return Repetition(data, repeat["p"], repeat["min_span"], repeat["max_span"], repeat["form"])
    return data


def build_repeats(repeat: Mapping = NO_REPEAT, **language):
    """`data=repeats`: the embedded language (`language`: RepeatsLanguage's arguments)."""
    return with_repetition(RepeatsLanguage(**language), repeat)


def build_tokens(path: str | None = _Tokens.path, vocab_size: int = _Tokens.vocab_size, n_ctx: int = _Tokens.n_ctx,
                 seed: int = _Tokens.seed, repeat: Mapping = NO_REPEAT):
    """`data=tokens`: token ids from disk (`token_file`)."""
    if not path:
        raise ValueError("data=tokens needs data.path")
    return with_repetition(token_file(path, n_ctx=n_ctx, vocab_size=vocab_size, seed=seed), repeat)


def build_text(source: str | None = _Text.source, source_config: str | None = _Text.source_config,
               split: str = _Text.split, text_column: str = _Text.text_column, streaming: bool = _Text.streaming,
               max_documents: int | None = _Text.max_documents, tokenizer: str = _Text.tokenizer,
               tokenizer_documents: int = _Text.tokenizer_documents, heldout_every: int = _Text.heldout_every,
               cache_dir: str = _Text.cache_dir, vocab_size: int = _Text.vocab_size, n_ctx: int = _Text.n_ctx,
               seed: int = _Text.seed, repeat: Mapping = NO_REPEAT):
    """`data=text`: natural text, tokenized once into cached shards (train/core/token_cache.py)."""
    from train.core import token_cache

    if not source:
        raise ValueError("data=text needs data.source")
    entry = token_cache.build_shards(source, cache_dir, source_config=source_config, split=split,
                                     text_column=text_column, streaming=streaming, max_documents=max_documents,
                                     tokenizer=tokenizer, vocab_size=vocab_size, sample_documents=tokenizer_documents,
                                     heldout_every=heldout_every)
    return with_repetition(TextCorpus(entry, n_ctx=n_ctx, vocab_size=vocab_size, seed=seed), repeat)
