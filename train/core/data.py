"""Training data: an embedded, seeded generator (no download), token ids from disk, or natural text;
each source its own builder (`data=repeats`, `data=tokens`, `data=text`), every one wrapped in the
repetition knob (`with_repetition`).

The embedded language ("repeats") mixes two kinds of structure:

* a fixed sparse **bigram chain** (every token has ``branching`` likely successors, weights drawn
  once from ``seed``): learnable without context, so the loss falls early, as on natural text;
* **repeated segments**: with probability ``p_repeat`` a sequence is a segment of random length
  (``min_period``..``max_period``) tiled to fill the context. A segment is uniform random tokens
  with probability ``p_uniform_segment``, else a run of the bigram chain. Only copying from
  context (an induction head) predicts the repeats, and the random period means no fixed
  positional offset does. ``reserved_tokens`` N > 0 keeps the last N regular ids out of every
  repeated segment (replaced there by ids 1..N; the OOD suite's held-out tokens, train/core/ood.py).

Every sequence starts with BOS (token id 0). ``batch(step)`` is a pure function of
(seed, step), so a resumed run sees exactly the data an uninterrupted one would.

The probes are built from a data source in train/core/probes.py. Constructor defaults are the
config schema's (train/core/config.py: RepeatsDataConfig, TokensDataConfig, TextDataConfig)."""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType

import numpy as np
import torch

from train.core.config import REPEATS_MAX_VOCAB, ConfigError, RepeatConfig as _Repeat, RepeatsDataConfig as _Data
from train.core.config import TextDataConfig as _Text
from train.core.config import TokensDataConfig as _Tokens

BOS = 0
BATCH_BLOCK = 16  # RepeatsLanguage makes its training batches this many steps at a time


