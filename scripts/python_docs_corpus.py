"""Write a corpus of English prose that every Python installation carries, for trying natural text
with no download: the language reference's help topics (`pydoc_data`) and the docstrings of the
standard library, one document per paragraph.

    uv run python scripts/python_docs_corpus.py corpus.txt [--max-bytes 1000000]
    uv run python -m train experiment=text_cpu data.source=corpus.txt
"""
from __future__ import annotations

import argparse
import ast
import sysconfig
from pathlib import Path

SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "pydoc_data"}


def paragraphs(text: str, min_chars: int) -> list[str]:
    """Blocks separated by blank lines, joined into single lines; code-like blocks dropped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$ ", "|", "+--", "::")) for line in lines):
            continue
        joined = " ".join(lines)
        letters = sum(c.isalpha() or c == " " for c in joined)
        if len(joined) >= min_chars and letters >= 0.85 * len(joined):
            out.append(joined)
    return out


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return [d for n in nodes if (d := ast.get_docstring(n))]


def corpus(max_bytes: int, min_chars: int = 120) -> list[str]:
    import pydoc_data.topics as topics

    docs, seen, size = [], set(), 0
    sources = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not SKIP & set(p.relative_to(stdlib).parts))
    for text in sources + [d for f in files for d in docstrings(f)]:
        for para in paragraphs(text, min_chars):
            if para not in seen:
                seen.add(para)
                docs.append(para)
                size += len(para.encode()) + 2
                if size >= max_bytes:
                    return docs
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    docs = corpus(args.max_bytes)
    args.out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(docs)} documents, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
