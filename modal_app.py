"""Train on Modal's GPUs: a thin launcher over `src.training.trainer.train(cfg)`.

    modal run modal_app.py                                         # configs/gpt_124m.yaml on a T4
    modal run --detach modal_app.py --config configs/gpt_350m.yaml # keeps running if you log off
    modal run modal_app.py::train --config-path configs/gpt_124m.yaml
    modal run modal_app.py --config configs/gpt_124m.yaml --gpu H100:8 --set "training.max_steps=2000"
    modal run modal_app.py::prepare_data --config-path configs/gpt_124m.yaml   # tokenize on CPUs
    modal run modal_app.py::sweep --config configs/gpt_124m.yaml --grid "training.learning_rate=1e-4,3e-4"

The GPU, timeout, retries, CPUs and memory come from the config's `modal:` section, or from
--gpu and --set on the command line. Everything lives on the volume `slm-data`, mounted at /data:
datasets/ (token shards), checkpoints/<name>/ and models/<name>_final.pt. A preempted, crashed or
timed-out attempt is retried by Modal and continues from the run's newest checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import modal
import yaml

ROOT = Path(__file__).resolve().parent
APP_NAME = "slm-training"
VOLUME_NAME = "slm-data"
MOUNT = "/data"
DEFAULT_CONFIG = "configs/gpt_124m.yaml"
STOP_MARGIN_S = 900  # an attempt checkpoints and stops this long before modal.timeout (at most)
DATA_LOCK_WAIT_S = 86400  # a container waits this long for another one preparing the same data
COMMIT_POLL_S = 30  # multi-GPU runs: how often the launcher looks for a new checkpoint to commit
MASTER_PORT = 29500

# The packages the containers need, pinned to versions the project is tested with.
PACKAGES = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "pydantic==2.14.4",
    "tokenizers==0.23.3",
    "tiktoken==0.14.0",
    "tqdm==4.70.1",
    "wandb==0.31.0",
    "datasets==5.2.0",
    "pyarrow==26.0.1",
    "safetensors==0.8.0",
]

# ----------------------------------------------------------------------------- configs


def data_root() -> Path:
    """The volume's mount point; SLM_DATA_ROOT points elsewhere (tests run the bodies in-process)."""
    return Path(os.environ.get("SLM_DATA_ROOT", MOUNT))


def split_set(text: str) -> list[str]:
    """--set "training.learning_rate=3e-4 model.n_layer=6" -> ['training.learning_rate=3e-4', ...]."""
    from src.errors import SLMError

    try:
        items = shlex.split(text or "")
    except ValueError as e:
        raise SLMError(f"--set {text!r}: {e}") from None
    for item in items:
        if "=" not in item:
            raise SLMError(f"--set item '{item}' must look like section.key=value "
                           '(e.g. --set "training.max_steps=2000 model.n_layer=6")')
    return items


def _find_config(path: str) -> Path:
    p = Path(path)
    return p if p.is_file() or p.is_absolute() or not (ROOT / p).is_file() else ROOT / p


def resolve(config_path: str = DEFAULT_CONFIG, gpu: str = "", overrides=(), name: str = "",
            config_yaml: str = ""):
    """(raw dict, validated Config) from a config file or the YAML the launcher sent, overridden.

    The raw dict (not the resolved Config) is what travels to the containers, so they validate
    exactly what was validated here.
    """
    from src.training.config import apply_overrides, read_yaml, validate_config

    if config_yaml:
        raw, source = yaml.safe_load(config_yaml), "the launched config"
    else:
        raw, source = read_yaml(_find_config(config_path)), config_path
    extra = [*overrides, *([f"name={name}"] if name else []), *([f"modal.gpu={gpu}"] if gpu else [])]
    raw = apply_overrides(raw, extra)
    return raw, validate_config(copy.deepcopy(raw), source)


WANDB_SECRET = "wandb"


def wandb_secret() -> modal.Secret:
    """The W&B key (attached only to runs that log to W&B online)."""
    return modal.Secret.from_name(WANDB_SECRET, required_keys=["WANDB_API_KEY"])


def wants_wandb_secret(cfg, wandb: bool = True) -> bool:
    return bool(wandb) and cfg.wandb.mode == "online"


def launch_options(m, wandb: bool = False) -> dict:
    """Modal Function options for a run whose config has the `modal:` section `m`.

    CPU and memory are the reservation Modal bills (the GPU table's per-GPU default unless the
    config sets them); `wandb` attaches the W&B secret (options replace the function's secrets).
    """
    from src.hardware import parse_gpu, reservation

    kind, n = parse_gpu(m.gpu)
    cpu, memory = reservation(m.gpu, m.cpu, m.memory)
    return {
        "gpu": f"{kind}:{n}" if n > 1 else kind,
        "timeout": m.timeout,
        # retried at once; an attempt that times out is retried too, with a fresh timeout
        "retries": modal.Retries(max_retries=m.retries, initial_delay=0.0, backoff_coefficient=1.0),
        "cpu": cpu,
        "memory": memory,
    } | ({"secrets": [wandb_secret()]} if wandb else {})


