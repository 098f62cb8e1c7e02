"""Token ids that already exist: a token file from disk (`data=tokens`: a `.npy` array or a
`datasets` directory, as a stream of windows or as whole rows) and the shards of the text cache
(`data=text`, train/core/token_cache.py). Each source draws its training batches as a pure
function of (seed, step) and its held-out sets of (seed, set seed), as the embedded language
does (train/core/language.py); train/core/data.py builds these sources from config."""
from __future__ import annotations

import os

import numpy as np
import torch

from train.core.config import ConfigError
from train.core.language import BOS, generator


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
