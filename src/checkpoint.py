"""Checkpoints: atomic writes, newest-first discovery, safe loading, pruning.

A checkpoint is a dict of tensors and plain values only, loaded with
`torch.load(weights_only=True)`: a file can never run code when it is opened.
"""

from __future__ import annotations

import os
import pickle
import re
import time
import zipfile
from pathlib import Path

import torch

from src.errors import SLMError

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def save(state: dict, path: str | Path) -> Path:
    """Write to a temporary name, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # a full disk surfaces as OSError, or as torch's RuntimeError raised while it closes
        os_err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(os_err, OSError):
            raise
        raise SLMError(
            f"could not write checkpoint {path}: {os_err.strerror or os_err}; the previous "
            "checkpoints are intact. Free disk space (or point --data-root elsewhere) and re-run "
            "to resume"
        ) from None
    return path


def _check_archive(path: Path) -> None:
    """A checkpoint is a zip archive with a CRC per record: refuse truncated or damaged files."""
    try:
        with zipfile.ZipFile(path) as z:
            # torch.save stores records uncompressed; anything else was not written by it
            packed = any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
            bad = None if packed else z.testzip()  # reads every record and checks its CRC
    except Exception as e:  # BadZipFile, OSError, EOFError, ...
        raise SLMError(
            f"{path} is not a usable checkpoint: it is truncated or not a PyTorch checkpoint "
            f"file ({type(e).__name__}); use another checkpoint (step_N.pt / final.pt)"
        ) from None
    if packed:
        raise SLMError(f"{path} is not a usable checkpoint: not written by torch.save")
    if bad is not None:
        raise SLMError(
            f"{path} is not a usable checkpoint: it is damaged (record {bad} fails its checksum); "
            "use another checkpoint (step_N.pt / final.pt)"
        )


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint without running code; clear errors for damaged or foreign files.

    mmap=True maps the tensors from the file instead of reading them into memory (several
    processes on one machine then share the pages).
    """
    path = Path(path)
    if path.is_dir():
        raise SLMError(f"checkpoint {path} is a folder; give a checkpoint file in it (e.g. "
                       f"{path}/final.pt or step_N.pt)")
    if path.suffix == ".safetensors" and path.is_file():
        raise SLMError(f"{path} is a weights-only export (no optimizer or data position); "
                       "training resumes from checkpoints/<name>/step_N.pt or final.pt, or "
                       "starts from these weights with --model.init_from")
    if not path.is_file():
        raise SLMError(f"checkpoint {path} does not exist")
    _check_archive(path)
    d = _torch_load(path, map_location, mmap)
    if not isinstance(d, dict) or "model_state_dict" not in d:
        raise SLMError(f"{path} is not an slm checkpoint (no model_state_dict)")
    return d


def _torch_load(path: Path, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True), every failure one SLMError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (zip), EOFError, ...
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            why = "it contains Python objects other than tensors, which slm refuses to unpickle"
        elif "enforce fail" in str(e) or "inline_container" in str(e):
            why = "it is a zip archive but not one written by torch.save"
        raise SLMError(f"{path} is not a usable checkpoint: {why}") from None


