"""The checkpoints a series is made of (analysis/series.py), and how each is read: hub revisions
(names, START:STOP:STEP ranges of `step{N}`, Pythia's schedule; downloaded one at a time and freed
after use) or a local directory of checkpoint directories (`python -m analysis.export --all`);
the model and its tokenizer through `transformers`, running no code a checkpoint names of its
own without --trust-remote-code (`check_remote_code`); the text set the probes are built from."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from train.core import limits

PYTHIA_STEPS = [0, *(2 ** i for i in range(10)), *range(1000, 143001, 1000)]
PYTHIA_TOKENS_PER_STEP = 2_097_152

class SeriesError(ValueError):
    """A problem with a checkpoint or the series' input: one line, no traceback."""


@dataclass
class Checkpoint:
    name: str  # revision or directory name
    step: int
    tokens: int | None = None  # when the checkpoint records them
    path: Path | None = None  # a local checkpoint directory
    revision: str | None = None  # a hub revision


# -- which checkpoints ---------------------------------------------------------------------------
def step_of(name: str) -> int | None:
    """The digits ending a revision or directory name ("step1000", "step_0001000"), or None."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def hub_revisions(spec: list[str]) -> list[str]:
    """Revision names: `pythia` (the named schedule), START:STOP:STEP ranges of steps, or names."""
    out: list[str] = []
    for item in spec:
        if item == "pythia":
            out += [f"step{s}" for s in PYTHIA_STEPS]
        elif re.fullmatch(r"\d+:\d+(:\d+)?", item):
            start, stop, *step = (int(x) for x in item.split(":"))
            out += [f"step{s}" for s in range(start, stop + 1, step[0] if step else 1)]
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def local_series(root: Path) -> list[Checkpoint]:
    """The checkpoint directories under `root` (those with a config.json), by step; `root` itself
    when it is one."""
    from analysis.export import INFO_FILE

    dirs = [root] if (root / "config.json").is_file() else sorted(d for d in root.iterdir() if (d / "config.json").is_file())
    found = []
    for d in dirs:
        try:
            info = limits.read_json(d / INFO_FILE) if (d / INFO_FILE).is_file() else {}
        except (OSError, ValueError) as e:
            raise SeriesError(f"cannot read {d / INFO_FILE}: {e}") from None
        info = info if isinstance(info, dict) else {}
        step = info.get("step", step_of(d.name))
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise SeriesError(f"{d / INFO_FILE}: step={step!r} is not a step")
        if step is None:
            raise SeriesError(f"cannot tell the step of {d} (no {INFO_FILE}, no digits ending its name)")
        found.append(Checkpoint(d.name, int(step), info.get("tokens"), path=d))
    if not found:
        raise SeriesError(f"{root} holds no checkpoint directories (directories with a config.json)")
    return sorted(found, key=lambda c: c.step)


# -- loading -------------------------------------------------------------------------------------
def fetch(repo: str, revision: str) -> Path:
    """Download one hub revision's model and tokenizer files; the local snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as E

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.tiktoken"]))
    except E.RevisionNotFoundError:
        raise SeriesError(f"{repo} has no revision {revision!r}") from None
    except (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError) as e:
        raise HubUnreachable(f"cannot reach the Hugging Face hub for {repo}@{revision} and it is not "
                             f"in the cache ({type(e).__name__})") from None
    except E.RepositoryNotFoundError:
        raise HubUnreachable(f"no model {repo!r} on the Hugging Face hub (or it is private)") from None
    except OSError as e:  # connection errors
        raise HubUnreachable(f"cannot reach the Hugging Face hub for {repo}@{revision}: {e}") from None


class HubUnreachable(SeriesError):
    """Offline or no such model: no checkpoint of the series can be loaded."""


def free_revision(snapshot: Path) -> None:
    """Remove one downloaded revision from the Hugging Face cache (blobs other revisions share stay)."""
    from huggingface_hub import scan_cache_dir

    try:
        scan_cache_dir(snapshot.parents[2]).delete_revisions(snapshot.name).execute()
    except Exception as e:  # noqa: BLE001 - a cache we cannot clean only costs disk
        print(f"note: could not free {snapshot} from the cache ({e})", file=sys.stderr)


class RemoteCode(SeriesError):
    """A checkpoint that names code of its own to run, and --trust-remote-code was not given."""


def check_remote_code(path: Path, trust: bool) -> None:
    """Refuse (RemoteCode) a checkpoint directory whose config.json or tokenizer_config.json names
    code of its own (`auto_map`), unless `trust`: transformers would run it (or, on a terminal,
    ask whether to). The project's exports name their model code too, but load with the
    project's own classes (train/core/hf_model.py) and run none of it."""
    from train.core.hf_model import AttnOnlyConfig

    if trust:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = limits.read_json(Path(path) / name) if (Path(path) / name).is_file() else {}
        except (OSError, ValueError) as e:
            raise SeriesError(f"cannot read {Path(path) / name}: {e}") from None
        if not isinstance(config, dict) or "auto_map" not in config:
            continue
        if name == "config.json" and config.get("model_type") == AttnOnlyConfig.model_type:
            continue
        raise RemoteCode(f"{Path(path) / name} names code of its own to run (auto_map: "
                         f"{', '.join(map(str, config['auto_map']))}); give --trust-remote-code to run it")


def load_model(path: Path, dtype: str, device: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from train.core.hf_model import register_project_model

    register_project_model()  # the project's exports load with its own classes
    hf_logging.disable_progress_bar()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager",
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise SeriesError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, or None when it has none (or none transformers can read)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no tokenizer: token ids must then be given
        return None


# -- text ----------------------------------------------------------------------------------------
def read_text(source: str, split: str) -> list[str]:
    """Documents of a .txt file (one), a `datasets` directory or a hub data set (`text` column)."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        try:
            return [limits.check_regular_file(path, f"--text {source}").read_text(encoding="utf-8")]
        except (OSError, ValueError) as e:
            reason = "it is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
            raise SeriesError(f"cannot read the text set {source}: {reason}") from None
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - missing, offline or malformed data: one line
        raise SeriesError(f"cannot read the text set {source!r}: {str(e).splitlines()[0] if str(e) else e}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    if "text" not in ds.column_names:
        raise SeriesError(f"the text set {source!r} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


def series_checkpoints(source: str, revisions: list[str] | None) -> list[Checkpoint]:
    """A local directory's checkpoints (`local_series`), or the hub revisions named."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SeriesError(f"{source} is not a directory of checkpoints")
        return local_series(local)
    if not revisions:
        raise SeriesError(f"{source} is not a local directory; give the hub revisions with --revisions")
    revisions = hub_revisions(revisions)
    for rev in revisions:
        if step_of(rev) is None:
            raise SeriesError(f"cannot tell the step of revision {rev!r} (no digits at its end)")
    return [Checkpoint(rev, step_of(rev), revision=rev) for rev in revisions]
