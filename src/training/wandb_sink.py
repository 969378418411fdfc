"""Weights & Biases sink: the rows of metrics.jsonl, samples as a table, models as artifacts.

Modes (wandb.mode, or $WANDB_MODE which wins when set): online, offline, disabled. Every mode
keeps W&B's run folder inside the run's own folder (<run>/wandb/), so an offline run (or an
online one whose upload did not finish) can be uploaded later with the printed `wandb sync`
command, which runs inside <run>/wandb.

What can go wrong, and what happens:
- online, no API key: `check_online_ready` refuses before training, with the fix (local lookups
  only: it never touches the network, so it cannot hang);
- online, W&B unreachable when the run starts: a warning, and the run logs offline instead;
- any W&B error during the run: a warning, W&B is switched off (metrics.Metrics drops the sink);
  training, checkpoints and metrics.jsonl carry on.

Resume: the run id is written to <run>/wandb_run_id before W&B starts (so a run killed before
its first checkpoint keeps it) and saved in every checkpoint; a re-run calls init with the same id
and resume="allow", so W&B shows one run whose steps keep increasing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

from src import checkpoint as ckpt
from src.errors import SLMError
from src.paths import RunLayout
from src.training.metrics import read_metrics

MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}
DEFAULT_BASE_URL = "https://api.wandb.ai"
INIT_TIMEOUT_S = 30  # W&B's default is 90 s
FINISH_TIMEOUT_S = 600  # never block a (paid) container for ever on a slow final upload
PROBE_TIMEOUT_S = 5
RUN_ID_FILE = "wandb_run_id"  # in the run folder, next to config.yaml


def new_run_id() -> str:
    return secrets.token_hex(4)


def stored_run_id(layout: RunLayout) -> str | None:
    """The W&B run id an earlier attempt of this run wrote, if any."""
    try:
        text = (layout.run_dir / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[a-z0-9]{1,64}", text) else None


def store_run_id(layout: RunLayout, run_id: str) -> None:
    """Write the run id atomically (a kill leaves the old file or the new one, never half)."""
    path = layout.run_dir / RUN_ID_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def init_timeout() -> float:
    """Seconds W&B may take to start a run: $WANDB_INIT_TIMEOUT, else 30 (W&B's default: 90)."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
    except ValueError:
        return INIT_TIMEOUT_S


def resolve_mode(cfg) -> str:
    """wandb.mode from the config, unless $WANDB_MODE is set (it wins)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return cfg.wandb.mode
    mode = _MODE_ALIASES.get(env, env)
    if mode not in MODES:
        raise SLMError(
            f"$WANDB_MODE is {env!r}, which is not a W&B mode; set it to online, offline or "
            "disabled, or unset it to use wandb.mode from the config"
        )
    return mode


def _settings():
    """wandb's global settings (env + settings files), or None; reads files only."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings
    except Exception:
        return None


def base_url() -> str:
    s = _settings()
    return os.environ.get("WANDB_BASE_URL") or getattr(s, "base_url", None) or DEFAULT_BASE_URL


def find_credentials() -> tuple[str | None, str] | None:
    """(API key, where it came from), (None, where) for an identity token file, or None.

    Looks where wandb itself looks ($WANDB_API_KEY, an identity token file, the netrc file,
    the settings files), reading local files only.
    """
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if key:
        return key, "$WANDB_API_KEY"
    token = os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip()
    if token and Path(token).is_file():
        return None, f"$WANDB_IDENTITY_TOKEN_FILE ({token})"
    try:
        from wandb.sdk.lib import wbauth

        key = wbauth.read_netrc_auth(host=base_url())
    except ImportError:
        key = None
    except Exception as e:  # wandb.errors.AuthenticationError: a key in a bad format
        raise SLMError(
            f"the W&B API key in your netrc file is not valid ({e}); run `wandb login --relogin`"
        ) from None
    if key:
        return key, "the netrc file (wandb login)"
    key = getattr(_settings(), "api_key", None)
    if key:
        return key, "the W&B settings file"
    return None


def check_online_ready(cfg) -> None:
    """Fail fast, before any training, when online logging cannot work (no network used)."""
    if resolve_mode(cfg) != "online":
        return
    found = find_credentials()
    if found is None:
        raise SLMError(
            "W&B logging is online but no API key was found: run `wandb login` (or set "
            "WANDB_API_KEY; on Modal, `modal secret create wandb WANDB_API_KEY=...`), or log "
            "offline with --wandb.mode offline, or turn it off with --no-wandb"
        )
    key, source = found
    problem = None
    if key is not None:
        try:
            from wandb.sdk.lib.wbauth import check_api_key

            problem = check_api_key(key)
        except ImportError:
            pass
    if problem:
        raise SLMError(
            f"the W&B API key from {source} is not valid: {problem} Copy the key from "
            "https://wandb.ai/authorize into WANDB_API_KEY (on Modal, the `wandb` secret) or run "
            "`wandb login --relogin`; or log offline with --wandb.mode offline"
        )


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the W&B server opens within `timeout`, else why not."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let wandb try
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return f"bad W&B server address {url!r}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def open_wandb(cfg, layout: RunLayout, run_id: str | None, resumed: bool, extra: dict | None = None,
               log=print):
    """The W&B sink for this run, or None when W&B is disabled or could not start at all.

    A missing key is the user's to fix and raises SLMError; W&B's own failures only warn.
    """
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    if mode == "online":
        check_online_ready(cfg)
    try:
        return WandbSink(cfg, layout, run_id, resumed, extra=extra, log=log, mode=mode)
    except SLMError:
        raise
    except Exception as e:
        log(f"warning: W&B could not start ({type(e).__name__}: {e}); training continues "
            "without it, metrics.jsonl is still written")
        return None


