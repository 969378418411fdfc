"""Where text comes from: a `data.source` string, resolved into groups of inputs yielding documents.

    python-stdlib            the running interpreter's standard-library sources (no download)
    tinyshakespeare, tinystories, fineweb-edu-10b, openwebtext      presets (PRESETS below), each
                             pinned: hub presets are Parquet files at one commit (no loading
                             script), the URL preset a file at one commit with its SHA-256
    path/to/file-or-folder   text files (.txt .md .py .rst .text: one document per file), JSON lines
                             (.jsonl .ndjson: one per line) and Parquet (.parquet: one per row),
                             each optionally compressed (.gz .bz2 .xz; .zst with `zstandard`)
    https://host/path/file   downloaded once into <data_root>/datasets/downloads/ (sha256 recorded)
    hf:<repo>[:<subset>]     a Hugging Face dataset, streamed; data.split and data.text_field pick
                             the rows' split and text column (a local copy: hf:/path/to/repo-folder)

JSON-lines and Parquet files, local or on the hub, are read by the `datasets` library in streaming
mode, so nothing has to fit in memory; text files are read in chunks for the same reason.
`resolve()` returns JSON-able groups (one reader kind each); `src.data.prepare` splits them into
independent parts.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import socket
import sysconfig
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

from src.errors import SLMError

EMBEDDED = "python-stdlib"


@dataclass(frozen=True)
class HubPreset:
    """A Hugging Face dataset pinned to one commit and read as its Parquet files.

    Naming the files (rather than letting `datasets` discover the repo) means no loading script
    is ever run or needed, and the same bytes come back whenever the preset is prepared.
    """

    repo: str
    revision: str  # a commit id: what the files are read at, recorded in the manifest
    splits: dict  # split -> tuple of Parquet paths inside the repo at that revision
    about: str = ""
    gpt2_tokens: int | None = None  # training tokens with GPT-2's tokenizer, where known (plans)

    @property
    def spec(self) -> str:
        return f"hf:{self.repo}@{self.revision}"


@dataclass(frozen=True)
class UrlPreset:
    """A file on the web at an immutable address (a commit), with the SHA-256 it must have."""

    url: str
    sha256: str
    about: str = ""
    gpt2_tokens: int | None = None  # tokens with GPT-2's tokenizer, where known (plans)

    @property
    def spec(self) -> str:
        return self.url


def _numbered(pattern: str, n: int) -> tuple[str, ...]:
    return tuple(pattern.format(i) for i in range(n))


_TINYSTORIES = "data/train-{:05d}-of-00004-{}.parquet"
PRESETS = {
    "tinyshakespeare": UrlPreset(
        "https://raw.githubusercontent.com/karpathy/char-rnn/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        about="Shakespeare's plays, 1.1 MB of text (char-rnn's copy)",
        gpt2_tokens=338_025,  # nanoGPT's shakespeare/prepare.py: 301,966 train + 36,059 val
    ),
    "tinystories": HubPreset(
        "roneneldan/TinyStories", "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64",
        {"train": tuple(_TINYSTORIES.format(i, h) for i, h in enumerate(
            ("2d5a1467fff1081b", "5852b56a2bd28fd9", "a26307300439e943", "d243063613e5a057"))),
         "validation": ("data/validation-00000-of-00001-869c898b519ad725.parquet",)},
        about="2.1M short stories in simple English, with a validation split",
    ),
    "fineweb-edu-10b": HubPreset(
        "HuggingFaceFW/fineweb-edu", "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",
        {"train": _numbered("sample/10BT/{:03d}_00000.parquet", 14)},
        about="FineWeb-Edu's 10B-token sample: 9.7M educational web pages, 28.5 GB of Parquet",
        gpt2_tokens=10_000_000_000,  # the sample's name: 10B GPT-2 tokens
    ),
    "openwebtext": HubPreset(
        "Skylion007/openwebtext", "79d93d786212f7344586290adb811d4ae6a1762c",
        {"train": _numbered("plain_text/train-{:05d}-of-00080.parquet", 80)},
        about="OpenWebText (GPT-2's WebText, recreated): 8.0M documents, 24 GB of Parquet",
        gpt2_tokens=9_000_000_000,  # nanoGPT's openwebtext/prepare.py: about 9B train tokens
    ),
}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
KINDS = {"text": TEXT_SUFFIXES, "json": {".jsonl", ".ndjson"}, "parquet": {".parquet"}}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
CHUNK_CHARS = 1 << 20  # text files are read this many characters at a time
NET_TIMEOUT = 5.0  # seconds to wait for a server before calling the network unavailable
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def expand(source: str) -> str:
    """A preset's real source (tinyshakespeare -> its URL, a hub preset -> hf:<repo>@<commit>);
    anything else unchanged."""
    preset = PRESETS.get(source)
    return preset.spec if preset else source


def hub_file(repo: str, revision: str, path: str) -> str:
    """Where `datasets` reads a pinned hub file from (fsspec's hf:// at that commit)."""
    return f"hf://datasets/{repo}@{revision}/{path}"


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def is_hub(spec: str) -> bool:
    return spec.startswith("hf:")


# ----------------------------------------------------------------------------- local files


def stdlib_files() -> list[Path]:
    """The standard library's .py sources, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise SLMError(f"no Python sources found under {root}: use a local data.source instead")
    return files


def file_kind(path: Path) -> str | None:
    """'text', 'json' or 'parquet' from the suffix (a compression suffix is looked through)."""
    name = path.name.lower()
    for c in COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    suffix = Path(name).suffix
    return next((k for k, sfx in KINDS.items() if suffix in sfx), None)


def local_files(source: str) -> list[Path]:
    p = Path(source).expanduser().absolute()  # parts may run from another directory
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_kind(f))
        if not files:
            ok = ", ".join(sorted(set().union(*KINDS.values())))
            raise SLMError(f"data.source {source}: the folder has no {ok} files")
        return files
    raise SLMError(
        f"data.source {source}: no such file or folder; give a path to .txt/.jsonl/.parquet files, "
        f"'{EMBEDDED}' for the embedded corpus, a preset ({', '.join(PRESETS)}), a URL or "
        "hf:<repo>[:<subset>]"
    )


def local_groups(source: str, label: str | None = None) -> list[dict]:
    """Files grouped by reader: text first, then JSON lines, then Parquet (each in path order)."""
    files = local_files(source)
    kinds = [file_kind(f) or "text" for f in files]  # a file named explicitly is text by default
    groups = []
    for kind in KINDS:
        mine = [str(f) for f, k in zip(files, kinds, strict=True) if k == kind]
        if mine and kind == "text":
            groups.append({"kind": "text", "files": mine})
        elif mine:
            groups.append({"kind": "rows", "builder": kind, "files": mine,
                           "label": label or source})
    return groups


def open_text(path: str | Path) -> io.TextIOBase:
    """A UTF-8 text stream over a file, decompressing .gz/.bz2/.xz (and .zst with zstandard)."""
    p, name = Path(path), str(path).lower()
    if name.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(p, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(p, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise SLMError(
                f"{p}: reading .zst files needs the zstandard package (pip install zstandard), "
                "or decompress it first (zstd -d)"
            ) from None
        return zstandard.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


class TextFile:
    """One document: a text file, read lazily in chunks (it may be larger than memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def chunks(self, size: int = CHUNK_CHARS) -> Iterator[str]:
        try:
            with open_text(self.path) as f:
                while chunk := f.read(size):
                    yield chunk
        except UnicodeDecodeError as e:
            raise SLMError(
                f"{self.path}: not UTF-8 text (bad byte near offset {e.start}); convert it with "
                f"`iconv -f latin1 -t utf-8` or remove it from data.source"
            ) from None
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise SLMError(f"{self.path}: cannot be read ({e})") from None

    def read(self) -> str:
        return "".join(self.chunks())


# ----------------------------------------------------------------------------- rows (datasets)


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our errors say it better
    return datasets


def open_rows(unit: dict, text_field: str):
    """A streaming `datasets.IterableDataset` over a rows unit (local or hub files), text only."""
    ds_lib = _datasets()
    builder, files, label = unit["builder"], unit["files"], unit.get("label", unit["files"][0])
    try:
        ds = ds_lib.load_dataset(builder, data_files=files, split="train", streaming=True)
        cols = ds.column_names
        if cols and text_field not in cols:
            raise SLMError(
                f"data.source {label}: the rows have no '{text_field}' column (they have: "
                f"{', '.join(cols)}); set data.text_field"
            )
        if builder == "parquet":  # read the text column only
            ds = ds_lib.load_dataset(builder, data_files=files, split="train", streaming=True,
                                     columns=[text_field])
        if unit.get("shard"):
            n, i = unit["shard"]
            ds = (_reshard(ds) if unit.get("reshard") else ds).shard(n, i, contiguous=True)
    except SLMError:
        raise
    except Exception as e:
        raise SLMError(f"data.source {label}: `datasets` cannot open it ({_brief(e)})") from None
    return ds


def _reshard(ds):
    """Parquet row groups as shards (finer parts than whole files), when datasets can."""
    try:
        return ds.reshard()
    except (AttributeError, NotImplementedError):
        return ds


def row_units(group: dict, text_field: str, max_parts: int) -> list[dict]:
    """Split a rows group into at most max_parts units (by file, and by Parquet row group)."""
    ds = open_rows(group, text_field)
    reshard = group["builder"] == "parquet"
    try:
        n = min((_reshard(ds) if reshard else ds).num_shards, max_parts)
    except Exception as e:
        raise SLMError(f"data.source {group['label']}: cannot be read ({_brief(e)})") from None
    if n <= 1:
        return [dict(group)]
    return [dict(group, shard=[n, i], reshard=reshard) for i in range(n)]


def iter_rows(unit: dict, text_field: str) -> Iterator[str]:
    label = unit.get("label", unit["files"][0])
    it = iter(open_rows(unit, text_field))
    n = 0
    while True:
        n += 1
        try:
            row = next(it)
        except StopIteration:
            return
        except SLMError:
            raise
        except Exception as e:
            if "JSON parse error" in str(e):
                raise SLMError(
                    f"data.source {label}: not valid JSON lines ({_brief(e)}); fix the file (one "
                    "JSON object per line) or remove it from data.source"
                ) from None
            raise SLMError(
                f"data.source {label}: reading failed ({_brief(e)}); check the file's format "
                "or remove it from data.source"
            ) from None
        text = row.get(text_field)
        if text is None:
            if text_field not in row:
                raise SLMError(
                    f"data.source {label}: a row has no '{text_field}' field (it has: "
                    f"{', '.join(row)}); set data.text_field"
                )
        if not isinstance(text, str):  # never trained as "None" or "123", never dropped unseen
            what = "missing or null" if text is None else f"a {type(text).__name__}, not text"
            raise SLMError(
                f"data.source {label}: row {n}'s '{text_field}' is {what}; give every row a "
                f"string '{text_field}' (or set data.text_field to the field that holds the text)")
        yield text


def _brief(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


# ----------------------------------------------------------------------------- network sources


def offline_message(what: str, host: str, reason: str, hint: str | None = None) -> str:
    if hint is None:
        hint = (" A Hugging Face dataset downloaded elsewhere (`hf download <repo> --repo-type "
                "dataset --local-dir DIR`) is read offline as data.source: hf:DIR.") if (
            host.endswith("huggingface.co") or "hf:" in what) else ""
    return (
        f"{what} needs the network (to reach {host}), which is not available here: {reason}. "
        "Connect and retry, or point data.source at local files instead: a .txt/.jsonl/.parquet "
        f"file or a folder of them (e.g. --data.source ./my_corpus/).{hint}"
    )


def require_network(url: str, what: str, hint: str | None = None) -> None:
    """Fail at once, with a clear message, when url's server (or the proxy) cannot be reached."""
    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pu = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = pu.hostname or host, pu.port or 80
    outcome: list = [None]

    def probe():
        try:
            socket.create_connection((host, port), timeout=NET_TIMEOUT).close()
            outcome[0] = True
        except OSError as e:
            outcome[0] = e

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(NET_TIMEOUT + 1)
    if outcome[0] is not True:
        reason = f"no answer within {NET_TIMEOUT:.0f} s" if outcome[0] is None else str(outcome[0])
        raise SLMError(offline_message(what, host, reason, hint))


def download(url: str, data_root: str | Path, log=print, sha256: str | None = None) -> dict:
    """Fetch url once into <data_root>/datasets/downloads/; returns {path, url, sha256, bytes}.

    With sha256 (a pinned preset), a download with other content is refused."""
    d = Path(data_root) / "datasets" / "downloads"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(urlparse(url).path).name) or "download"
    dest = d / f"{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name}"
    meta_path = dest.with_name(dest.name + ".json")
    if dest.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("bytes") == dest.stat().st_size and sha256 in (None, meta.get("sha256")):
            return meta
    what = f"data.source {url}"
    require_network(url, what)
    d.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url} -> {dest}")
    tmp, h, n = dest.with_name(dest.name + ".part"), hashlib.sha256(), 0
    req = urllib.request.Request(url, headers={"User-Agent": "slm"})
    try:
        with urllib.request.urlopen(req, timeout=3 * NET_TIMEOUT) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
    except urllib.error.HTTPError as e:
        raise SLMError(f"{what}: the server answered {e.code} {e.reason}; check the URL") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SLMError(offline_message(what, urlparse(url).hostname or url, str(reason))) from None
    if sha256 and h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise SLMError(f"{what}: the download's SHA-256 is {h.hexdigest()}, not the pinned "
                       f"{sha256}; the file changed at its source, so it is not used")
    os.replace(tmp, dest)
    meta = {"url": url, "path": str(dest), "sha256": h.hexdigest(), "bytes": n}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def require_hub(what: str, hint: str | None = None) -> None:
    """Fail at once, with a clear message, when the Hugging Face hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise SLMError(offline_message(what, "huggingface.co", "HF_HUB_OFFLINE is set", hint))
    from huggingface_hub import constants

    require_network(constants.ENDPOINT, what, hint)


def preset_groups(name: str, preset: HubPreset, split: str) -> tuple[list[dict], dict]:
    """A hub preset's Parquet files for one split, at its pinned commit (read by `datasets`'s
    parquet reader: the repo's own loading code, if any, is never looked at)."""
    files = preset.splits.get(split)
    if not files:
        raise SLMError(f"data.source {name}: no split '{split}' (splits: "
                       f"{', '.join(preset.splits)}); set data.split")
    urls = [hub_file(preset.repo, preset.revision, f) for f in files]
    if any(u.startswith("hf://") for u in urls):
        top = files[0].rsplit("/", 1)[0] if "/" in files[0] else "."
        hint = (f" To prepare it offline, download its files elsewhere (`hf download {preset.repo}"
                f" --repo-type dataset --revision {preset.revision} --include '{top}/*' "
                f"--local-dir DIR`) and use data.source: DIR/{top}.")
        require_hub(f"data.source {name} ({preset.spec})", hint)
    info = {"kind": "hub", "repo": preset.repo, "subset": None, "split": split,
            "revision": preset.revision, "files": len(files), "format": "parquet",
            "data_files": list(files)}
    return [{"kind": "rows", "builder": "parquet", "files": urls, "label": name}], info


def hub_groups(spec: str, split: str) -> tuple[list[dict], dict]:
    """The data files of a hub dataset's split, pinned to the revision seen now."""
    repo, _, subset = spec[3:].partition(":")
    if not repo:
        raise SLMError(f"data.source {spec}: write hf:<owner>/<name>[:<subset>]")
    local = Path(repo).expanduser().is_dir()
    if not local:
        require_hub(f"data.source {spec}")
    ds_lib = _datasets()
    try:
        b = ds_lib.load_dataset_builder(str(Path(repo).expanduser()) if local else repo,
                                        subset or None)
    except Exception as e:
        raise SLMError(
            f"data.source {spec}: the Hugging Face dataset cannot be opened ({_brief(e)}); check "
            "the name and subset (hf:<owner>/<name>[:<subset>])"
        ) from None
    data_files = b.config.data_files or {}
    files = data_files.get(split)
    if not files:
        have = ", ".join(map(str, data_files)) or "none"
        raise SLMError(f"data.source {spec}: no split '{split}' (splits: {have}); set data.split")
    rev = re.search(r"@([0-9a-f]{40})/", str(files[0]))
    info = {"kind": "hub", "repo": repo, "subset": subset or None, "split": split,
            "revision": rev.group(1) if rev else None, "files": len(files), "format": b.name}
    group = {"kind": "rows", "builder": b.name, "files": [str(f) for f in files], "label": spec}
    return [group], info


# ----------------------------------------------------------------------------- any source


def resolve(source: str, data_root: str | Path, split: str = "train", log=print):
    """(groups, info): the source's inputs as JSON-able groups, and what to record about it."""
    spec, preset = expand(source), PRESETS.get(source)
    info = {"source": source} | ({"preset": spec} if spec != source else {})
    if spec == EMBEDDED:
        files = [str(f) for f in stdlib_files()]
        return [{"kind": "text", "files": files}], info | {
            "kind": "embedded", "python": sysconfig.get_python_version()}
    if isinstance(preset, HubPreset):
        groups, hub = preset_groups(source, preset, split)
        return groups, info | hub
    if is_url(spec):
        meta = download(spec, data_root, log, sha256=getattr(preset, "sha256", None))
        return local_groups(meta["path"], label=spec), info | {"kind": "url"} | meta
    if is_hub(spec):
        groups, hub = hub_groups(spec, split)
        return groups, info | hub
    return local_groups(spec), info | {"kind": "local"}


def fingerprint(source: str) -> str:
    """Changes whenever the source's content may have changed (local: paths, sizes, mtimes).

    URLs and hub datasets are keyed by name (offline-safe); the checksum or revision actually
    used is recorded in the dataset's manifest."""
    spec = expand(source)
    h = hashlib.sha256(spec.encode())
    if is_url(spec) or is_hub(spec):
        return h.hexdigest()[:16]
    if spec == EMBEDDED:
        h.update(sysconfig.get_python_version().encode())
    for p in stdlib_files() if spec == EMBEDDED else local_files(spec):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def iter_docs(unit: dict, text_field: str) -> Iterator[str | TextFile]:
    """The documents of one unit: TextFile objects (text files) or strings (rows)."""
    if unit["kind"] == "text":
        for f in unit["files"]:
            yield TextFile(f)
    else:
        yield from iter_rows(unit, text_field)


def count_documents(groups: list[dict], text_field: str, limit: int) -> int:
    """How many documents the groups hold, counting no further than limit."""
    n = 0
    for g in groups:
        if n >= limit:
            break
        if g["kind"] == "text":
            n += len(g["files"])
        else:
            n += sum(1 for _ in islice(iter_rows(g, text_field), limit - n))
    return min(n, limit)


def iter_documents(source: str, text_field: str = "text", data_root: str | Path = "data",
                   split: str = "train") -> Iterator[str]:
    """Every document of a source as a string, in a fixed order (for small sources and tools)."""
    groups, _ = resolve(source, data_root, split, log=lambda *a: None)
    for g in groups:
        for doc in iter_docs(g, text_field):
            yield doc.read() if isinstance(doc, TextFile) else doc


def is_val_document(index: int, val_fraction: float, offset: int = 0) -> bool:
    """Deterministic train/val split: every (1/val_fraction)-th document, spread evenly, so
    any run of 1/val_fraction documents holds one (a hash could leave a small source none)."""
    i = index + offset
    return int((i + 1) * val_fraction) > int(i * val_fraction)
