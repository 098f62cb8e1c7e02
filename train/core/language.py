"""The embedded language (`data=repeats`): training data from a seeded generator, no download.
It mixes two kinds of structure:

* a fixed sparse **bigram chain** (every token has ``branching`` likely successors, weights drawn
  once from ``seed``): learnable without context, so the loss falls early, as on natural text;
* **repeated segments**: with probability ``p_repeat`` a sequence is a segment of random length
  (``min_period``..``max_period``) tiled to fill the context. A segment is uniform random tokens
  with probability ``p_uniform_segment``, else a run of the bigram chain. Only copying from
  context (an induction head) predicts the repeats, and the random period means no fixed
  positional offset does. ``reserved_tokens`` N > 0 keeps the last N regular ids out of every
  repeated segment (replaced there by ids 1..N; the OOD suite's held-out tokens, train/core/ood.py).

Every sequence starts with BOS (token id 0). ``batch(step)`` is a pure function of
(seed, step), so a resumed run sees exactly the data an uninterrupted one would; `generator`
seeds every draw of every data source from a tuple of integers. Constructor defaults are the
config schema's (train/core/config.py RepeatsDataConfig)."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from train.core.config import REPEATS_MAX_VOCAB
from train.core.config import RepeatsDataConfig as _Data

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
