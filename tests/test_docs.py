"""Every command in the README and docs/ stays runnable: each `python -m train` command line
composes (train/usage.py, the check the command line itself runs, so a misspelled key, option or
preset in the docs fails here), each `python -m analysis...` command line parses with that
command's own argument parser, each script and linked page exists, and each Python snippet's
imports name what the project has."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from train import usage

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    """(page name, code) of every fenced block of a language."""
    return [(page.name, m.group(2)) for page in PAGES for m in FENCE.finditer(page.read_text(encoding="utf-8"))
            if m.group(1) == lang]


def commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every shell command line (continuations joined, comments dropped)."""
    out = []
    for page, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append((page, argv))
    return out


def entry(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the project module or script a command runs, its arguments), or (None, argv)."""
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1].split(".")[0] in ("train", "analysis"):
            return argv[i + 1], argv[i + 2:]
        if arg.startswith("scripts/"):
            return arg, argv[i + 1:]
    return None, argv


def project_commands(prefix: str) -> list[tuple[str, str, list[str]]]:
    return [(page, module, args) for page, argv in commands() for module, args in [entry(argv)]
            if module and module.startswith(prefix)]


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


class Parsed(BaseException):
    """Raised right after a command's own parser accepted its arguments (nothing is run)."""


def test_the_pages_hold_commands_of_every_kind():
    modules = {module for _, module, _ in project_commands("")}
    assert {"train", "analysis", "analysis.by_config", "analysis.recompute", "analysis.series", "analysis.export",
            "analysis.llc_calibrate", "scripts/reproduce_phase_change.sh", "scripts/python_docs_corpus.py"} <= modules
    assert sum(1 for _, m, _ in project_commands("train")) >= 15


@pytest.mark.slow
def test_every_analysis_command_parses(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    checked = 0
    for page, module, args in project_commands("analysis"):
        main = importlib.import_module(module if module != "analysis" else "analysis.__main__").main
        with pytest.raises(Parsed):  # SystemExit(2) instead: an argument the command does not have
            main(args)
        checked += 1
    assert checked >= 12


def test_every_script_link_and_preset_named_exists():
    for page, module, args in project_commands("scripts/"):
        assert (ROOT / module).is_file(), (page, module)
    presets = set(usage.options("experiment"))
    for page, module, args in project_commands("train"):
        for arg in args:
            key, _, value = arg.partition("=")
            if key in usage.groups():
                assert set(value.split(",")) <= set(usage.options(key)), (page, arg)
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text(encoding="utf-8")):
            linked = page.parent / target if target else page
            assert linked.exists(), (page.name, target)
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), (page.name, target, anchor)
    assert presets >= {"smoke", "text_cpu"}


def test_every_python_snippet_parses_and_imports_what_exists():
    for page, code in blocks("python"):
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("train", "analysis"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), (page, node.module, alias.name)


@pytest.mark.slow
def test_every_train_command_composes():
    """The command line's own check (train/usage.py): the config each documented command line
    composes, a sweep's every value."""
    for page, module, args in project_commands("train"):
        usage.check(args)