def attempt_seconds(timeout: int, started: float | None = None) -> float:
    """Seconds left to train before the attempt checkpoints and stops, ahead of Modal's timeout.

    Modal counts `timeout` from the start of the call (each retry gets a fresh one), so the time
    since `started` (time.monotonic() at the call's start: data preparation, waiting) is used up.
    """
    left = timeout - min(STOP_MARGIN_S, 0.1 * timeout)
    return left - (time.monotonic() - started if started is not None else 0.0)


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cli_modal_section(argv: list[str]):
    """The `modal:` section of the config a `modal run` command line names, or None."""
    cfg = cli_config(argv)
    return cfg and cfg.modal


def cli_config(argv: list[str]):
    """The config a `modal run` command line names, or None.

    The decorators below are evaluated when `modal run` imports this file, before any option is
    parsed; reading --config/--config-path, --gpu and --set here lets even
    `modal run modal_app.py::train --config-path X` (which calls the function directly) use X's GPU
    and timeout. A config that does not load stops the command here, before any container starts.
    """
    from src.errors import SLMError

    explicit = _argv_value(argv, "--config-path") or _argv_value(argv, "--config")
    try:
        _, cfg = resolve(explicit or DEFAULT_CONFIG, _argv_value(argv, "--gpu") or "",
                         split_set(_argv_value(argv, "--set") or ""))
    except SLMError as e:
        if explicit and not {"-h", "--help"} & set(argv):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return None
    return cfg


def _under_modal_run(argv: list[str]) -> bool:
    return (len(argv) > 2 and Path(argv[0]).name in ("modal", "__main__.py")
            and argv[1] in ("run", "deploy", "serve", "shell"))


def static_wandb(argv: list[str]) -> bool:
    """Whether the `train` function itself carries the W&B secret.

    Modal looks up every function's secrets when the app starts, so a static secret would make
    `::prepare_data` and `--no-wandb` runs fail without one. Only `modal run modal_app.py::train`
    with W&B online gets it statically; the launcher and sweeps attach it per call instead
    (`launch_options(..., wandb=True)`), where a missing secret is one error line.
    """
    if not (modal.is_local() and _under_modal_run(argv)):
        return True  # imported plainly (tests, the container): the function as `::train` sees it
    target = next((a for a in argv[2:] if ".py" in a and not a.startswith("-")), "")
    if argv[1] != "run" or not target.endswith("::train") or "--no-wandb" in argv:
        return False
    cfg = cli_config(argv)
    return cfg is None or wants_wandb_secret(cfg)


def _static_modal_section():
    """Settings the decorators use: the command line's config under `modal run`, else defaults."""
    try:
        from src.training.config import ModalConfig
    except ModuleNotFoundError as e:  # `modal run` reads the configs here, with the project's code
        print(f"error: modal_app.py needs the project installed where you run `modal` ({e.name} "
              "is missing): pip install -e .", file=sys.stderr)
        raise SystemExit(2) from None

    argv = sys.argv
    m = cli_modal_section(argv) if modal.is_local() and _under_modal_run(argv) else None
    if m is None:
        m = ModalConfig(nodes=int(os.environ.get("SLM_CLUSTER_NODES", "1")))
    return m


# ----------------------------------------------------------------------------- the app

app = modal.App(APP_NAME)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*PACKAGES)
    .env({"PYTHONUNBUFFERED": "1"})
    .add_local_dir(ROOT / "src", remote_path="/root/src", ignore=["**/__pycache__"])
    .add_local_dir(ROOT / "configs", remote_path="/root/configs")
)
STATIC = _static_modal_section()
STATIC_WANDB = static_wandb(sys.argv)


def commit_volume(log=print) -> None:
    """Make this container's writes to the volume durable (a no-op outside Modal)."""
    if modal.is_local():
        return
    try:
        volume.commit()
    except Exception as e:  # Modal also commits in the background and when the container stops
        log(f"warning: volume commit failed ({e}); Modal retries it in the background")


def reload_volume(log=print) -> None:
    """See what other containers committed since this one started (a no-op outside Modal)."""
    if modal.is_local():
        return
    try:
        volume.reload()
    except Exception as e:
        log(f"warning: volume reload failed ({e})")