class WandbSink:
    """One W&B run per training run (across resumes). Only rank 0 makes one."""

    name = "W&B"

    def __init__(self, cfg, layout: RunLayout, run_id: str | None, resumed: bool,
                 extra: dict | None = None, log=print, mode: str | None = None):
        import wandb

        self.wandb, self._log, self.cfg = wandb, log, cfg
        self.layout, self.run_dir = layout, layout.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode or resolve_mode(cfg)
        stored = stored_run_id(layout)
        self.run_id = run_id or stored or new_run_id()
        store_run_id(layout, self.run_id)
        continued = resumed or stored == self.run_id  # W&B may already have steps of this run
        self._signal: int | None = None
        self._step = 0
        self._last_val: dict | None = None
        self._old_samples: list[list] = []
        self._table = None
        self._dropped = 0  # rows W&B already had (see _floor)
        self._best = None
        if resumed:
            self._old_samples = _previous_samples(layout.metrics)
            self._best = _read_json(self.layout.best_record)

        config = cfg.to_dict()
        if extra:
            config["run"] = extra
        if self.mode == "online":
            why = probe(base_url())
            if why:
                log(f"warning: cannot reach the W&B server ({why}); logging offline instead "
                    "(upload later with the `wandb sync` command printed at the end)")
                self.mode = "offline"
        try:
            self.run = self._init(config)
        except Exception as e:
            if self.mode != "online":
                raise
            log(f"warning: W&B did not start online ({type(e).__name__}: {e}); logging offline "
                "instead (upload later with the `wandb sync` command printed at the end)")
            # The timed-out start still holds this run id inside W&B's service process: stop
            # that service, so that a fresh one starts the same id offline.
            with contextlib.suppress(Exception):
                self.wandb.teardown()
            self.mode = "offline"
            self.run = self._init(config)
        # Rows below the first step W&B expects would be dropped by W&B (steps must increase):
        # a resumed online run after a hard kill already has the steps past its last checkpoint.
        self._floor = int(getattr(self.run, "starting_step", 0) or 0) if continued else 0
        with contextlib.suppress(Exception):  # only a nicety of the run's summary
            self.run.summary["status"] = "running"
            self.run.define_metric("train/loss", summary="last")
            for key in ("val/loss", "val/bpb"):
                self.run.define_metric(key, summary="min")
        if self.mode == "online" and self.run.url:
            log(f"W&B run: {self.run.url}")
        else:
            log(f"W&B run {self.run_id} logging {self.mode} to {self.folder}")

    def _init(self, config: dict):
        w = self.wandb
        return w.init(
            project=self.cfg.wandb.project,
            entity=self.cfg.wandb.entity,
            name=self.cfg.name,
            group=self.cfg.wandb.group,
            tags=self.cfg.wandb.tags or None,
            job_type="train",
            config=config,
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=self.mode,
            # quiet, not silent: W&B's own warnings and errors (network, quota, auth, dropped
            # rows) still print, one line each; its banners and links do not.
            settings=w.Settings(init_timeout=init_timeout(), finish_timeout=FINISH_TIMEOUT_S,
                                quiet=True, show_info=False),
        )

    @property
    def folder(self) -> Path:
        """W&B's own run folder (<run>/wandb/offline-run-... or run-...)."""
        return Path(self.run.dir).parent

    # ------------------------------------------------------------------ sink calls

    def log(self, row: dict) -> None:
        step = self._step = int(row["step"])
        if "val/loss" in row:
            self._last_val = {k: v for k, v in row.items() if k != "samples"}
        if step < self._floor:
            if not self._dropped:
                self._log(f"note: W&B already has steps up to {self._floor - 1} from the "
                          "interrupted attempt; rows up to there are not sent again "
                          "(metrics.jsonl has them)")
            self._dropped += 1
            return
        data = {k: v for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if row.get("samples"):
            data["samples"] = self._samples_table([[step, s["prompt"], s["text"]]
                                                   for s in row["samples"]])
        if data:
            self.run.log(data, step=step)

    def on_config(self, values: dict, step: int) -> None:
        """Facts learnt while training (e.g. compiled: false) go into the run's W&B config."""
        self.run.config.update(values, allow_val_change=True)

    def on_checkpoint(self, path: Path, step: int) -> None:
        """Keep the best checkpoint so far (by validation loss at that very step) as best.pt."""
        v = self._last_val
        if not self.cfg.wandb.log_model or not v or v.get("step") != step:
            return
        if self._best is not None and not v["val/loss"] < self._best["val/loss"]:
            return
        best = self.layout.best
        try:  # a hard link: no copy, and it outlives the pruning of step_N.pt
            tmp = best.with_name(f".{best.name}.tmp")
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, best)
            src = best
        except OSError:  # no hard links here: upload the step file at the end if it is still there
            src = Path(path)
        self._best = {"step": step, "tokens": v.get("tokens"), "val/loss": v["val/loss"],
                      "val/bpb": v.get("val/bpb"), "path": str(src)}
        (self.layout.best_record).write_text(json.dumps(self._best, indent=1) + "\n")

    def on_final(self, final_path: Path, model_path: Path, last_val: dict) -> None:
        for k, v in final_summary(self.layout.metrics).items():
            self.run.summary[k] = v
        if not self.cfg.wandb.log_model:
            return
        best = self._best
        final_is_best = best is None or (last_val.get("val/loss") is not None
                                         and last_val["val/loss"] <= best["val/loss"])
        if not final_is_best:  # first, so that W&B's automatic "latest" goes to the final model
            best_model = self._best_model(Path(best["path"]))
            if best_model is not None:
                self._artifact(best_model, ["best", f"step-{best['step']}"],
                               {"kind": "best", **{k: v for k, v in best.items() if k != "path"}})
        aliases = ["latest", "final"] + (["best"] if final_is_best else [])
        self._artifact(model_path, aliases, {"kind": "final", **last_val})
        self.layout.best.unlink(missing_ok=True)  # the link is no longer needed

    def on_interrupt(self, signum: int, step: int | None = None) -> None:
        """SIGTERM/SIGINT: tell W&B this run is being preempted (it will resume).

        The run then finishes with exit code 0, so W&B shows it stopped, not failed (a non-zero
        exit code reads as a failure); its summary says why and how to continue.
        """
        self._signal = signum
        self.run.mark_preempting()
        name = signal.Signals(signum).name if signum else "a signal"
        self.run.summary["status"] = (f"stopped by {name} at step {step or self._step} with a "
                                      "checkpoint; re-run to resume")

    def close(self) -> None:
        run, self.run = getattr(self, "run", None), None
        if run is None:
            return
        folder = Path(run.dir).parent
        try:
            run.finish(exit_code=0 if self._signal else None)
        except Exception:
            # W&B's service is gone: drop its connection now (a later run in this process gets
            # a fresh one, and no exit hook prints a traceback for it), then report as usual.
            with contextlib.suppress(Exception):
                self.wandb.teardown()
            raise
        if self.mode == "offline" or getattr(run, "_finish_timed_out", False):
            self._log(f"W&B run saved offline in {folder}; upload it (with any earlier attempts "
                      f"of this run) with:\n  {sync_command(folder.parent)}")

    # ------------------------------------------------------------------ internals

    def _samples_table(self, rows: list[list]):
        """One incremental table: each log sends only the new rows, W&B shows them all.

        A resumed attempt whose W&B run does not know the table yet (offline, or a run W&B never
        got) starts with the earlier attempts' samples, so the table still holds the whole story.
        """
        if self._table is None:
            self._table = self.wandb.Table(columns=["step", "prompt", "text"],
                                           log_mode="INCREMENTAL")
            if not _has_table(self.run, "samples"):
                rows = self._old_samples + rows
        for r in rows:
            self._table.add_data(*r)
        return self._table

    def _artifact(self, path: Path, aliases: list[str], metadata: dict) -> None:
        art = self.wandb.Artifact(f"{self.cfg.name}-model", type="model",
                                  metadata={k: v for k, v in metadata.items() if v is not None})
        staged = self._stage(path)
        entry = art.add_file(str(staged), name=path.name, policy="immutable")
        if self.mode == "offline":
            # W&B uploads the file from this path when the run is synced, from the directory the
            # sync command runs in: relative to the wandb/ folder (where the printed command
            # runs), so a copy of that folder anywhere (a `modal volume get`) still has its model.
            entry.local_path = os.path.relpath(staged, self.folder.parent)
        self.run.log_artifact(art, aliases=aliases)

    def _stage(self, path: Path) -> Path:
        """The model file, linked into this attempt's W&B folder (<run>/wandb/<attempt>/staged/).

        W&B's default copies it to a staging folder of its own, outside the run: on Modal that
        copy stays in the container, not on the volume, and it doubles the disk used until an
        upload. A hard link costs no space and travels with the run folder; slm replaces model
        files by renaming new ones over them, so the linked content never changes.
        """
        staged = self.folder / "staged" / path.name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.unlink(missing_ok=True)
        try:
            os.link(path, staged)
        except OSError:  # no hard links here (another file system): a copy, still in the run
            shutil.copy2(path, staged)
        return staged

    def _best_model(self, ckpt_path: Path) -> Path | None:
        """The best checkpoint as a weights-only model file beside the final one."""
        if not ckpt_path.is_file():
            self._log(f"note: the best checkpoint ({ckpt_path.name}) was pruned; only the final "
                      "model is uploaded")
            return None
        state = ckpt.load(ckpt_path)
        keep = ("format", "model_state_dict", "config", "tokenizer", "tokenizer_id", "step",
                "tokens")
        slim = {k: state[k] for k in keep if k in state}
        slim["val_loss"], slim["val_bpb"] = self._best["val/loss"], self._best.get("val/bpb")
        return ckpt.save(slim, self.layout.model_best)