def load_tensors(path) -> dict:
    """The tensors of a weights file (.safetensors checked first, else a torch pickle read
    without running code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from src.validate import safetensors_header

        safetensors_header(path)
        try:
            return load_file(path)
        except Exception as e:  # anything the header check could not foresee
            raise SLMError(f"{path} is not a usable .safetensors file ({type(e).__name__}: "
                           f"{str(e)[:150]})") from None
    if not path.is_file():
        raise SLMError(f"weights file {path} does not exist")
    d = _torch_load(path)
    if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
        raise SLMError(f"{path} is not a weights file (a mapping of names to tensors)")
    return d


# What a checkpoint needs to continue training from (a finished model file has only weights).
RESUME_KEYS = ("model_state_dict", "optimizer_state_dict", "step", "tokens", "loader", "rng",
               "config")


def check_resumable(state: dict, path: str | Path) -> dict:
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise SLMError(
            f"{path} cannot be resumed from: it has no {', '.join(missing)} (a finished model "
            "file, or a checkpoint written by another tool); resume from checkpoints/<name>/"
            "step_N.pt or final.pt, or start over with --resume never"
        )
    osd = state["optimizer_state_dict"]
    if isinstance(osd, dict) and "sharded" in osd:
        _check_shards(Path(path), osd["sharded"])
    return state


# What a torch.distributed.checkpoint .metadata pickle may name: its own dataclasses, torch's
# dtypes, layouts (by name), memory formats and Size, and a path. Anything else (os.system, ...)
# is refused before torch unpickles it.
_TORCH_NAMES = {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last",
                "preserve_format", "float32", "float16", "bfloat16", "float64", "int64",
                "int32", "int16", "int8", "uint8", "bool", "complex64"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (
                module == "torch" and name in _TORCH_NAMES) or (
                module == "collections" and name == "OrderedDict") or (
                module == "builtins" and name in ("set", "frozenset", "slice")) or (
                module == "pathlib" and name in ("PosixPath", "PurePosixPath")) or (
                module == "torch.serialization" and name == "_get_layout"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _vet_metadata(path: Path) -> None:
    with open(path, "rb") as f:
        _MetadataUnpickler(f).load()


def _check_shards(path: Path, name) -> None:
    """An FSDP checkpoint's optimizer shards (torch.distributed.checkpoint) are all there, in a
    folder beside it."""
    from torch.distributed.checkpoint import FileSystemReader

    ok_name = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name
    folder = path.parent / (name if ok_name else "?")
    why = None
    if not ok_name:
        why = f"named {name!r}, not a folder beside it"
    elif not (folder / ".metadata").is_file():
        why = "missing"
    else:
        try:
            _vet_metadata(folder / ".metadata")  # torch reads it with pickle: no code may run
            meta = FileSystemReader(str(folder)).read_metadata()
            files = {info.relative_path for info in (meta.storage_data or {}).values()}
            lost = sorted(f for f in files if not (folder / f).is_file())
            why = f"missing {', '.join(lost[:3])}" if lost else None
        except Exception as e:  # a damaged .metadata
            why = f"unreadable ({type(e).__name__})"
    if why:
        raise SLMError(f"{path}: its optimizer shards {folder} are {why}; resume from an earlier "
                       "checkpoint (--resume PATH) or start over (--resume never)")


def load_weights(module, state_dict: dict, path: str | Path) -> None:
    """module.load_state_dict (a model or an optimizer), with a one-line error on a mismatch."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        raise SLMError(
            f"{path}: its weights do not fit the model its config describes ({why}); the file "
            "was altered or written by another tool"
        ) from None


def step_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """step_N.pt files in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(found)


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints to resume from, newest first (final.pt counts as the newest)."""
    run_dir = Path(run_dir)
    out = [p for _, p in reversed(step_files(run_dir))]
    if (run_dir / "final.pt").is_file():
        out.insert(0, run_dir / "final.pt")
    return out


