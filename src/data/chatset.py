"""The embedded chat set: conversations generated from the standard library's own sources.

For every public top-level function with a docstring (the running interpreter's stdlib, as the
`python-stdlib` corpus), in a fixed order:
    "What does `module.function` do?"          -> the docstring's first paragraph
    "Write a function that <that summary>"      -> the function's code (short functions only)
Some conversations carry a system message; functions of one module are paired into two-turn
conversations. One function in HELD_OUT_EVERY (by a hash of its name) is held out of training and
forms the validation split, so validation asks about functions the model never saw answered.
The text is the interpreter's (PSF-licensed); nothing is downloaded.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from src.data.sources import stdlib_files

VERSION = 1
HELD_OUT_EVERY = 10
MAX_ANSWER_CHARS = 400
MAX_CODE_CHARS = 300
ALIASES = {"posixpath": "os.path", "genericpath": "os.path"}
SYSTEMS = ("You are a helpful assistant who knows the Python standard library.",
           "Answer briefly.")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    name = ".".join(parts)
    return ALIASES.get(name, name)


def summary(doc: str) -> str:
    """The docstring's first paragraph, on one line."""
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


def functions(path: Path, root: Path) -> Iterator[tuple[str, str, str]]:
    """(qualified name, summary, code) of the file's public top-level documented functions."""
    if any(p.startswith("_") for p in module_name(path, root).split(".")):
        return
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    mod = module_name(path, root)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        s = summary(doc)
        if not 10 <= len(s) <= MAX_ANSWER_CHARS or ">>>" in s:
            continue
        yield f"{mod}.{node.name}", s, ast.get_source_segment(src, node) or ""


def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0


def _ask(name: str, s: str) -> list[dict]:
    return [{"role": "user", "content": f"What does {name} do?"},
            {"role": "assistant", "content": s}]


def _write(s: str, code: str) -> list[dict] | None:
    if not code or len(code) > MAX_CODE_CHARS:
        return None
    task = s[0].lower() + s[1:].rstrip(".")
    return [{"role": "user", "content": f"Write a function that does this: {task}."},
            {"role": "assistant", "content": code}]


def stdlib_chats() -> Iterator[tuple[list[dict], bool]]:
    """(messages, is_validation) of every conversation, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        fns = list(functions(path, root))
        for k, (name, s, code) in enumerate(fns):
            val = held_out(name)
            h = zlib.crc32(name.encode())
            msgs = _ask(name, s)
            if h % 3 == 0:
                msgs = [{"role": "system", "content": SYSTEMS[h % len(SYSTEMS)]}, *msgs]
            if k + 1 < len(fns) and h % 4 == 1 and held_out(fns[k + 1][0]) == val:
                msgs += _ask(*fns[k + 1][:2])  # a second turn about the next function
            yield msgs, val
            w = _write(s, code)
            if w:
                yield w, val
