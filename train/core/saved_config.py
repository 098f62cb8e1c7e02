"""Configs saved by runs (a run's config.yaml, a checkpoint's meta.json), read as data, never as
code: `load_saved_config` upgrades the names of older versions, refuses any key that would build
something outside this project's registry (`known_components`), and types the values with the
schema (train/core/config.py; `typed_config`, also for a resolved config handed between processes).
`differences` compares two configs key by key (resume=auto)."""
from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig

from train.core.config import CONF_DIR, DATA_OPTIONS, DATA_SCHEMAS, Config, ConfigError

# Hydra's instantiation keys other than `_target_`: never accepted from a saved config.
HYDRA_SPECIAL_KEYS = ("_args_", "_partial_", "_recursive_", "_convert_")


def typed_config(values: dict[str, Any]) -> DictConfig:
    """A plain config (e.g. a resolved one handed between processes) under the schema: `Config`,
    its `data` section typed by the option whose builder `data._target_` names."""
    from omegaconf import OmegaConf

    data = values.get("data")
    target = data.get("_target_") if isinstance(data, dict) else None
    schema = DATA_SCHEMAS.get(target)
    if schema is None:
        raise ConfigError(f"data._target_={target!r} is no data option's builder; the builders are "
                          f"{', '.join(DATA_SCHEMAS)}")
    return OmegaConf.merge(OmegaConf.structured(Config), {"data": OmegaConf.structured(schema)}, values)


def known_components() -> dict[str, set[str]]:
    """The registry of components a config may build: where a `_target_` may stand (`model`,
    `data`, `logger`, and `callbacks` with one entry per callback name), and the targets allowed
    there: those of the options in conf/SECTION/ (whose YAML mirrors the schema's defaults)."""
    from omegaconf import OmegaConf

    def targets(group: str) -> set[str]:
        found = set()
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path))
            entries = [node] if "_target_" in node else [v for v in node.values() if isinstance(v, dict)]
            found |= {str(e["_target_"]) for e in entries if "_target_" in e}
        return found

    return {section: targets(section) for section in ("model", "data", "logger", "callbacks")}


def _refused_key(node: Any, registry: dict[str, set[str]], path: str = "") -> str | None:
    """The first key of a saved config that is not plain data: a `_target_` outside the registry
    or in a place no component is built from, another Hydra instantiation key, or an
    interpolation (saved configs are resolved, so they hold none). None when there is none."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                parts = path.split(".")  # model, data, logger: one level; callbacks.NAME: two
                allowed = registry.get(parts[0], set()) if len(parts) == (2 if parts[0] == "callbacks" else 1) else set()
                if str(value) not in allowed:
                    return f"{where}={value!r} (a component of this project is one of: " \
                           f"{', '.join(sorted(allowed)) or 'none here'})"
            elif key in HYDRA_SPECIAL_KEYS:
                return f"{where} (Hydra instantiation keys are not data)"
            else:
                found = _refused_key(value, registry, where)
                if found:
                    return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _refused_key(value, registry, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(node, str) and "${" in node:
        return f"{path}={node!r} (an interpolation; saved configs hold resolved values)"
    return None


def differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose resolved values differ between two configs, sorted; keys under a
    top-level key in `ignore` are left out."""
    from omegaconf import OmegaConf

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    fa, fb = (flat(OmegaConf.to_container(c, resolve=True)) for c in (a, b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and k.split(".")[0] not in ignore)


# Modules of components before the library moved into train/core/ (saved `_target_`s name them).
MOVED_MODULES = {"train.model.": "train.core.model.", "train.data.": "train.core.data.",
                 "train.callbacks.": "train.core.callbacks."}
# The data builders before each source had its own option: one took every source's keys and
# built text when `source` was set, a token file when `path` was, else the embedded language;
# the other was data=text's.
UNION_BUILDER, UNION_TEXT_BUILDER = "train.core.data.build_data", "train.core.data.build_text_data"


def _moved(target: Any) -> Any:
    """A `_target_` saved before its module moved, under its module's new name (other values as they are)."""
    for old, new in MOVED_MODULES.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old):]
    return target


