"""The command line's own help and its check of the overrides, both before Hydra starts.

`python -m train --help` (or -h) prints `help_text()`: what the tool does, the config groups and
their options (read from conf/), the presets (conf/experiment/, each with its first comment
line), where results go and the analysis commands; Hydra's own help is behind `--hydra-help`.

`check(argv)` composes the config of the overrides in argv (Hydra's compose API, as
`python -m train` would; a sweep's every value) and turns a composition error into one line,
`error: ...`, exit 2, before anything is written: an unknown group option
(`experiment=text_cpuu`), an unknown key (`model.nlayers=3`, also with `+` or `++`, outside
`callbacks`), a key of another data option (`data.source` without `data=text`), an unknown group
(`modell=attn_only`) and a value of the wrong type. Where a known name is close (difflib), the
line says "did you mean". Overrides of `hydra` itself, and command lines that pick another config
(-cp, -cn, -cd) or ask Hydra for information (--info, --shell-completion), are left to Hydra."""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from train.core.config import CONF_DIR, DATA_OPTIONS, data_option

HELP_FLAGS = ("--help", "-h")
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p")  # Hydra flags followed by a value
HYDRA_ONLY = ("--info", "-i", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
              "--config-dir", "-cd", "--hydra-help", "--version", "--experimental-rerun")
MAIN_GROUPS = ("model", "data", "optim", "train", "checkpoint", "probes", "callbacks", "logger", "experiment")
MAX_SWEEP_CHECKS = 32  # compositions checked for one sweep (each takes a fraction of a second)


class UsageError(ValueError):
    """A command line that does not compose: one line."""


# -- help -----------------------------------------------------------------------------------------

