"""Checks of what a user hands slm, shared by every command: number ranges, paths slm is about
to write, and safetensors files before a library reads them. Each failure is one SLMError that
names the input and the fix.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from src.errors import SLMError

# file systems that are not storage: writing there is never what the user meant
_PSEUDO = ("/proc", "/sys", "/dev")


def number(name: str, value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
    """value if it is a finite number within [lo, hi] (open ends when asked), else SLMError."""
    if value is None:
        return value
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
    bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        raise SLMError(f"{name} {value}: use a number {_range(lo, hi, lo_open, hi_open)}")
    return value


def _range(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'above' if lo_open else 'of at least'} {lo}"
    return f"{'below' if hi_open else 'of at most'} {hi}"


def arg(kind, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
    """An argparse `type=` that parses kind (int/float) and refuses values outside the range."""
    import argparse

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            return number("", v, lo, hi, lo_open, hi_open)
        except SLMError:
            raise argparse.ArgumentTypeError(
                f"{text}: use a number {_range(lo, hi, lo_open, hi_open)}") from None

    parse.__name__ = kind.__name__
    return parse


def field_arg(model_cls, name: str):
    """An argparse `type=` for a flag that sets the pydantic field `name` of model_cls (a config
    section, or `Sampling`): the field's own type and range, checked like every other number."""
    import typing

    f = model_cls.model_fields[name]
    kinds = [k for k in (typing.get_args(f.annotation) or (f.annotation,)) if k in (int, float)]
    lo = hi = None
    lo_open = hi_open = False
    for m in f.metadata:  # pydantic keeps Field(ge=1) as annotated_types.Ge(ge=1)
        lo, lo_open = (m.ge, False) if hasattr(m, "ge") else (m.gt, True) if hasattr(m, "gt") \
            else (lo, lo_open)
        hi, hi_open = (m.le, False) if hasattr(m, "le") else (m.lt, True) if hasattr(m, "lt") \
            else (hi, hi_open)
    return arg(kinds[0], lo, hi, lo_open, hi_open)


def field_value(model_cls, name: str, text: str, flag: str):
    """text parsed and checked as field_arg does; SLMError naming `flag` when it is refused."""
    import argparse

    try:
        return field_arg(model_cls, name)(text)
    except argparse.ArgumentTypeError as e:
        raise SLMError(f"{flag} {e}") from None


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_parent(p: Path) -> Path:
    q = p
    while not os.path.exists(q):
        if q.parent == q:
            break
        q = q.parent
    return q


def is_system(path) -> bool:
    """Under /proc, /sys or /dev: not storage."""
    p = str(Path(path).resolve())
    return any(p == d or p.startswith(d + "/") for d in _PSEUDO)


def writable_folder(path, what: str) -> Path:
    """A folder slm will create files in: not a file, not under /proc, creatable and writable."""
    p = Path(path).absolute()
    if is_system(p):
        raise SLMError(f"{what} {path} is a system folder, not storage; choose a folder of yours")
    for part in p.parts:
        if len(os.fsencode(part)) > 255:
            raise SLMError(f"{what} {path}: the name {part[:40]}... is longer than file systems "
                           "allow (255 bytes); use a shorter one")
    if os.path.exists(p) and not os.path.isdir(p):
        raise SLMError(f"{what} {path} is a file, not a folder; give a folder (or a new path)")
    base = _existing_parent(p)
    if not base.is_dir():
        raise SLMError(f"{what} {path}: {base} is a file, so nothing can be created under it; "
                       "choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SLMError(f"{what} {path}: {base} is not writable by you; choose another path or "
                       "fix its permissions")
    for part in p.relative_to(base).parts:
        if len(os.fsencode(part)) > name_max(base):
            raise SLMError(f"{what} {path}: the name {part[:40]}... is longer than the file "
                           f"system allows ({name_max(base)} bytes); use a shorter one")
    return Path(path)


def new_file(path, what: str, force: bool = False, flag: str = "--force") -> Path:
    """A file slm is about to write: its folder must be writable and an existing file (or a
    folder of that name) is kept unless force."""
    p = Path(path)
    if len(os.fsencode(p.name)) > 255:
        raise SLMError(f"{what} {path}: the file name is longer than file systems allow (255 "
                       "bytes); use a shorter one")
    if os.path.isdir(p):
        raise SLMError(f"{what} {path} is a folder; give a file name inside it")
    if os.path.exists(p) and not force:
        raise SLMError(f"{what} {path} already exists; choose another name or pass {flag} "
                       "to replace it")
    writable_folder(p.parent, what)
    return p


def empty_folder(path, what: str, force: bool = False, flag: str = "--force") -> Path:
    """A folder slm fills: new or empty, unless force."""
    p = writable_folder(path, what)
    if os.path.isdir(p) and any(p.iterdir()) and not force:
        raise SLMError(f"{what} {path} is not empty; choose a new folder or pass {flag} to "
                       "replace the files slm writes there")
    return p


def user_mode(path) -> None:
    """Give a file the permissions of any other file the user creates (their umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path) -> dict:
    """The header of a .safetensors file, after checking that every tensor lies inside the file
    and has a known dtype and the size its shape says. SLMError names the file and the defect."""
    p = Path(path)
    if not p.is_file():
        raise SLMError(f"{path} does not exist; give a .safetensors file written by slm export")
    size = p.stat().st_size

    def bad(why: str):
        return SLMError(f"{path} is not a usable .safetensors file: {why}; export it again with "
                        "`slm export CHECKPOINT --to safetensors OUT`")

    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("it is shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise bad(f"its header length ({n} bytes) runs past the end of the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    body = size - 8 - n
    for key, t in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(t, dict) or t.get("dtype") not in _ST_DTYPES:
            raise bad(f"tensor {key!r} has no known dtype")
        shape, off = t.get("shape"), t.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(off, list) and len(off) == 2
                and all(isinstance(o, int) for o in off)):
            raise bad(f"tensor {key!r} has a malformed shape or offsets")
        if not 0 <= off[0] <= off[1] <= body:
            raise bad(f"tensor {key!r} lies past the end of the file (truncated?)")
        if off[1] - off[0] != math.prod(shape) * _ST_DTYPES[t["dtype"]]:
            raise bad(f"tensor {key!r} is {off[1] - off[0]} bytes, its shape {shape} needs "
                      f"{math.prod(shape) * _ST_DTYPES[t['dtype']]}")
    return header