def sync_command(wandb_dir: Path) -> str:
    """The command that uploads every attempt of a run: offline ones, and online ones whose
    upload did not finish (`wandb sync` skips online-run folders unless told otherwise).

    It runs inside the wandb/ folder: offline model artifacts name their files relative to it.
    """
    return f"cd {_shown(wandb_dir)} && wandb sync --include-online ."


def final_summary(metrics_path: Path) -> dict:
    """The W&B summary of a finished run, from metrics.jsonl (every attempt's rows).

    val/loss and val/bpb are the best (lowest) validation loss and the bits per byte at that
    evaluation, with best/step; final/* are the last ones; train/loss is the last interval's mean.
    """
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    evals = [r for r in rows if r.get("val/loss") is not None]
    train = [r for r in rows if r.get("train/loss") is not None]
    out = {}
    if evals:
        best, last = min(evals, key=lambda r: r["val/loss"]), evals[-1]
        out.update({"val/loss": best["val/loss"], "val/bpb": best.get("val/bpb"),
                    "best/step": best["step"], "best/tokens": best.get("tokens"),
                    "final/val_loss": last["val/loss"], "final/val_bpb": last.get("val/bpb")})
    if train:
        last = train[-1]
        out.update({"train/loss": last["train/loss"], "final/train_loss": last["train/loss"],
                    "final/step": last["step"], "tokens": last.get("tokens"),
                    "time": last.get("time"), "cost_usd": last.get("cost_usd")})
    out["status"] = "finished"
    return {k: v for k, v in out.items() if v is not None}


def _has_table(run, key: str) -> bool:
    """Whether the (resumed, online) W&B run already holds an incremental table under key."""
    try:
        value = run.summary.get(key) if getattr(run, "resumed", False) else None
        return dict(value or {}).get("_type") == "incremental-table-file"
    except Exception:
        return False


def _previous_samples(path: Path) -> list[list]:
    """Samples already logged by earlier attempts of this run (metrics.jsonl, already cut)."""
    rows = read_metrics(path) if path.is_file() else []
    return [[r["step"], s.get("prompt", ""), s.get("text", "")]
            for r in rows for s in r.get("samples") or []]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shown(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
