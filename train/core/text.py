"""Natural text to token shards: read a corpus with `datasets`, tokenize it once, stream it forever.

* **Corpus** (`load_corpus`): local files (`.txt`: one document per paragraph, i.e. blocks
  separated by blank lines; `.jsonl`/`.json`; `.parquet`), a directory or a glob of them, or a
  Hugging Face hub dataset (name, config, split, text column; streaming for large ones).
* **Tokenizer** (`build_tokenizer`): `bpe` trains a byte-level BPE of `vocab_size` tokens with
  `tokenizers` on the first `sample_documents` documents. Its ids 0 and 1 are the special tokens
  BOS (`<|bos|>`) and end of document (`<|endoftext|>`); `vocab_size=258` is plain bytes (no
  merges). Any other value is a `transformers.AutoTokenizer` name or path; its ids are shifted up by
  one (`offset` 1) so that id 0 stays BOS, and its own EOS (else BOS) token ends documents.
* **Shards** (`build_shards`): every document is tokenized (`datasets.map`, batched, in parallel
  for large non-streaming corpora), followed by the end-of-document id, and appended to uint16
  (vocabularies up to 65536) or uint32 files of at most `SHARD_TOKENS` tokens; every
  `heldout_every`-th document goes to the held-out split instead. The cache entry
  (`CACHE_DIR/<key>/`) is keyed by the corpus, the tokenizer settings and `FORMAT_VERSION`; it
  is written under a temporary name and renamed, under a file lock, so concurrent runs build it
  once and a killed build leaves nothing half-written. `meta.json` lists the shards.
* **Reading** (`open_shards`): each shard is a read-only `numpy.memmap`, so memory stays flat for
  corpora larger than RAM.

The tokenizer is saved in the cache entry and copied into every run directory that uses it
(`tokenizer/`, loadable with `transformers.PreTrainedTokenizerFast.from_pretrained`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.core.config import ConfigError

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # tokens per shard file (128 MiB as uint16)
BOS_TOKEN, EOD_TOKEN = "<|bos|>", "<|endoftext|>"
BYTE_ALPHABET = 256  # byte-level BPE starts from the 256 bytes
TOKENIZER_DIR, META_FILE = "tokenizer", "meta.json"
SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}


# -- corpus ---------------------------------------------------------------------------------------
def local_files(source: str) -> list[str] | None:
    """The text files `source` names (a file, a directory, or a glob), or None if it names no local
    path (then it is a hub dataset name)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"data.source directory {path} holds no {'/'.join(sorted(SUFFIXES))} files")
        return files
    if os.path.isfile(path):
        return [path]
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"data.source={source} matches no file")
        return files
    if path.startswith((".", "/", "~")) or Path(path).suffix in SUFFIXES:
        raise ConfigError(f"data.source does not exist: {path}")
    return None


def load_corpus(source: str, source_config: str | None = None, split: str = "train",
                text_column: str = "text", streaming: bool = False, max_documents: int | None = None):
    """The corpus as a `datasets.Dataset` (or `IterableDataset` when streaming) of one column,
    `text`, one document per row."""
    import datasets

    files = local_files(source)
    try:
        if files is not None:
            kinds = {SUFFIXES.get(Path(f).suffix, "text") for f in files}
            if len(kinds) > 1:
                raise ConfigError(f"data.source={source} mixes file types ({', '.join(sorted(kinds))}); use one")
            kind = kinds.pop()
            extra = {"sample_by": "paragraph"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming, **extra)
        else:
            ds = datasets.load_dataset(source, source_config, split=split, streaming=streaming)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - offline hub, bad file: one line naming the source
        first = " ".join(str(e).split())[:200]
        if files is None:
            raise ConfigError(f"cannot load the hub dataset {source!r} ({type(e).__name__}: {first}); "
                              f"offline? pass local files instead: data.source=PATH.txt|.jsonl|.parquet") from None
        raise ConfigError(f"cannot read data.source={source}: {type(e).__name__}: {first}") from None
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_column not in columns:
        raise ConfigError(f"data.source={source} has no column {text_column!r} (columns: {', '.join(columns)}); "
                          f"set data.text_column")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if max_documents is not None:
        ds = ds.take(max_documents) if streaming else ds.select(range(min(max_documents, len(ds))))
    return ds


def _has_text(row: dict) -> bool:
    """A document with something besides whitespace (empty paragraphs and rows are skipped)."""
    return bool(row["text"] and row["text"].strip())


def _texts(ds, limit: int | None = None):
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        if _has_text(row):
            yield row["text"]