def find_resumable(run_dir: str | Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped."""
    for p in candidates(run_dir):
        try:
            return p, check_resumable(load(p, mmap=True), p)  # mapped: see load()
        except SLMError as e:
            log(f"warning: skipping {p.name}: {e}")
    return None


def remove_partial(folder: str | Path, pattern: str = "*.pt") -> list[Path]:
    """Delete temporary files of saves (of `pattern`) that a kill cut short.

    Only call it while holding the lock of the run that writes those files.
    """
    folder = Path(folder)
    stale = sorted(folder.glob(f".{pattern}.*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest keep_last step_N.pt (with their optimizer shards, step_N.optim/)."""
    import shutil

    for _, p in step_files(run_dir)[:-keep_last]:
        p.unlink(missing_ok=True)
        shutil.rmtree(p.with_suffix(".optim"), ignore_errors=True)


def move_aside(run_dir: Path, model_files=()) -> Path | None:
    """--resume never: keep the old run under a new name instead of deleting it, with its
    finished model files (models/<name>_final.pt, ...) moved into it."""
    if not run_dir.exists() or all(p.name == ".lock" for p in run_dir.iterdir()):
        return None
    dest = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(dest)
    for f in map(Path, model_files):
        if f.is_file():
            os.replace(f, dest / f.name)
    return dest


# ----------------------------------------------------------------------------- model files

FORMAT = 1  # the checkpoint dict's layout version
SAFETENSORS_FORMAT = "slm-safetensors-v1"


def model_file(model_state_dict: dict, config: dict, tok, step: int, tokens: int,
               val_loss: float | None = None, val_bpb: float | None = None) -> dict:
    """The dict of a finished model file (models/<name>_final.pt): weights, config, tokenizer."""
    return {"format": FORMAT, "model_state_dict": model_state_dict, "config": config,
            "tokenizer": tok.to_dict(), "tokenizer_id": tok.id, "step": step, "tokens": tokens,
            "val_loss": val_loss, "val_bpb": val_bpb}


def save_safetensors(model, tok, config: dict, out, dtype=torch.float32) -> Path:
    """Our weights as safetensors (tied weights stored once) plus a .json beside them with the
    config and tokenizer."""
    import json

    from safetensors.torch import save_file

    from src.validate import user_mode

    out = safetensors_target(out, force=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tied = model.cfg.tie_embeddings
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, str(out), metadata={"format": "pt", "slm": SAFETENSORS_FORMAT})
    meta = {"format": SAFETENSORS_FORMAT, "config": config, "tokenizer": tok.to_dict()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    user_mode(out)
    return out


def safetensors_target(out, force: bool = False) -> Path:
    """Where save_safetensors writes (OUT.safetensors and OUT.json), refusing to replace either
    unless force."""
    from src.validate import new_file

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    new_file(out, "export target", force)
    new_file(out.with_suffix(".json"), "export target (config beside the weights)", force)
    return out


def read_safetensors(path, weights: bool = True):
    """(config dict, state dict or None, tokenizer) of an `slm export --to safetensors` file."""
    import json

    from src.data.tokenizer import from_dict

    path = Path(path)
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise SLMError(f"{path}: its config {side} is missing or unreadable ({e}); keep the "
                       ".json written by `slm export --to safetensors` beside the weights"
                       ) from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise SLMError(f"{side}: not written by `slm export --to safetensors`")
    sd = None
    if weights:
        sd = {k: v.float() for k, v in load_tensors(path).items()}
        if "lm_head.weight" not in sd:  # stored once when tied
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return meta["config"], sd, from_dict(meta["tokenizer"])


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, config dict) from any slm checkpoint, finished model file,
    or `slm export --to safetensors` file: everything inference needs, without the trainer."""
    from src.data.tokenizer import from_dict
    from src.model.gpt import GPT, GPTConfig

    if Path(path).suffix == ".safetensors":
        config, sd, tok = read_safetensors(path)
    else:
        state = load(path)
        missing = [k for k in ("config", "tokenizer") if k not in state]
        if missing:
            raise SLMError(
                f"{path} has no {' or '.join(missing)}: it was not written by slm, so its model "
                "cannot be rebuilt; give a checkpoint from checkpoints/<name>/ or models/"
            )
        config, sd = state["config"], state["model_state_dict"]
        tok = from_dict(state["tokenizer"], str(path))
    try:
        mcfg = GPTConfig.model_validate(config["model"])
    except Exception as e:
        raise SLMError(f"{path}: its stored model config is invalid ({' '.join(str(e).split())[:300]})"
                       ) from None
    model = GPT(mcfg)
    load_weights(model, sd, path)
    from src.hardware import resolve_device

    return model.to(resolve_device(str(device))).eval(), tok, config
