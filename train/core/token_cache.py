"""The token cache: a corpus tokenized once into shards on disk (train/core/text.py reads the corpus
and makes the tokenizer), reused by every later run, verified whenever it is opened.

* **Entries** (`build_shards`): `CACHE_DIR/<key>/`, keyed (`cache_key`) by the corpus (local
  files by size and modification time), the tokenizer settings and `FORMAT_VERSION`. Every
  document is tokenized (`datasets.map`, batched, in parallel for large non-streaming corpora),
  followed by the end-of-document id, and appended to uint16 (vocabularies up to 65536) or uint32
  files of at most `SHARD_TOKENS` tokens; every `heldout_every`-th document goes to the held-out
  split instead. `meta.json` lists the shards, each with its token count, largest id and digest
  (`shard_digest`), and the tokenizer is saved in `tokenizer/`.
* **Building** happens under a file lock, in a temporary directory renamed into place when
  complete, so concurrent runs build an entry once and a killed build leaves nothing half-made;
  what killed builds left is removed under the lock (`KEY.tmp-PID`, an entry without its
  meta.json). A stop signal (SIGTERM, SIGINT) ends a build within moments (`stop_on_signal`; the
  BPE trains in a child process that is killed) and raises BuildStopped.
* **Opening** (`verify_entry`, `open_shards`): every shard must be the regular file of the size
  and digest recorded at build, or the entry is refused with one line naming it; shards are
  read-only `numpy.memmap`s, so memory stays flat for corpora larger than RAM."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np

from train.core import limits, text
from train.core.config import ConfigError

FORMAT_VERSION = 2  # 2: a digest and the largest id per shard
SHARD_TOKENS = 1 << 26  # tokens per shard file (128 MiB as uint16)
FULL_HASH_BYTES = 64 << 20  # shards up to this size are hashed whole, larger ones by sampled blocks
HASH_BLOCKS, HASH_BLOCK_BYTES = 256, 64 << 10
TOKENIZER_DIR, META_FILE = "tokenizer", "meta.json"


def cache_key(source: str, source_config, split, text_column, max_documents, tokenizer: str,
              vocab_size: int, sample_documents: int, heldout_every: int) -> str:
    """Hash of everything the shards depend on; local files enter with their size and mtime."""
    files = text.local_files(source)
    corpus = ([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files] if files is not None
              else [source, source_config, split])
    spec = dict(corpus=corpus, text_column=text_column, max_documents=max_documents, tokenizer=tokenizer,
                vocab_size=vocab_size if tokenizer == "bpe" else None,
                sample_documents=sample_documents if tokenizer == "bpe" else None,
                heldout_every=heldout_every, format=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry_key(data) -> str:
    """The cache key (`cache_key`) of a `data=text` config section (train/core/config.py TextDataConfig)."""
    return cache_key(data["source"], data.get("source_config"), data.get("split", "train"), data.get("text_column", "text"),
                     data.get("max_documents"), data.get("tokenizer", "bpe"), data["vocab_size"],
                     data.get("tokenizer_documents", 100_000), data.get("heldout_every", 20))


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype):
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.files: list[dict] = []
        self._file, self._n = None, 0

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self._file is None or self._n == SHARD_TOKENS:
                self._open()
            take = min(arr.size, SHARD_TOKENS - self._n)
            arr[:take].tofile(self._file)
            self._n += take
            self.files[-1]["tokens"] = self._n
            self.files[-1]["max_id"] = max(self.files[-1]["max_id"], int(arr[:take].max()))
            arr = arr[take:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.files):05d}.bin"
        self._file, self._n = open(self.directory / name, "wb"), 0
        self.files.append({"file": name, "tokens": 0, "max_id": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for f in self.files:
            f["digest"] = shard_digest(self.directory / f["file"])


def shard_digest(path: Path) -> str:
    """SHA-256 of a shard file: of the whole file up to FULL_HASH_BYTES, else of its size and
    HASH_BLOCKS evenly spaced blocks of HASH_BLOCK_BYTES (a damaged or rewritten large shard is
    caught unless the damage misses every block; the batches check their ids as well)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        for i in range(HASH_BLOCKS):
            fh.seek((size - HASH_BLOCK_BYTES) * i // (HASH_BLOCKS - 1))
            h.update(fh.read(HASH_BLOCK_BYTES))
    return "sha256-sampled:" + h.hexdigest()


class BuildStopped(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived while a token cache entry was being built: the
    build was abandoned, and nothing of it is left."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum} while building the token cache; nothing of the build is left")
        self.signum = signum


@contextlib.contextmanager
def stop_on_signal():
    """In the main thread: raise BuildStopped at the first SIGTERM or SIGINT, after handing the
    signal to the handler installed before (the command line's record of it stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    raised: list[int] = []

    def handle(signum, frame):
        if callable(previous[signum]):
            previous[signum](signum, frame)
        if not raised:
            raised.append(signum)
            raise BuildStopped(signum)

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held():
    """Stop signals wait (are blocked) until the block ends: a clean-up that must not be cut short."""
    held = {signal.SIGTERM, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _recover(root: Path, key: str) -> None:
    """Under the entry's lock: remove what killed builds left (`KEY.tmp-PID`) and an entry without
    its meta.json (a broken one: an entry is published whole, meta.json included)."""
    for stale in root.glob(f"{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    entry = root / key
    if (entry.exists() or entry.is_symlink()) and not (entry / META_FILE).is_file():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def build_shards(source: str, cache_dir: str, *, source_config: str | None = None, split: str = "train",
                 text_column: str = "text", streaming: bool = False, max_documents: int | None = None,
                 tokenizer: str = "bpe", vocab_size: int = 4096, sample_documents: int = 100_000,
                 heldout_every: int = 20, num_proc: int | None = None) -> Path:
    """The cache entry for this corpus and tokenizer, built if missing, verified (`verify_entry`)
    if found; returns its directory. A stop signal during the build raises BuildStopped and
    leaves nothing of it."""
    from filelock import FileLock

    root = Path(os.path.expanduser(cache_dir))
    key = cache_key(source, source_config, split, text_column, max_documents, tokenizer, vocab_size,
                    sample_documents, heldout_every)
    entry = root / key
    if (entry / META_FILE).is_file():
        return verify_entry(entry)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (entry / META_FILE).is_file():  # another process built it while we waited
            return verify_entry(entry)
        _recover(root, key)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            with stop_on_signal():
                _write_entry(tmp, source, source_config, split, text_column, streaming, max_documents, tokenizer,
                             vocab_size, sample_documents, heldout_every, num_proc)
            os.replace(tmp, entry)
        finally:
            with signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _write_entry(tmp: Path, source, source_config, split, text_column, streaming, max_documents, tokenizer,
                 vocab_size, sample_documents, heldout_every, num_proc) -> None:
    corpus = text.load_corpus(source, source_config, split, text_column, streaming, max_documents)
    if tokenizer == "bpe":
        tok = text.train_bpe_stoppable(corpus, sample_documents, vocab_size, tmp)
    else:
        tok = text.pretrained_tokenizer(tokenizer)
    tok.save(tmp / TOKENIZER_DIR)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    def encode(batch):
        return {"ids": tok.encode([t for t in batch["text"]])}

    corpus = corpus.filter(text.has_text)
    if streaming:
        tokenized = corpus.map(encode, batched=True, remove_columns=["text"])
    else:
        procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if len(corpus) > 20_000 else None)
        tokenized = corpus.map(encode, batched=True, remove_columns=["text"], num_proc=procs,
                               desc="tokenizing", load_from_cache_file=False)
    writers = {name: _ShardWriter(tmp, name, dtype) for name in ("train", "heldout")}
    n_docs = {"train": 0, "heldout": 0}
    for i, row in enumerate(tokenized):
        name = "heldout" if heldout_every and i % heldout_every == heldout_every - 1 else "train"
        writers[name].write(row["ids"])
        n_docs[name] += 1
    for w in writers.values():
        w.close()
    if n_docs["train"] == 0 or not writers["train"].files:
        raise ConfigError(f"data.source={source} holds no text (column {text_column!r} is empty)")
    meta = {"format": FORMAT_VERSION, "source": source, "tokenizer": tokenizer, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "documents": n_docs,
            "shards": {name: w.files for name, w in writers.items()}}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(entry: Path) -> dict:
    """A cache entry's meta.json (ConfigError when it cannot be read)."""
    try:
        meta = limits.read_json(Path(entry) / META_FILE)
        if not (isinstance(meta, dict) and isinstance(meta.get("shards"), dict) and meta.get("format") == FORMAT_VERSION):
            raise ValueError("not a token cache entry of this version")
    except (OSError, ValueError) as e:
        raise ConfigError(f"the token cache entry {entry} is damaged ({e}); delete it to rebuild it") from None
    return meta


def verify_entry(entry: Path) -> Path:
    """`entry` when every shard is the file its build recorded (regular, of its recorded size and
    digest); ConfigError naming the entry to delete otherwise."""
    meta = read_meta(entry)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shard in [s for split in meta["shards"].values() for s in split]:
        path = Path(entry) / shard["file"]
        try:
            limits.check_regular_file(path)
            problem = ("its size differs from the recorded one" if path.stat().st_size != shard["tokens"] * itemsize
                       else "its content differs from the recorded one" if shard_digest(path) != shard["digest"]
                       else None)
        except (OSError, ValueError, KeyError) as e:
            problem = f"it cannot be read ({e})"
        if problem:
            raise ConfigError(f"the token cache entry {entry} is damaged: shard {shard.get('file')}: {problem}; "
                              f"delete {entry} to rebuild it")
    return Path(entry)


def open_shards(entry: Path, split: str) -> list[np.ndarray]:
    """The split's shards as read-only memory maps (in order)."""
    meta = read_meta(entry)
    return [np.memmap(Path(entry) / s["file"], dtype=meta["dtype"], mode="r", shape=(s["tokens"],))
            for s in meta["shards"][split] if s["tokens"]]