# -- tokenizer ------------------------------------------------------------------------------------
@dataclass
class TextTokenizer:
    """A `transformers` fast tokenizer and how its ids map to the model's: model id = id + offset,
    model id 0 = BOS; `eod` is the model id that ends each document."""

    tokenizer: object
    offset: int
    eod: int

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer) + self.offset

    def encode(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[t + self.offset for t in row] + [self.eod] for row in ids]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) - self.offset for t in ids if int(t) >= self.offset])

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))
        (Path(directory) / "model_ids.json").write_text(json.dumps({"offset": self.offset, "eod": self.eod}) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TextTokenizer":
        from transformers import PreTrainedTokenizerFast

        ids = json.loads((Path(directory) / "model_ids.json").read_text())
        return cls(PreTrainedTokenizerFast.from_pretrained(str(directory)), ids["offset"], ids["eod"])


def train_bpe(texts, vocab_size: int) -> TextTokenizer:
    """A byte-level BPE of exactly `vocab_size` tokens (ids 0, 1: BOS, end of document) trained on
    `texts` (an iterator of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BYTE_ALPHABET + 2:
        raise ConfigError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE: it needs the "
                          f"{BYTE_ALPHABET} bytes and 2 special tokens, at least {BYTE_ALPHABET + 2}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOD_TOKEN)
    return TextTokenizer(fast, offset=0, eod=fast.convert_tokens_to_ids(EOD_TOKEN))


def pretrained_tokenizer(name: str) -> TextTokenizer:
    """A `transformers.AutoTokenizer` (a local path, or a name in the local Hugging Face cache or on
    the hub), shifted by one so that model id 0 is BOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as e:  # noqa: BLE001
        first = " ".join(str(e).split())[:160]
        raise ConfigError(f"cannot load data.tokenizer={name!r} (use bpe, or a transformers tokenizer "
                          f"name or path): {type(e).__name__}: {first}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"data.tokenizer={name!r} has no fast (Rust) tokenizer; use bpe or a fast tokenizer")
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    if end is None:
        raise ConfigError(f"data.tokenizer={name!r} has neither an EOS nor a BOS token to end documents with")
    return TextTokenizer(tok, offset=1, eod=end + 1)


# -- shards ---------------------------------------------------------------------------------------
def cache_key(source: str, source_config, split, text_column, max_documents, tokenizer: str,
              vocab_size: int, sample_documents: int, heldout_every: int) -> str:
    """Hash of everything the shards depend on; local files enter with their size and mtime."""
    files = local_files(source)
    corpus = ([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files] if files is not None
              else [source, source_config, split])
    spec = dict(corpus=corpus, text_column=text_column, max_documents=max_documents, tokenizer=tokenizer,
                vocab_size=vocab_size if tokenizer == "bpe" else None,
                sample_documents=sample_documents if tokenizer == "bpe" else None,
                heldout_every=heldout_every, format=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
            arr = arr[take:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.files):05d}.bin"
        self._file, self._n = open(self.directory / name, "wb"), 0
        self.files.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def build_shards(source: str, cache_dir: str, *, source_config: str | None = None, split: str = "train",
                 text_column: str = "text", streaming: bool = False, max_documents: int | None = None,
                 tokenizer: str = "bpe", vocab_size: int = 4096, sample_documents: int = 100_000,
                 heldout_every: int = 20, num_proc: int | None = None) -> Path:
    """The cache entry for this corpus and tokenizer, built if missing; returns its directory."""
    from filelock import FileLock

    root = Path(os.path.expanduser(cache_dir))
    key = cache_key(source, source_config, split, text_column, max_documents, tokenizer, vocab_size,
                    sample_documents, heldout_every)
    entry = root / key
    if (entry / META_FILE).exists():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (entry / META_FILE).exists():  # another process built it while we waited
            return entry
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_entry(tmp, source, source_config, split, text_column, streaming, max_documents, tokenizer,
                         vocab_size, sample_documents, heldout_every, num_proc)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _write_entry(tmp: Path, source, source_config, split, text_column, streaming, max_documents, tokenizer,
                 vocab_size, sample_documents, heldout_every, num_proc) -> None:
    corpus = load_corpus(source, source_config, split, text_column, streaming, max_documents)
    if tokenizer == "bpe":
        tok = train_bpe(_texts(corpus, sample_documents), vocab_size)
    else:
        tok = pretrained_tokenizer(tokenizer)
    tok.save(tmp / TOKENIZER_DIR)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    def encode(batch):
        return {"ids": tok.encode([t for t in batch["text"]])}

    corpus = corpus.filter(_has_text)
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
    return json.loads((Path(entry) / META_FILE).read_text())


def open_shards(entry: Path, split: str) -> list[np.ndarray]:
    """The split's shards as read-only memory maps (in order)."""
    meta = read_meta(entry)
    return [np.memmap(Path(entry) / s["file"], dtype=meta["dtype"], mode="r", shape=(s["tokens"],))
            for s in meta["shards"][split] if s["tokens"]]