class Deadline:
    """Stop an attempt cleanly before Modal's timeout kills it.

    After `seconds`, SIGTERM goes to `pid` (default: this process, where train() then saves a
    checkpoint and raises Interrupted; or the torchrun launcher, which passes it to its workers).
    While active, SIGTERM/SIGINT that reach this process go to `pid` when it is a child, and a
    SIGTERM that arrives here before train() installs its own handler raises Interrupted.
    """

    def __init__(self, seconds: float, pid: int | None = None):
        self.seconds, self.pid, self.fired, self.old = seconds, pid, False, {}

    def _fire(self):
        self.fired = True
        os.kill(self.pid or os.getpid(), signal.SIGTERM)

    def _on_signal(self, signum, frame):
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            return
        from src.errors import Interrupted

        raise Interrupted(f"{signal.Signals(signum).name} before training started", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT) if self.pid else (signal.SIGTERM,):
                self.old[s] = signal.signal(s, self._on_signal)
        self.timer = threading.Timer(max(self.seconds, 0.0), self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        for s, h in self.old.items():
            signal.signal(s, h)


LOCK_DICT = "slm-locks"  # a modal.Dict: which container holds which run or dataset


def lock_store():
    """The cross-container lock store inside a Modal container; None elsewhere (flock there)."""
    if modal.is_local():
        return None
    return modal.Dict.from_name(LOCK_DICT, create_if_missing=True)


def _call_id() -> str | None:
    return None if modal.is_local() else modal.current_function_call_id()


def shared_lock(locks, key: str, what: str, log=print, wait_s: float = 0.0, owner=None):
    """A context that holds `key` in `locks` (a modal.Dict or the same methods), if any.

    The owner is this Modal call, so a retried attempt of the same call takes over its own lease
    at once, while another call (another `modal run`) finds it taken.
    """
    if locks is None:
        return contextlib.nullcontext()
    from src.training.lock import LeaseLock

    return _Held(LeaseLock(locks, key, what, owner=owner or _call_id(), log=log), wait_s)


def cluster_lock(locks, run: str, rank: int, log=print, owner=None):
    """The run lock of a multi-node run: rank 0 holds it for the whole cluster (every container
    of one clustered call shares its call id); the other ranks only check that no other call
    holds it, so a refused run ends in every container instead of leaving them waiting."""
    key, what = f"run/{run}", f"run '{run}'"
    if rank == 0 or locks is None:
        return shared_lock(locks, key, what, log, owner=owner)
    from src.training.lock import LeaseLock

    LeaseLock(locks, key, what, owner=owner or _call_id(), log=log).check_free()
    return contextlib.nullcontext()


class _Held:
    def __init__(self, lock, wait_s: float):
        self.lock, self.wait_s = lock, wait_s

    def __enter__(self):
        return self.lock.acquire(wait_s=self.wait_s)

    def __exit__(self, *exc):
        self.lock.release()


# ----------------------------------------------------------------------------- data (CPU only)


def dataset_ready(cfg, root: Path) -> bool:
    from src.data import prepare as prep

    try:
        return (prep.dataset_dir(cfg.data, root) / "manifest.json").is_file()
    except Exception:
        return False


def _map(fn, *arg_lists) -> list:
    """fn over the argument lists: one Modal container per item in the cloud, a loop in-process."""
    if modal.is_local():
        return [fn.local(*args) for args in zip(*arg_lists, strict=True)]
    return list(fn.map(*arg_lists))


def prepare_body(config_path: str = DEFAULT_CONFIG, set: str = "", config_yaml: str = "",
                 log=print, locks=None) -> dict:
    """Tokenize (or find) the dataset of a config under <data root>/datasets/.

    Two containers preparing the same dataset at once take turns (a cross-container lock): the
    second waits, then finds the first one's shards.
    """
    from src.data import prepare as prep

    raw, cfg = resolve(config_path, overrides=split_set(set), config_yaml=config_yaml)
    root = data_root()
    locks = lock_store() if locks is None else locks
    name = prep.dataset_dir(cfg.data, root).name
    with shared_lock(locks, f"data/{name}", f"dataset {name}", log, wait_s=DATA_LOCK_WAIT_S):
        reload_volume(log)  # what a container that held the lock before us committed
        return _prepare_locked(raw, cfg, root, log)


def _prepare_locked(raw, cfg, root: Path, log=print) -> dict:
    from src.data import prepare as prep

    parts = prep.plan(cfg, root) if hasattr(prep, "plan") else []
    if parts:  # partitioned preparation: each part in its own CPU container
        commit_volume(log)
        log(f"tokenizing {len(parts)} parts in parallel containers")
        results = _map(prepare_part, [yaml.safe_dump(raw)] * len(parts), parts)
        reload_volume(log)
        ds = prep.finalize(cfg, root, results)
    else:
        ds = prep.prepare(cfg, root, log=log)
    commit_volume(log)
    m = ds.manifest
    out = {"dir": str(ds.dir), "train_tokens": m["train"]["tokens"], "val_tokens": m["val"]["tokens"]}
    log(f"dataset {ds.dir}: {out['train_tokens']:,} train + {out['val_tokens']:,} val tokens")
    return out


def ensure_data(raw: dict, cfg, root: Path, log=print) -> None:
    """Tokenize on CPU containers if needed, so the GPU container never does."""
    if dataset_ready(cfg, root):
        return
    if modal.is_local():
        prepare_data.local(config_yaml=yaml.safe_dump(raw))
        return
    log("the dataset is not prepared yet: tokenizing it on CPU containers while the GPU waits "
        "(run `modal run modal_app.py::prepare_data --config-path <config>` first to save that)")
    prepare_data.remote(config_yaml=yaml.safe_dump(raw))
    reload_volume(log)


def fix_nested_upload(raw: dict, cfg, root: Path, log=print) -> None:
    """Files put on the volume at '/data/...' (the seed guide's paths) land in /data/data/...

    `modal volume put/get` take paths from the volume's root, and the volume is mounted at /data,
    so `modal volume put slm-data ./x /data/datasets` ends up at /data/data/datasets in here.
    Use such files where they are (with a note) instead of failing.
    """
    nested = root / "data"
    if not nested.is_dir():
        return
    src = Path(cfg.data.source)
    if src.is_absolute() and src.is_relative_to(root) and not src.exists():
        alt = nested / src.relative_to(root)
        if alt.exists():
            log(f"note: {src} is not on the volume but {alt} is (uploaded to '/data/...'); using "
                f"it. Upload to the volume's root next time: modal volume put {VOLUME_NAME} "
                f"<local> {src.relative_to(root).as_posix()}")
            cfg.data.source = raw.setdefault("data", {})["source"] = str(alt)
    from src.paths import RunLayout

    run, alt = RunLayout(root, cfg.name).run_dir, RunLayout(nested, cfg.name).run_dir
    if not run.exists() and alt.is_dir():
        log(f"note: checkpoints of '{cfg.name}' were uploaded to {alt}; copying them to {run} "
            "to resume from them")
        shutil.copytree(alt, run)


# ----------------------------------------------------------------------------- training


def volume_path(path: Path, root: Path) -> str:
    """A path as `modal volume get/put/ls` want it: from the volume's root, no /data prefix."""
    return Path(path).relative_to(root).as_posix()


def summary(cfg, root: Path, res=None) -> dict:
    """What a finished run reports: its figures, where its model is and how to download it."""
    import torch

    from src.paths import RunLayout

    model = RunLayout(root, cfg.name).model_final
    rel = volume_path(model, root)
    out = {"name": cfg.name, "model": str(model), "volume_path": rel,
           "download": f"modal volume get {VOLUME_NAME} {rel} ."}
    if res is not None:
        out |= {"step": res.step, "tokens": res.tokens, "val_loss": res.val_loss,
                "val_bpb": res.val_bpb}
    if out.get("val_loss") is None and model.is_file():
        try:
            meta = torch.load(model, map_location="cpu", weights_only=True, mmap=True)
            out |= {k: meta.get(k) for k in ("step", "tokens", "val_loss", "val_bpb")}
        except Exception as e:
            out["note"] = f"could not read {model}: {e}"

    return out


def write_result(root, name: str, out: dict | None, log=print) -> None:
    """checkpoints/<name>/result.json: how the run ended (None: remove it, a new attempt
    started), committed at once so `slm status` and a sweep's table see it from anywhere."""
    from src.paths import RunLayout, write_json

    path = RunLayout(root, name).result
    if out is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {k: v for k, v in out.items()
                      if isinstance(v, (str, int, float, bool, type(None)))})
    commit_volume(log)