def generator(*seeds: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (numpy's SeedSequence): each tuple, e.g.
    (data seed, 1, step) for a training batch, its own independent stream."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


class RepeatsLanguage:
    """The embedded default data set: bigram-chain text with repeated random segments."""

    def __init__(
        self,
        vocab_size: int = _Data.vocab_size,
        n_ctx: int = _Data.n_ctx,
        seed: int = _Data.seed,
        p_repeat: float = _Data.p_repeat,
        p_uniform_segment: float = _Data.p_uniform_segment,
        min_period: int = _Data.min_period,
        max_period: int = _Data.max_period,
        branching: int = _Data.branching,
        reserved_tokens: int = _Data.reserved_tokens,
    ):
        if not 8 <= vocab_size <= REPEATS_MAX_VOCAB:  # a permutation per token: time quadratic in the vocabulary
            raise ValueError(f"data.vocab_size must lie in [8, {REPEATS_MAX_VOCAB}] for data=repeats, got {vocab_size}")
        if not 1 <= min_period <= max_period:
            raise ValueError(f"need 1 <= data.min_period <= data.max_period, got {min_period}, {max_period}")
        if max_period >= n_ctx - 1:
            raise ValueError(f"data.max_period={max_period} leaves no repeat in a context of {n_ctx}")
        for name, p in dict(p_repeat=p_repeat, p_uniform_segment=p_uniform_segment).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"data.{name} must lie in [0, 1], got {p}")
        if not 0 <= reserved_tokens <= (vocab_size - 1) // 2:
            raise ValueError(f"data.reserved_tokens must lie in [0, {(vocab_size - 1) // 2}], got {reserved_tokens}")
        self.vocab_size, self.n_ctx, self.seed = vocab_size, n_ctx, seed
        self.p_repeat, self.p_uniform_segment = p_repeat, p_uniform_segment
        self.min_period, self.max_period = min_period, max_period
        self.reserved_ids = tuple(range(vocab_size - reserved_tokens, vocab_size))  # kept out of repeated segments
        self._keep = torch.cat([torch.arange(vocab_size - reserved_tokens), torch.arange(1, reserved_tokens + 1)])
        g = generator(seed, 0xC4A1)
        n = vocab_size - 1  # regular tokens are 1..vocab_size-1
        # copies: a view would keep its whole permutation alive (memory quadratic in the vocabulary)
        self.successors = torch.stack([torch.randperm(n, generator=g)[:branching].clone() for _ in range(n)]) + 1
        w = -torch.log(torch.rand(n, branching, generator=g))  # Dirichlet(1) via normalised exponentials
        self.cum_probs = (w / w.sum(1, keepdim=True)).cumsum(1)
        self.cum_probs[:, -1] = 1.0
        self._cum_np = self.cum_probs.numpy()
        self._succ_np = (self.successors - 1).numpy()
        self._block_key: tuple[int, int] | None = None  # the block of training batches made last
        self._block: list[torch.Tensor] = []

    # -- sampling ------------------------------------------------------------------------------
    def _draw(self, n_seq: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Every random number of `n_seq` sequences, in the generator's order: the chain's start
        tokens and uniforms, the uniform segments, the periods, and which rows repeat and which
        segments are uniform."""
        body = self.n_ctx - 1
        start = torch.randint(1, self.vocab_size, (n_seq,), generator=g)
        u = torch.rand(n_seq, body, 1, generator=g)
        uniform = torch.randint(1, self.vocab_size, (n_seq, self.max_period), generator=g)
        period = torch.randint(self.min_period, self.max_period + 1, (n_seq,), generator=g)
        is_repeat = torch.rand(n_seq, generator=g) < self.p_repeat
        is_uniform = torch.rand(n_seq, generator=g) < self.p_uniform_segment
        return start, u, uniform, period, is_repeat, is_uniform

    def _chain(self, start: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The bigram-chain walks from `start` [n] driven by the uniforms `u` [n, length, 1]. A
        sequential walk over positions, vectorised over rows (each row its own walk): numpy's
        per-call overhead is far below torch's for tiny arrays."""
        cur, u = start.numpy() - 1, u.numpy()
        cum, succ = self._cum_np, self._succ_np
        out = np.empty(u.shape[:2], dtype=np.int64)
        for t in range(u.shape[1]):
            out[:, t] = cur
            choice = (cum[cur] < u[:, t]).sum(1)
            cur = succ[cur, choice]
        return torch.from_numpy(out + 1)

    def _assemble(self, chain: torch.Tensor, uniform, period, is_repeat, is_uniform) -> torch.Tensor:
        body = self.n_ctx - 1
        segment = torch.where(is_uniform[:, None], uniform, chain[:, : self.max_period])
        segment = self._keep[segment] if self.reserved_ids else segment
        idx = torch.arange(body)[None] % period[:, None]
        tiled = segment.gather(1, idx)
        seqs = torch.where(is_repeat[:, None], tiled, chain)
        return torch.cat([torch.full((chain.shape[0], 1), BOS, dtype=torch.long), seqs], dim=1)

    def sample(self, n_seq: int, g: torch.Generator) -> torch.Tensor:
        start, u, *rest = self._draw(n_seq, g)
        return self._assemble(self._chain(start, u), *rest)

    def batches(self, first_step: int, n_steps: int, batch_size: int) -> list[torch.Tensor]:
        """`[batch(s, batch_size) for s in first_step .. first_step + n_steps - 1]`, equal
        element for element, with one chain walk over all their rows (the walk's cost is per
        position, nearly independent of the number of rows)."""
        draws = [self._draw(batch_size, generator(self.seed, 1, s)) for s in range(first_step, first_step + n_steps)]
        chains = self._chain(torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])).split(batch_size)
        return [self._assemble(c, *d[2:]) for c, d in zip(chains, draws)]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The training batch of `step`: a pure function of (seed, step). Batches are made
        `BATCH_BLOCK` steps at a time (`batches`) and handed out from that block."""
        key = (step // BATCH_BLOCK, batch_size)
        if self._block_key != key:
            self._block = self.batches(key[0] * BATCH_BLOCK, BATCH_BLOCK, batch_size)
            self._block_key = key
        return self._block[step % BATCH_BLOCK].clone()  # the caller may change it; the block stays

    def heldout(self, n_seq: int, seed: int) -> torch.Tensor:
        return self.sample(n_seq, generator(self.seed, 2, seed))

    def token_frequencies(self, n_seq: int = 256) -> torch.Tensor:
        return torch.bincount(self.sample(n_seq, generator(self.seed, 3)).flatten(), minlength=self.vocab_size).float()

    # -- the same generator as Hugging Face `datasets` objects ---------------------------------
    def as_iterable_dataset(self, batch_size: int = 64):
        """An endless `datasets.IterableDataset` of {"input_ids": [n_ctx]} rows, in training order."""
        import datasets

        def rows():
            for step in itertools.count():
                for seq in self.batch(step, batch_size):
                    yield {"input_ids": seq.tolist()}

        return datasets.IterableDataset.from_generator(rows)

    def as_dataset(self, n_seq: int, seed: int):
        """A fixed `datasets.Dataset` from the generator (the held-out set), torch-formatted."""
        import datasets

        return datasets.Dataset.from_dict({"input_ids": self.heldout(n_seq, seed).tolist()}).with_format("torch")


class TokenStream:
    """Windows of token streams: each sequence is BOS + `n_ctx - 1` consecutive tokens of one
    stream, the stream and offset drawn uniformly over all windows (seeded by step for training,
    by `seed` for held-out sets). Streams are 1-D arrays (numpy memory maps for shards), so
    memory stays flat however large the corpus."""

    def __init__(self, train: list, heldout: list, n_ctx: int, vocab_size: int, seed: int = 0):
        self.n_ctx, self.vocab_size, self.seed = n_ctx, vocab_size, seed
        self.train_streams, self.heldout_streams = train, heldout

    def _windows(self, streams: list, n_seq: int, g: torch.Generator) -> torch.Tensor:
        body = self.n_ctx - 1
        counts = torch.tensor([max(len(s) - body, 0) for s in streams])
        starts = torch.randint(0, int(counts.sum()), (n_seq,), generator=g)
        if len(streams) == 1 and isinstance(streams[0], torch.Tensor):
            seqs = streams[0][starts[:, None] + torch.arange(body)[None]]
        else:
            ends = counts.cumsum(0)
            which = torch.searchsorted(ends, starts, right=True)
            offsets = starts - (ends - counts)[which]
            seqs = torch.from_numpy(np.stack([np.asarray(streams[w][o : o + body], dtype=np.int64)
                                              for w, o in zip(which.tolist(), offsets.tolist())]))
            if n_seq and int(seqs.max()) >= self.vocab_size:  # shards are verified on open: the last word
                raise ConfigError(f"token id {int(seqs.max())} >= data.vocab_size: the token cache is damaged")
        return torch.cat([torch.full((n_seq, 1), BOS, dtype=torch.long), seqs], dim=1)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self._windows(self.train_streams, batch_size, generator(self.seed, 1, step))

    def heldout(self, n_seq: int, seed: int) -> torch.Tensor:
        return self._windows(self.heldout_streams, n_seq, generator(self.seed, 2, seed))

    def token_frequencies(self, max_tokens: int = 1 << 24) -> torch.Tensor:
        """Token counts over the training streams (at most `max_tokens`, spread over the streams)."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        share = max(max_tokens // max(len(self.train_streams), 1), 1)
        for s in self.train_streams:
            counts += np.bincount(np.asarray(s[:share], dtype=np.int64), minlength=self.vocab_size)[: self.vocab_size]
        return torch.from_numpy(counts).float()


