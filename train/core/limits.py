"""Bounds on what an input may ask of the machine, checked before anything is read or allocated:

* files are read only when they are regular files (a FIFO or a device would block a read
  forever), JSON and YAML within a size, JSON within the parser's nesting depth, YAML within a
  number of nodes with aliases expanded (a few lines of anchors can stand for billions of nodes);
* the memory a model or a training run needs (`model_parameters`, `training_bytes`) is compared
  with the machine's (`machine_memory`) before the model is built, with one line that says how
  much is asked for and how much there is.

No torch: the command line checks configs with this module before anything heavy is imported."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 16 << 20  # config.yaml, meta.json, status.json, tokenizer and probe settings
MAX_YAML_NODES = 1_000_000  # nodes of a YAML document, aliases expanded


class LimitError(ValueError):
    """An input beyond a bound of this module: one line naming the file or the setting."""


def check_regular_file(path: str | Path, what: str = "") -> Path:
    """`path` when it is a regular file (symlinks to one included); LimitError for a FIFO, a
    socket, a device or a directory (reading those can block or never end), FileNotFoundError
    when it does not exist."""
    path = Path(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise LimitError(f"{what or path} is {kind}, not a regular file; refusing to read it")
    return path


def read_text(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "") -> str:
    """A small text file (a config, a meta.json): regular, at most `limit` bytes, UTF-8."""
    path = check_regular_file(path, what)
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise LimitError(f"{what or path} is larger than {limit >> 20} MiB; not a file this project wrote")
    return data.decode("utf-8")


def parse_json(text: str, what: str) -> Any:
    """JSON whose nesting the parser can follow (a deeper one exhausts its stack: LimitError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise LimitError(f"{what} nests too deeply; not a file this project wrote") from None


def read_json(path: str | Path, what: str = "") -> Any:
    """A small JSON file within the bounds of this module (ValueError for invalid JSON)."""
    return parse_json(read_text(path, what=what), what or str(path))


def check_yaml(text: str, what: str) -> None:
    """Refuse a YAML document that expands to more than MAX_YAML_NODES nodes (aliases counted as
    often as they are used) before a loader builds it."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{what} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    sizes: dict[int, int] = {}  # node id -> expanded size (aliases share nodes: each counted once here)

    def size(node) -> int:
        key = id(node)
        if key not in sizes:
            sizes[key] = 0  # a node reached again inside itself (a recursive alias): counted as one
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            sizes[key] = min(1 + sum(size(c) for c in children), MAX_YAML_NODES + 1)
        return sizes[key]

    if root is not None and size(root) > MAX_YAML_NODES:
        raise LimitError(f"{what} expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases); not a config "
                         f"this project wrote")


# -- memory ----------------------------------------------------------------------------------------
def machine_memory() -> int | None:
    """The machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def model_parameters(n_layers: int, n_heads: int, d_model: int, d_head: int, d_vocab: int, n_ctx: int = 0) -> int:
    """A lower bound on the parameters of the project's model of these sizes: the attention
    weights and biases, the embedding and unembedding (no positional table, no LayerNorm)."""
    per_layer = 4 * n_heads * d_model * d_head + 3 * n_heads * d_head + d_model
    return n_layers * per_layer + 2 * d_vocab * d_model + d_vocab


def training_bytes(n_params: int, batch_size: int, n_ctx: int, n_heads: int, n_layers: int, d_vocab: int) -> int:
    """A lower bound on a training step's memory: weights, gradients and AdamW's two moments in
    float32, one batch's attention patterns per layer and one batch's logits."""
    return 4 * (4 * n_params + batch_size * n_heads * n_ctx * n_ctx * n_layers + batch_size * n_ctx * d_vocab)


def gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def check_memory(needed: int, what: str, hint: str = "") -> None:
    """LimitError when `needed` bytes exceed the machine's memory."""
    have = machine_memory()
    if have is not None and needed > have:
        raise LimitError(f"{what} needs at least {gib(needed)} of memory and this machine has {gib(have)}"
                         + (f"; {hint}" if hint else ""))


def check_training(model: Any, data: Any, train: Any) -> None:
    """LimitError when a training run of these config sections (train/core/config.py) needs more
    memory than the machine has (`training_bytes`: a lower bound)."""
    params = model_parameters(model.n_layers, model.n_heads, model.d_model, model.d_head, data.vocab_size)
    needed = training_bytes(params, train.batch_size, data.n_ctx, model.n_heads, model.n_layers, data.vocab_size)
    check_memory(needed, f"training this model ({params:,} parameters, context {data.n_ctx}, batch "
                         f"{train.batch_size})", "make it smaller")