def report(out: dict, log=print) -> None:
    if out.get("error"):
        log(f"error: {out['error']}")
        return
    loss = out.get("val_loss")
    log(f"finished {out['name']}: step {out.get('step')}"
        + (f", val loss {loss:.4f}" if isinstance(loss, float) else ""))
    log(f"model:      {out['model']} on the volume {VOLUME_NAME}")
    log(f"download:   {out['download']}")
    from src.paths import RunLayout

    run_dir = volume_path(RunLayout(MOUNT, out["name"]).run_dir, Path(MOUNT))
    log(f"checkpoints: modal volume get {VOLUME_NAME} {run_dir} .")
    log(f"then:       slm sample {Path(out['volume_path']).name} --prompt \"...\"")


def torchrun_command(config_file, gpus: int, root, wandb: bool = True, nodes: int = 1,
                     node_rank: int = 0, master_addr: str = "") -> list[str]:
    """The command that trains on all `gpus` GPUs of a container (and `nodes` containers)."""
    cmd = ["torchrun", f"--nproc_per_node={gpus}"]
    if nodes > 1:
        cmd += [f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={MASTER_PORT}"]
    else:
        cmd.append("--standalone")
    cmd += ["-m", "src", "train", "--config", str(config_file), "--data-root", str(root),
            "--samples", "0"]
    return cmd + ([] if wandb else ["--no-wandb"])


def _newest(run_dir: Path) -> float:
    """The newest checkpoint file of the run, FSDP's optimizer shards (<step>.optim/) included."""
    files = [*run_dir.glob("*.pt"), *run_dir.glob("*.optim/*")] if run_dir.is_dir() else []
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def first_error(path: Path) -> str:
    """The first error line the workers recorded (empty when none did)."""
    try:
        return next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    except OSError:
        return ""


def _run_torchrun(raw, cfg, root, gpus, wandb, rate, seconds, log, nodes=1, node_rank=0,
                  master_addr="") -> dict:
    cfg_file = Path(tempfile.mkdtemp()) / f"{cfg.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = torchrun_command(cfg_file, gpus, root, wandb, nodes, node_rank, master_addr)
    log("launching: " + shlex.join(cmd))
    # the workers' cost figure, and time for them to checkpoint when stopped (torchrun's 30 s
    # default is short for a large model)
    errors = cfg_file.parent / "errors.txt"  # workers write errors a retry would repeat here
    env = {**os.environ, "SLM_COST_PER_HOUR": str(rate), "SLM_ERROR_FILE": str(errors),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(0.8 * STOP_MARGIN_S))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    from src.paths import RunLayout

    run_dir, seen = RunLayout(root, cfg.name).run_dir, 0.0
    with Deadline(seconds, pid=proc.pid) as deadline:
        while proc.poll() is None:
            try:
                proc.wait(timeout=COMMIT_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if (newest := _newest(run_dir)) > seen:  # every node: FSDP shards are written
                commit_volume(log)  # on every node; the workers cannot commit, this process can
                seen = newest
    commit_volume(log)
    if proc.returncode != 0 and not deadline.fired and (err := first_error(errors)):
        return {"name": cfg.name, "error": err}  # returned, not raised: Modal does not retry it
    if proc.returncode != 0:
        why = "the attempt's time limit" if deadline.fired else f"exit status {proc.returncode}"
        raise RuntimeError(f"torchrun stopped ({why}); Modal retries the attempt and it continues "
                           "from the newest checkpoint")
    return summary(cfg, root)


def training_body(config_path: str = DEFAULT_CONFIG, gpu: str = "", set: str = "", name: str = "",
                  wandb: bool = True, config_yaml: str = "", log=print,
                  started: float | None = None, locks=None) -> dict:
    """One attempt at a run: resume from its newest checkpoint, train, report.

    Errors the user must fix come back as {'error': ...} (a retry would fail the same way);
    preemption, the attempt's time limit and crashes raise, and Modal retries the attempt.
    `started`: when the call began (Modal's timeout counts from then); `locks`: the store of
    cross-container locks (on Modal: the `slm-locks` Dict; None: the trainer's flock only).
    """
    import torch

    from src.errors import Interrupted, SLMError
    from src.hardware import parse_gpu
    from src.tools.cost import modal_cost_per_hour
    from src.training.trainer import train
    from src.training.wandb_sink import check_online_ready

    started = time.monotonic() if started is None else started
    locks = lock_store() if locks is None else locks
    root = data_root()
    label = name or Path(config_path).stem
    deadline = held = None  # held: the run's name once this attempt holds its lock
    try:
        raw, cfg = resolve(config_path, gpu, split_set(set), name, config_yaml)
        label = cfg.name
        if cfg.modal.nodes > 1:
            raise SLMError("modal.nodes > 1 runs several containers: launch it with "
                           "`modal run modal_app.py --config <config>`")
        if wandb and cfg.wandb.mode != "disabled":
            check_online_ready(cfg)
        with shared_lock(locks, f"run/{cfg.name}", f"run '{cfg.name}'", log):
            held = cfg.name
            write_result(root, held, None)  # this attempt is the run's news now
            fix_nested_upload(raw, cfg, root, log)
            ensure_data(raw, cfg, root, log)
            _, gpus = parse_gpu(cfg.modal.gpu)
            rate = modal_cost_per_hour(cfg.modal)
            seconds = attempt_seconds(cfg.modal.timeout, started)
            log(f"run {cfg.name} on {cfg.modal.gpu} (${rate:.2f}/hour); this attempt stops with a "
                f"checkpoint after {seconds / 3600:.1f} h and the next one continues")
            if gpus > 1:
                out = _run_torchrun(raw, cfg, root, gpus, wandb, rate, seconds, log)
            else:
                with Deadline(seconds) as deadline:
                    res = train(cfg, data_root=root, use_wandb=wandb, log=log,
                                on_checkpoint=lambda p: commit_volume(log), cost_per_hour=rate)
                out = summary(cfg, root, res)
    except Interrupted as e:
        commit_volume(log)
        why = "attempt time limit reached" if deadline and deadline.fired else "stopped"
        raise RuntimeError(f"{why}: {e}; Modal retries the attempt and it continues") from None
    except SLMError as e:
        out = {"name": label, "error": str(e)}
    except torch.OutOfMemoryError:
        out = {"name": label, "error": "out of GPU memory: lower training.batch_size (and raise "
                                       "training.gradient_accumulation_steps), or pick a larger GPU"}
    if held:  # (a run refused because another container trains it keeps that one's result)
        write_result(root, held, out, log)
    report(out, log)
    return out


def smoke_body(config_yaml: str, wandb: bool = True, log=print) -> dict:
    """`modal run modal_app.py --smoke`: the rehearsal (docs/smoke.md) on this container's GPU,
    in the real image with the real volume and secret: measured GPU memory, MFU and cost."""
    from src.errors import SLMError
    from src.tools.smoke import run_smoke

    try:
        _, cfg = resolve(config_yaml=config_yaml)
        run_smoke(cfg, data_root(), "cuda", wandb and cfg.wandb.mode != "disabled", log)
        return {"name": cfg.name}
    except SLMError as e:
        return {"name": "smoke", "error": str(e)}
    finally:
        commit_volume(log)


def cluster_body(config_yaml: str, wandb: bool = True, log=print,
                 started: float | None = None, locks=None) -> dict | None:
    """One container of a multi-node run: torchrun across all containers' GPUs (rank 0 reports)."""
    from src.errors import SLMError
    from src.hardware import parse_gpu
    from src.tools.cost import modal_cost_per_hour

    started = time.monotonic() if started is None else started
    cluster = modal.Cluster.from_context()
    rank = cluster.container_rank()
    ips = cluster.container_ips(family="ipv4") or cluster.container_ips()
    raw, cfg = resolve(config_yaml=config_yaml)
    root = data_root()
    locks = lock_store() if locks is None else locks
    try:
        with cluster_lock(locks, cfg.name, rank, log):
            if rank == 0:
                ensure_data(raw, cfg, root, log)
            while not dataset_ready(cfg, root):  # the other containers wait for rank 0's data
                time.sleep(COMMIT_POLL_S)
                reload_volume(log)
                cluster_lock(locks, cfg.name, rank, log)  # rank 0 refused: stop waiting
            _, gpus = parse_gpu(cfg.modal.gpu)
            rate = modal_cost_per_hour(cfg.modal)
            seconds = attempt_seconds(cfg.modal.timeout, started)
            out = _run_torchrun(raw, cfg, root, gpus, wandb, rate, seconds, log, cfg.modal.nodes,
                                rank, ips[0])
    except SLMError as e:
        out = {"name": cfg.name, "error": str(e)}
    if rank == 0:
        report(out, log)
        return out
    return None


# ----------------------------------------------------------------------------- sweeps


def sweep_body(config: str = DEFAULT_CONFIG, grid: str = "", gpu: str = "", set: str = "",
               group: str = "", wandb: bool = True, log=print) -> str:
    """Train every point of the grid in its own container at once; a table of their results."""
    from src.errors import SLMError
    from src.tools import sweep as sw
    from src.tools.cost import estimate

    base_raw, base = resolve(config, gpu, split_set(set))
    points = sw.expand(base.name, sw.parse_grid(grid))
    group = sw.check_group(group or base.wandb.group
                           or f"{base.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    jobs, problems, total = [], [], 0.0
    for p in points:
        try:
            raw, cfg = resolve(config, gpu, [*split_set(set), *p.overrides, f"wandb.group={group}"],
                               name=p.name)
            cost = estimate(cfg).cost_usd
        except SLMError as e:
            problems.append(f"{p.name}: {e}")
            continue
        if cfg.modal.nodes > 1:
            problems.append(f"{p.name}: sweep points run in one container each (modal.nodes: 1)")
        total += cost
        log(f"  {p.name:<40} {cfg.modal.gpu:<10} ~${cost:,.2f}")
        jobs.append((p, raw, cfg))
    if problems:
        raise SLMError("sweep: " + "\n  ".join(problems))
    log(f"sweep {group}: {len(jobs)} runs, about ${total:,.2f} in all (W&B group {group})")
    datasets = {json.dumps(cfg.data.model_dump(), sort_keys=True): (raw, cfg) for _, raw, cfg in jobs}
    for raw, cfg in datasets.values():  # tokenize each distinct dataset once, before any GPU
        ensure_data(raw, cfg, data_root(), log)

    sw.write_record(data_root(), group, base.name, points)
    commit_volume(log)
    log(f"each point writes its result to the volume as it ends; see the table any time with: "
        f"slm status --sweep {group} --modal")
    texts = [yaml.safe_dump(raw, sort_keys=False) for _, raw, _ in jobs]
    if modal.is_local():
        calls = [lambda t=t: train.local(config_yaml=t, wandb=wandb) for t in texts]
    else:
        spawned = [train.with_options(**launch_options(cfg.modal, wants_wandb_secret(cfg, wandb)))
                   .spawn(config_yaml=t, wandb=wandb)
                   for t, (_, _, cfg) in zip(texts, jobs, strict=True)]
        calls = [c.get for c in spawned]
    for (p, _, _), get in zip(jobs, calls, strict=True):  # one point's failure stops no other
        try:
            get()
        except Exception as e:  # a point that failed all its attempts: its result says why
            write_result(data_root(), p.name, {"name": p.name,
                                               "error": failure_message(e, base.modal)}, log)
    from src.tools.status import LocalTree, sweep_rows

    reload_volume(log)
    rows = sweep_rows(LocalTree(data_root()), group)
    table = sw.format_table(rows)
    log(f"\nsweep {group}: final validation loss\n{table}")
    best = next((r for r in sorted(rows, key=lambda r: r.get("val_loss") or float("inf"))
                 if r.get("val_loss") is not None), None)
    if best:
        log(f"best: {best['name']}; download it with: modal volume get {VOLUME_NAME} "
            f"models/{best['name']}_final.pt .")
    return table


# ----------------------------------------------------------------------------- Modal functions

_volumes = {MOUNT: volume}


@app.function(image=image, volumes=_volumes, single_use_containers=True,
              **launch_options(STATIC, wandb=STATIC_WANDB))
def train(config_path: str = DEFAULT_CONFIG, gpu: str = "", set: str = "", name: str = "",
          wandb: bool = True, config_yaml: str = "") -> dict:
    """Train a config on this container's GPUs; retried attempts resume from the newest checkpoint."""
    started = time.monotonic()  # Modal's timeout counts from here (each attempt anew)
    return training_body(config_path, gpu, set, name, wandb, config_yaml, started=started)


@app.function(image=image, volumes=_volumes, **launch_options(STATIC, wandb=STATIC_WANDB))
def smoke_run(config_yaml: str, wandb: bool = True) -> dict:
    """A few steps of a config on its GPU, then the forecast (`modal run modal_app.py --smoke`)."""
    return smoke_body(config_yaml, wandb)


@app.function(image=image, volumes=_volumes, cpu=8.0, memory=32768, timeout=86400,
              retries=modal.Retries(max_retries=3, initial_delay=1.0))
def prepare_data(config_path: str = DEFAULT_CONFIG, set: str = "", config_yaml: str = "") -> dict:
    """Tokenize a config's data into shards on /data/datasets (CPU only; runs reuse them)."""
    return prepare_body(config_path, set, config_yaml)


@app.function(image=image, volumes=_volumes, cpu=4.0, memory=16384, timeout=86400,
              retries=modal.Retries(max_retries=3, initial_delay=1.0))
def prepare_part(config_yaml: str, part: dict) -> dict:
    """One part of a partitioned preparation (called by prepare_data through .map)."""
    from src.data import prepare as prep

    _, cfg = resolve(config_yaml=config_yaml)
    out = prep.prepare_part(cfg, data_root(), part)
    commit_volume()
    return out


@app.function(image=image, volumes=_volumes, cpu=1.0, timeout=86400, nonpreemptible=True)
def sweep(config: str = DEFAULT_CONFIG, grid: str = "", gpu: str = "", set: str = "",
          group: str = "", wandb: bool = True) -> str:
    """Train each point of --grid (e.g. "training.learning_rate=1e-4,3e-4") in parallel."""
    return sweep_body(config, grid, gpu, set, group, wandb)


train_cluster = None
if STATIC.nodes > 1:  # multi-node (Modal beta): only defined when the config asks for it

    @app.function(image=image, volumes=_volumes,
                  env={"SLM_CLUSTER_NODES": str(STATIC.nodes)}, single_use_containers=True,
                  **launch_options(STATIC))
    @modal.clustered(size=STATIC.nodes, rdma=True)  # RDMA: fast collectives between the nodes
    def train_cluster(config_yaml: str, wandb: bool = True) -> dict | None:
        started = time.monotonic()
        return cluster_body(config_yaml, wandb, started=started)


def run_links(the_app, call_id: str) -> list[str]:
    """Where to find a started run: the app id, its log command and dashboard page."""
    lines = [f"started {call_id}. Under `modal run --detach` it keeps going if this terminal closes"]
    app_id = the_app.app_id
    if app_id:
        lines += [f"app:        {app_id}",
                  f"follow:     modal app logs {app_id} -f",
                  f"dashboard:  {the_app.get_dashboard_url()}"]
    return lines


def missing_object_message(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if WANDB_SECRET in text.lower() or "secret" in text.lower():
        return (f"{text}: create the W&B secret with `modal secret create {WANDB_SECRET} "
                "WANDB_API_KEY=...`, or run with --no-wandb")
    return text


def failure_message(e: BaseException, m) -> str:
    """One line for a run whose every attempt failed (what `call.get()` raised)."""
    if isinstance(e, modal.exception.FunctionTimeoutError):
        return (f"every attempt reached modal.timeout ({m.timeout} s), {m.retries + 1} attempts in "
                "all; run the same command again to continue from the newest checkpoint")
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, modal.exception.NotFoundError):
        return missing_object_message(e)
    if isinstance(e, modal.exception.Error):
        return (f"{type(e).__name__}: {first} (the GPU may be unavailable: try another --gpu, or "
                "run again later; it continues from the newest checkpoint)")
    return (f"all {m.retries + 1} attempts failed; the last: {type(e).__name__}: {first}; run "
            "the same command again to continue from the newest checkpoint")


def wait_for(call, m) -> dict:
    """The run's result, or {'error': one line} when every attempt failed."""
    try:
        return call.get()
    except Exception as e:
        return {"error": failure_message(e, m)}


@app.local_entrypoint()
def main(config: str = DEFAULT_CONFIG, gpu: str = "", set: str = "", name: str = "",
         wandb: bool = True, smoke: bool = False):
    """Train a config on Modal: modal run modal_app.py --config configs/gpt_350m.yaml --gpu H100."""
    from src.errors import SLMError
    from src.tools.cost import estimate_text

    try:
        raw, cfg = resolve(config, gpu, split_set(set), name)
        cost_text = estimate_text(cfg)  # model.init_from: its source's shape, or its error
    except SLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = cfg.modal
    fn = train
    if m.nodes > 1:
        fn = train_cluster
        if fn is None or STATIC.nodes != m.nodes:
            print("error: modal.nodes must be set in the config or with --set on this command "
                  "line (the cluster size is fixed when the app starts)", file=sys.stderr)
            sys.exit(2)
    print(f"run {cfg.name} from {config}: {m.gpu}" + (f" x {m.nodes} nodes" if m.nodes > 1 else "")
          + f", {m.timeout} s per attempt, up to {m.retries} retries")
    print(cost_text)
    text = yaml.safe_dump(raw, sort_keys=False)
    opts = launch_options(m, wants_wandb_secret(cfg, wandb))
    if smoke:  # a rehearsal on the configured GPU, never a training run (docs/smoke.md)
        out = smoke_run.with_options(**opts).remote(config_yaml=text, wandb=wandb)
        sys.exit(f"error: {out['error']}" if out.get("error") else 0)
    try:
        call = fn.with_options(**opts).spawn(config_yaml=text, wandb=wandb)
    except modal.exception.NotFoundError as e:
        print(f"error: {missing_object_message(e)}", file=sys.stderr)
        sys.exit(2)
    for line in run_links(app, call.object_id):
        print(line)
    out = wait_for(call, m)
    report(out)
    if out.get("error"):
        sys.exit(1)


# ----------------------------------------------------------------------------- serving (slm serve)
# `modal deploy modal_app.py` also deploys `serve`: the OpenAI-compatible API and chat page of
# `slm serve` (docs/serve.md), for a model on the volume, on a GPU, scaled to zero when idle.
#   modal secret create slm-api SLM_API_KEY=<a long random key>    # once: the key clients send
#   SLM_SERVE_RUN=my-run SLM_SERVE_GPU=L4 modal deploy modal_app.py
# SLM_SERVE_RUN picks the run (models/<run>_final.pt, else its newest checkpoint); unset, the
# newest models/*_final.pt. SLM_SERVE_GPU (default T4; "cpu" for none) and
# SLM_SERVE_MAX_CONTAINERS (default 1) are read at deploy time.
SERVE_SECRET = "slm-api"  # a Modal secret that provides SLM_API_KEY
SERVE_GPU = os.environ.get("SLM_SERVE_GPU", "T4")
SERVE_RUN = os.environ.get("SLM_SERVE_RUN", "")
SERVE_OPTIONS = {
    "gpu": None if SERVE_GPU.lower() in ("", "cpu", "none") else SERVE_GPU,
    "timeout": 3600,  # per request: long streams are fine
    "scaledown_window": 300,  # an idle container stops after 5 minutes
    "min_containers": 0,  # scale to zero: nothing runs (or costs) while nobody calls
    # one container batches all requests through its model; more add throughput (and cost)
    "max_containers": int(os.environ.get("SLM_SERVE_MAX_CONTAINERS", "1")),
}
SERVE_CONCURRENCY = 64  # requests one container takes at once (its engine batches them)
serve_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*PACKAGES, "starlette==1.10.0")
    .env({"PYTHONUNBUFFERED": "1"})
    .add_local_dir(ROOT / "src", remote_path="/root/src", ignore=["**/__pycache__"])
    .add_local_dir(ROOT / "configs", remote_path="/root/configs")
)


@app.function(image=serve_image, volumes={MOUNT: volume},
              env={"SLM_SERVE_RUN": SERVE_RUN} if SERVE_RUN else None,
              secrets=[modal.Secret.from_name(SERVE_SECRET)], **SERVE_OPTIONS)
@modal.concurrent(max_inputs=SERVE_CONCURRENCY)
@modal.asgi_app()
def serve():
    """The OpenAI-compatible server for a model on the volume (requires the slm-api key)."""
    from src.tools.serve import app_from_volume

    return app_from_volume(data_root(), os.environ.get("SLM_SERVE_RUN") or None,
                           os.environ.get("SLM_API_KEY"), max_batch=32)