def _check_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{where} has token ids outside [0, {vocab_size}) (max {int(tokens.max())}); "
                         f"set data.vocab_size to at least {int(tokens.max()) + 1}")


class TokenRows:
    """Whole rows of an `[n, n_ctx]` (BOS first) or `[n, n_ctx - 1]` (BOS prepended) token array:
    training batches draw rows (seeded by step) from the first rows, held-out sets from the last
    `heldout_fraction` of them."""

    def __init__(self, rows: np.ndarray, n_ctx: int, vocab_size: int, seed: int = 0, heldout_fraction: float = 0.05,
                 where: str = "data.path"):
        if rows.shape[1] == n_ctx - 1:
            rows = np.concatenate([np.full((rows.shape[0], 1), BOS, dtype=rows.dtype), rows], axis=1)
        if rows.shape[1] != n_ctx or (rows[:, 0] != BOS).any():
            raise ValueError(f"{where} holds rows of {rows.shape[1]} tokens; rows must have data.n_ctx={n_ctx} "
                             f"tokens starting with BOS (id {BOS}) or data.n_ctx - 1 = {n_ctx - 1} tokens")
        if rows.shape[0] < 2:
            raise ValueError(f"{where} holds {rows.shape[0]} row; need at least 2 (training and held-out)")
        self.n_ctx, self.vocab_size, self.seed = n_ctx, vocab_size, seed
        n_heldout = max(1, int(round(rows.shape[0] * heldout_fraction)))
        tensor = torch.from_numpy(rows.astype(np.int64))
        self.train_rows, self.heldout_rows = tensor[:-n_heldout], tensor[-n_heldout:]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        return self.train_rows[torch.randint(0, len(self.train_rows), (batch_size,), generator=generator(self.seed, 1, step))]

    def heldout(self, n_seq: int, seed: int) -> torch.Tensor:
        return self.heldout_rows[torch.randint(0, len(self.heldout_rows), (n_seq,), generator=generator(self.seed, 2, seed))]

    def token_frequencies(self) -> torch.Tensor:
        return torch.bincount(self.train_rows.flatten(), minlength=self.vocab_size).float()