def options(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/GROUP/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _first_comment(path: Path) -> str:
    """The first sentence of a preset's header comment, before any command it quotes."""
    text = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            text += " " + line.lstrip("# ").strip()
    return re.split(r"\.\s+(?=[A-Z`])|: `|:$|\.$", text.strip())[0].strip()


def _defaults() -> dict[str, str]:
    import yaml

    entries = yaml.safe_load((CONF_DIR / "config.yaml").read_text(encoding="utf-8"))["defaults"]
    return {k.split()[-1]: str(v) for e in entries if isinstance(e, dict) for k, v in e.items()}


def help_text() -> str:
    """`python -m train --help` (module docstring)."""
    defaults = _defaults()
    rows = []
    for group in [g for g in MAIN_GROUPS if g in groups()] + [g for g in groups() if g not in MAIN_GROUPS]:
        if group == "experiment":
            continue
        opts = [f"{o} (default)" if o == defaults.get(group) else o for o in options(group)]
        rows.append(f"  {group:<11} {', '.join(opts)}")
    presets = [f"  {name:<16} {_first_comment(CONF_DIR / 'experiment' / f'{name}.yaml')}"
               for name in options("experiment")]
    return "\n".join([
        "python -m train [GROUP=OPTION] [KEY=VALUE] ...   train a small attention-only transformer and",
        "                                                  track induction heads at every checkpoint",
        "python -m train -m KEY=A,B ...                    a sweep: one run per combination",
        "",
        "At every checkpoint the run measures what each head does (prefix matching, copying,",
        "previous-token scores), the circuits behind it and the held-out and in-context loss; the",
        "analysis finds the phase change in which induction heads form.",
        "",
        "Config groups (GROUP=OPTION; every key with its default: python -m train --cfg job):",
        *rows,
        "",
        "Presets (experiment=NAME):",
        *presets,
        "",
        "Other keys: seed=N, device=auto|cpu|cuda|cuda:N|mps, threads=auto|N (torch's CPU threads),",
        "resume=RUN_DIR|auto, logger=wandb|none, live_detection_every=K. Examples: model.n_layers=1,",
        "data=text data.source=FILE.txt, train.total_tokens=2000000, experiment=smoke logger=none.",
        "",
        "Results: one directory per run, outputs/DATE/TIME-PID/ (a sweep: multirun/DATE/TIME/N_OVERRIDES/;",
        "hydra.run.dir=DIR to choose): metrics.jsonl, config.yaml, status.json, checkpoints/. The run",
        "prints it when it starts and when it ends. Then:",
        "  python -m analysis RUN_DIR                          phase-change window, figures, report/report.html",
        "  python -m analysis.recompute RUN_DIR --callbacks llc   add a metric to a finished run",
        "  python -m analysis.by_config SWEEP_DIR --key KEY    phase change by swept config value",
        "  python -m analysis.series MODEL --out DIR           score another model's checkpoint series",
        "  python -m analysis.export RUN_DIR --to hf --out DIR    open a run's model in transformers",
        "",
        "More: README.md and docs/ (docs/user-guide.md first). Hydra's own options: python -m train --hydra-help",
    ])


# -- the check of the overrides -------------------------------------------------------------------

def _close(name: str, candidates) -> str:
    hits = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {hits[0]}?" if hits else ""


def _hydra_key(override: str) -> bool:
    key = override.lstrip("+~").partition("=")[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _is_group(key: str) -> bool:
    return "." not in key and "@" not in key and key in groups()


def _group_choices(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o[0] not in "+~" and _is_group(o.partition("=")[0])]


def unknown_key(key: str, overrides: list[str]) -> str:
    """One line for a key that the config composed from the group choices in `overrides` lacks."""
    from omegaconf import OmegaConf

    from train.core.config import compose

    cfg = OmegaConf.to_container(compose(_group_choices(overrides)), resolve=False)
    parts = key.split(".")
    node, path = cfg, []
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            break
        node, path = node[part], [*path, part]
    if len(path) == len(parts):
        return f"{key} is not a key of the config"
    missing = parts[len(path)]
    where = ".".join(path)
    if path == ["data"]:
        owners = [o for o, schema in DATA_OPTIONS.items() if missing in schema.__dataclass_fields__]
        if owners:
            return (f"{key} belongs to data={' or data='.join(owners)}, not to the chosen data source "
                    f"(data={_data_choice(cfg)}): add data={owners[0]}")
    names = list(node) if isinstance(node, dict) else []
    if not path:
        names += groups()
    if path == ["callbacks"]:
        return (f"no callback '{missing}' in the config{_close(missing, names)} "
                f"(callbacks: {', '.join(names)})")
    if not where:
        return f"no group or key '{missing}'{_close(missing, names)}"
    return f"{key}: no key '{missing}' in {where}{_close(missing, names)}"


def _data_choice(cfg: dict) -> str:
    return data_option((cfg.get("data") or {}).get("_target_"), "?")


def explain(e: Exception, overrides: list[str]) -> str:
    """One line for a composition error of `overrides`."""
    text = str(e)
    m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
    if m:
        group, option = m.groups()
        known = [o for o in options(group)] or list(getattr(e, "options", None) or [])
        return f"unknown {group} option '{option}'{_close(option, known)} ({group}: {', '.join(known)})"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"'([^']+)' does not exist", text)
    if m:
        return unknown_key(m.group(1), overrides)
    m = re.search(r"Error merging override (\S+)", text)
    if m and e.__cause__ is not None:
        return f"{m.group(1)}: {str(e.__cause__).splitlines()[0]}"
    return " ".join(text.split("\n\n")[0].split())


def _appended_keys(overrides: list[str]) -> list[str]:
    """Keys added with + or ++ outside callbacks and hydra (a schema section has no room for them)."""
    keys = []
    for o in overrides:
        key = o.partition("=")[0]
        if key.startswith("+") and not key.lstrip("+").startswith("callbacks."):
            keys.append(key.lstrip("+"))
    return keys


def compose_problem(overrides: list[str]) -> str | None:
    """None when the overrides compose; else the one-line reason."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from train.core.config import compose

    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        return explain(e, overrides)
    appended = _appended_keys(overrides)
    if appended:
        base = compose([o for o in overrides if not o.startswith("+")])
        for key in appended:
            if OmegaConf.select(base, key, default=None) is None:
                return unknown_key(key, overrides)
    return None


def sweep_cases(overrides: list[str]) -> list[list[str]]:
    """The override lists to check for a sweep: every override at its first value, then each
    further value of each swept override in turn (at most MAX_SWEEP_CHECKS lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            values.append([f"{key}={v}" for v in o.sweep_string_iterator()] or [o.input_line])
        else:
            values.append([o.input_line])
    first = [v[0] for v in values]
    cases = [first]
    for i, vs in enumerate(values):
        cases += [first[:i] + [v] + first[i + 1:] for v in vs[1:]]
    return cases[:MAX_SWEEP_CHECKS]


def split_argv(argv: list[str]) -> tuple[list[str] | None, bool]:
    """(the config overrides in argv, or None when Hydra alone handles this command line; sweep?)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif arg.split("=")[0] in HYDRA_ONLY:
            return None, False
        elif not arg.startswith("-"):
            overrides.append(arg)
    return [o for o in overrides if not _hydra_key(o)], any(a in ("-m", "--multirun") for a in argv)


def check(argv: list[str]) -> None:
    """Raise UsageError with one line when the command line's overrides do not compose."""
    overrides, sweep = split_argv(argv)
    if overrides is None:
        return
    try:
        cases = sweep_cases(overrides) if sweep else [overrides]
    except Exception as e:  # noqa: BLE001 - Hydra's override grammar: a syntax error
        raise UsageError(f"{' '.join(overrides)}: " + " ".join(str(e).split("\n\n")[0].split())) from None
    for case in cases:
        problem = compose_problem(case)
        if problem:
            raise UsageError(problem)


def handle(argv: list[str], main_rank: bool = True) -> None:
    """Before Hydra: print the help and exit 0 on --help / -h; exit 2 with one line (printed by
    the main rank only) when the overrides do not compose."""
    if any(a in HELP_FLAGS for a in argv):
        print(help_text())
        raise SystemExit(0)
    try:
        check(argv)
    except UsageError as e:
        if main_rank:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