def _data_option(data: dict[str, Any]) -> dict[str, Any]:
    """A data section saved by a union builder, as the option its source was (`source` set or
    data=text: text; `path` set: tokens; else repeats), without the other sources' keys; any other
    data section as it is."""
    target = data.get("_target_")
    if target not in (UNION_BUILDER, UNION_TEXT_BUILDER):
        return data
    option = "text" if data.get("source") or target == UNION_TEXT_BUILDER else "tokens" if data.get("path") else "repeats"
    keys = {name: {f.name for f in dataclasses.fields(schema)} for name, schema in DATA_OPTIONS.items()}
    others = set().union(*keys.values()) - keys[option]
    return {**{k: v for k, v in data.items() if k not in others}, "_target_": DATA_OPTIONS[option]._target_}


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """Configs saved before the checkpoint schedule moved into `checkpoint` (from `schedule`),
    `optim.schedule` became `optim.lr_schedule`, the test-only and duplicate keys went, the
    components' modules moved into train/core/, and each data source became its own option.
    Renames only: nothing is imported or built."""
    saved = dict(saved)
    for section in ("model", "data"):
        if isinstance(saved.get(section), dict) and "_target_" in saved[section]:
            saved[section] = {**saved[section], "_target_": _moved(saved[section]["_target_"])}
    if isinstance(saved.get("data"), dict):
        saved["data"] = _data_option(saved["data"])
    if isinstance(saved.get("callbacks"), dict):
        saved["callbacks"] = {name: ({**cb, "_target_": _moved(cb["_target_"])}
                                     if isinstance(cb, dict) and "_target_" in cb else cb)
                              for name, cb in saved["callbacks"].items()}
    if isinstance(saved.get("schedule"), dict):
        saved["checkpoint"] = {**saved.pop("schedule"), **(saved.get("checkpoint") or {})}
    if isinstance(saved.get("optim"), dict) and "schedule" in saved["optim"]:
        optim = dict(saved["optim"])
        optim["lr_schedule"] = optim.pop("schedule")
        saved["optim"] = optim
    if isinstance(saved.get("train"), dict):
        saved["train"] = {k: v for k, v in saved["train"].items() if k != "debug_nan_at_step"}
    if isinstance(saved.get("callbacks"), dict):  # the classification took fold_layernorm too
        saved["callbacks"] = {name: ({k: v for k, v in cb.items() if k != "fold_layernorm"}
                                     if isinstance(cb, dict) and str(cb.get("_target_", "")).endswith(
                                         "InductionClassification") else cb)
                              for name, cb in saved["callbacks"].items()}
    return saved


def read_config_file(path: Any) -> Any:
    """A config.yaml read as plain data within the bounds of train/core/limits.py (a regular file,
    a size, a number of YAML nodes with aliases expanded); ValueError or OSError when it cannot be."""
    import yaml

    from train.core import limits

    text = limits.read_text(path)
    limits.check_yaml(text, str(path))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())[:200]}") from None


def load_saved_config(saved: Any, where: str) -> DictConfig:
    """A config saved by a run (its config.yaml, or a checkpoint's meta.json), read as data: every
    `_target_` must be the registry's own for its place (`known_components`), no other Hydra
    instantiation key or interpolation may appear, and the values must fit the schema (the data
    section that of the option its `_target_` builds). Nothing named in the file is imported or
    called here. `where` names the source in errors."""
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(saved, dict) or "model" not in saved or "train" not in saved:
        raise ConfigError(f"{where} is not a training config")
    saved = _upgrade(saved)
    refused = _refused_key(saved, known_components())
    if refused:
        raise ConfigError(f"{where}: refusing {refused}; a saved config is data and names no other code")
    try:  # the schema checks the saved values' types and keys
        return typed_config(saved)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where} does not match the config schema: {str(e).splitlines()[0]}") from None