def _read_npy(path: str) -> np.ndarray:
    """A `.npy` array, without pickle: any other file (text, pickle, a truncated array) is refused
    with a message that says what the file is."""
    where = f"cannot read tokens from {path}"
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise ValueError(f"{where}: not a .npy file (no NumPy header); save token ids with np.save")
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if str(e).startswith(where):
            raise
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{where}: it holds Python objects, not token ids; save an integer array") from None
        raise ValueError(f"{where}: {e}") from None
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror or e}") from None


def token_file(path: str, n_ctx: int, vocab_size: int, seed: int = 0, heldout_fraction: float = 0.05):
    """Token ids from disk: a `.npy` array (a flat stream, or `[n, n_ctx]` rows kept as rows) or a
    directory saved by `datasets.Dataset.save_to_disk` with an ``input_ids`` column (a stream).
    A stream's last `heldout_fraction` is the held-out split."""
    path = os.path.expanduser(path)
    if not (os.path.isdir(path) or os.path.isfile(path)):  # missing, or a FIFO or device: a read would block
        raise FileNotFoundError(f"data.path {'is no regular file' if os.path.exists(path) else 'does not exist'}: {path}")
    if os.path.isdir(path):
        import datasets

        ds = datasets.load_from_disk(path)
        if "input_ids" not in ds.column_names:
            raise ValueError(f"dataset at {path} has no 'input_ids' column (columns: {ds.column_names})")
        arrays = [np.asarray(r) for r in ds["input_ids"]]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    else:
        tokens = _read_npy(path)
    if not np.issubdtype(tokens.dtype, np.integer):  # bool is not an integer dtype here
        raise ValueError(f"{path} holds {tokens.dtype} values; token ids must be integers "
                         f"(convert them with .astype(np.int64) if they are whole numbers)")
    _check_ids(tokens, vocab_size, path)
    if tokens.ndim == 2:
        return TokenRows(tokens, n_ctx, vocab_size, seed, heldout_fraction, where=path)
    tokens = tokens.astype(np.int64).reshape(-1)
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"{path} holds {tokens.size} tokens, fewer than two contexts of {n_ctx}")
    split = int(tokens.size * (1 - heldout_fraction))
    train = torch.from_numpy(tokens[:split])
    heldout = torch.from_numpy(tokens[split:]) if tokens.size - split > n_ctx else train
    return TokenStream([train], [heldout], n_ctx, vocab_size, seed)


class TextCorpus(TokenStream):
    """Natural text from the token shards of a cache entry (train/core/token_cache.py): documents joined
    with the end-of-document id, held-out documents in their own shards; `tokenizer_dir` holds the
    tokenizer that decodes the ids."""

    def __init__(self, entry, n_ctx: int, vocab_size: int, seed: int = 0):
        from train.core import token_cache

        meta = token_cache.read_meta(entry)
        if meta["vocab_size"] > vocab_size:
            raise ValueError(f"the tokenizer has {meta['vocab_size']} tokens; set data.vocab_size={meta['vocab_size']}")
        train, heldout = token_cache.open_shards(entry, "train"), token_cache.open_shards(entry, "heldout")
        for name, streams in (("training", train), ("held-out", heldout)):
            if not any(len(s) > n_ctx - 1 for s in streams):
                raise ValueError(f"the corpus's {name} split has fewer tokens than one context "
                                 f"(data.n_ctx={n_ctx}); give more text or a shorter context")
        super().__init__(train, heldout, n_ctx, vocab_size, seed)
        self.entry, self.meta, self.tokenizer_dir = entry, meta, entry / token_cache.TOKENIZER_DIR


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
