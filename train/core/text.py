"""Natural text: read a corpus with `datasets` and make the tokenizer that turns it into token ids
(the token cache, train/core/token_cache.py, tokenizes it once into shards).

* **Corpus** (`load_corpus`): local files (`.txt`: one document per paragraph, i.e. blocks
  separated by blank lines; `.jsonl`/`.json`; `.parquet`), a directory or a glob of them, or a
  Hugging Face hub dataset (name, config, split, text column; streaming for large ones).
* **Tokenizer**: `bpe` trains a byte-level BPE of `vocab_size` tokens with `tokenizers` on the
  first `sample_documents` documents (`train_bpe`; `train_bpe_stoppable` in a child process a stop
  signal can end). Its ids 0 and 1 are the special tokens BOS (`<|bos|>`) and end of document
  (`<|endoftext|>`); `vocab_size=258` is plain bytes (no merges). Any other value is a
  `transformers.AutoTokenizer` name or path (`pretrained_tokenizer`; one that names code of its
  own is refused); its ids are shifted up by one (`offset` 1) so that id 0 stays BOS, and its own
  EOS (else BOS) token ends documents.

The tokenizer is saved in the cache entry and copied into every run directory that uses it
(`tokenizer/`, loadable with `transformers.PreTrainedTokenizerFast.from_pretrained`, and read
back as data by `TextTokenizer.load`).
"""
from __future__ import annotations

import glob
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from train.core import limits
from train.core.config import ConfigError

BOS_TOKEN, EOD_TOKEN = "<|bos|>", "<|endoftext|>"
BYTE_ALPHABET = 256  # byte-level BPE starts from the 256 bytes
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
    if os.path.exists(path):
        raise ConfigError(f"data.source={path} is neither a regular file nor a directory; refusing to read it")
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


def has_text(row: dict) -> bool:
    """A document with something besides whitespace (empty paragraphs and rows are skipped)."""
    return bool(row["text"] and row["text"].strip())


def _texts(ds, limit: int | None = None):
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        if has_text(row):
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
        """A tokenizer `save` wrote, read as data: regular files only (no links, no directories),
        through `transformers.PreTrainedTokenizerFast` (which runs no code named in the files)."""
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        odd = [p.name for p in sorted(directory.iterdir()) if p.is_symlink() or not p.is_file()]
        if odd:
            raise ConfigError(f"the tokenizer in {directory} holds {odd[0]}, a link or directory; a tokenizer this "
                              f"project saved holds neither")
        ids = limits.read_json(directory / "model_ids.json")
        if not (isinstance(ids, dict) and all(isinstance(ids.get(k), int) and ids[k] >= 0 for k in ("offset", "eod"))):
            raise ConfigError(f"{directory / 'model_ids.json'} does not give the id offset and end-of-document id")
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(directory), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is the same problem
            raise ConfigError(f"cannot read the tokenizer in {directory}: {' '.join(str(e).split())[:160]}") from None
        return cls(tok, ids["offset"], ids["eod"])


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


def _bpe_child(corpus, sample_documents: int, vocab_size: int, out: str, error: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a stop signal to the process group ends the child at once
        signal.signal(sig, signal.SIG_DFL)
    try:
        tok = train_bpe(_texts(corpus, sample_documents), vocab_size)
        tok.tokenizer.backend_tokenizer.save(out)
    except BaseException as e:  # noqa: BLE001 - handed to the parent as one line
        Path(error).write_text(str(e) if isinstance(e, ConfigError) else f"training the BPE failed: {type(e).__name__}: {e}")


def train_bpe_stoppable(corpus, sample_documents: int, vocab_size: int, workdir: Path) -> TextTokenizer:
    """`train_bpe` on the corpus's first documents, in a forked child process where there is
    fork: the Rust trainer returns to Python only when it is done, so in this process a stop
    signal would wait for it; the parent waits in Python, and the child is killed when a signal
    ends the wait (`stop_on_signal`)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return train_bpe(_texts(corpus, sample_documents), vocab_size)
    if vocab_size < BYTE_ALPHABET + 2:
        train_bpe(iter(()), vocab_size)  # the one-line refusal
    out, error = Path(workdir) / "bpe.json", Path(workdir) / "bpe.error"
    proc = multiprocessing.get_context("fork").Process(target=_bpe_child, daemon=True,
                                                       args=(corpus, sample_documents, vocab_size, str(out), str(error)))
    proc.start()
    try:
        while proc.is_alive():
            proc.join(0.1)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if error.exists():
        raise ConfigError(error.read_text())
    if proc.exitcode != 0 or not out.is_file():
        raise ConfigError(f"training the BPE failed: its process ended with exit code {proc.exitcode}")
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(out), bos_token=BOS_TOKEN, eos_token=EOD_TOKEN)
    out.unlink()
    return TextTokenizer(fast, offset=0, eod=fast.convert_tokens_to_ids(EOD_TOKEN))


def pretrained_tokenizer(name: str) -> TextTokenizer:
    """A `transformers.AutoTokenizer` (a local path, or a name in the local Hugging Face cache or on
    the hub), shifted by one so that model id 0 is BOS. A tokenizer that names code of its own
    (`auto_map`) is refused: none is ever run."""
    from transformers import AutoTokenizer

    config = Path(os.path.expanduser(name)) / "tokenizer_config.json"
    if config.is_file() and "auto_map" in (limits.read_json(config) or {}):
        raise ConfigError(f"data.tokenizer={name!r} names code of its own ({config}: auto_map); this project runs "
                          f"no code from a tokenizer: use bpe or a tokenizer transformers knows")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name), trust_remote_code=False)
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
