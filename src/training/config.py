"""Typed, validated run configuration: `load_config(path)` -> Config.

    python -c "from src.training.config import load_config; load_config('configs/tiny.yaml')"

A config has a top-level `name` (the run name; defaults to the file's stem) and five sections:
`model` (the GPT's shape), `data`, `training`, `modal`, `wandb`. Unknown keys, wrong types and
impossible values are refused with ONE `ConfigError` that lists every problem by key path.
Any key can be overridden with dotted paths: `load_config(p, ["training.learning_rate=3e-4"])`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from src.errors import ConfigError, SLMError
from src.hardware import ALIASES, CLUSTER_GPUS, gpu_spec, parse_gpu
from src.model.gpt import GPTConfig

# Vocab sizes of the fixed tokenizers (including the end-of-text token).
FIXED_VOCAB = {"gpt2": 50257, "bytes": 257}
MAX_NAME = 120  # run names name folders and files (<name>_final.pt, <name>.old-<time>)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field(
        "python-stdlib",
        description="python-stdlib (embedded), a preset name, a file/folder, a URL, or hf:<repo>",
    )
    format: Literal["text", "chat"] = Field(
        "text", description="text (pretraining) or chat: {messages: [...]} JSON lines, loss on "
        "the assistant's tokens only (python-stdlib: the embedded chat set; docs/chat.md)"
    )
    val_source: str | None = Field(None, description="separate validation text (else a split)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents for validation")
    tokenizer: Literal["bpe", "bytes", "char", "gpt2"] = Field(
        "bpe", description="bpe (trained on the corpus), bytes, char or gpt2 (via tiktoken)"
    )
    vocab_size: int = Field(4096, ge=258, description="vocab of a trained bpe tokenizer (bpe only)")
    tokenizer_sample_bytes: int = Field(
        50_000_000, ge=1000, description="text sampled to train a bpe tokenizer"
    )
    shard_tokens: int = Field(100_000_000, ge=1024, description="tokens per shard file")
    split: str = Field("train", description="Hugging Face split to read")
    text_field: str = Field("text", description="field holding the text in jsonl/parquet/hf rows")
    num_workers: int = Field(0, ge=0, description="tokenizer processes (0 = one per core)")


class TrainingConfig(_Section):
    batch_size: int = Field(8, ge=1, description="sequences per device per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    batch_tokens: int | None = Field(
        None, ge=1, description="global tokens per optimizer step; sets gradient accumulation"
    )
    seq_len: int | None = Field(None, ge=2, description="training sequence length (<= block_size)")
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train")
    max_tokens: int | None = Field(None, ge=1, description="stop after this many tokens")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget in seconds")
    learning_rate: float = Field(6e-4, gt=0, le=1.0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "wsd", "constant"] = Field(
        "cosine", description="lr after warmup: cosine, linear, warmup-stable-decay or constant"
    )
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: share of the run spent decaying")
    budget_change: Literal["continue", "rewarm", "restretch"] = Field(
        "continue", description="resuming with a different budget (max_steps, max_tokens, "
        "max_seconds): continue from the lr reached (a finished run stays at its final lr) and "
        "decay to the end over the new budget; rewarm to the peak over warmup_steps, then decay; "
        "or restretch the schedule over the new budget as if set from the start (the lr jumps)"
    )
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="muon: Muon for matrices")
    muon_lr: float = Field(0.02, gt=0, description="muon: learning rate of the matrix weights")
    embedding_lr: float | None = Field(
        None, gt=0, description="peak lr of the token embedding, in its own AdamW group without "
        "weight decay (empty = learning_rate, decayed like the other matrices)"
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decay of matrices (biases, norms and Muon's matrices: none)"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment (momentum) decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    eval_every: int = Field(250, ge=1, description="steps between evaluations")
    eval_tokens: int = Field(262_144, ge=1, description="validation tokens per evaluation")
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    keep_last: int = Field(3, ge=1, description="step_N.pt files kept")
    num_samples: int = Field(2, ge=0, description="text samples generated at each evaluation")
    sample_tokens: int = Field(160, ge=1, description="tokens per sample")
    sample_prompt: str = Field("", description="prompt for samples ('' = start of a document)")
    seed: int = Field(1337, description="seed of weights, data order and sampling")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 autocast on GPUs that have it, fp16 otherwise, fp32 on CPU"
    )
    compile: bool = Field(True, description="torch.compile on CUDA (CPU/MPS stay eager)")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="multi-GPU: ddp (a replica per GPU) or fsdp (sharded weights)"
    )
    skip_nonfinite: bool = Field(False, description="skip a step whose loss/grads are NaN/Inf")
    hellaswag_every: int | None = Field(
        None, ge=1, description="steps between HellaSwag evaluations (logged; empty = never)"
    )
    hellaswag_file: str | None = Field(
        None, description="local hellaswag_val.jsonl (empty = the cached/downloaded standard file)"
    )
    hellaswag_examples: int | None = Field(
        None, ge=1, description="HellaSwag examples per evaluation (empty = all 10,042)"
    )


class ModalConfig(_Section):
    gpu: str = Field("T4", description="Modal GPU: T4, L4, A10, A100-40GB, A100-80GB, H100, ...:N")
    timeout: int = Field(43200, ge=60, le=86400, description="seconds per attempt (max 24 h)")
    retries: int = Field(10, ge=0, le=10, description="restarts after preemption or a crash")
    max_cost_usd: float | None = Field(None, gt=0, description="stop cleanly at this spend")
    cpu: float | None = Field(
        None, gt=0, description="CPU cores reserved for the training container (billed; "
        "empty = the GPU table's default per GPU)")
    memory: int | None = Field(
        None, ge=1024, description="MiB of RAM reserved for the training container (billed; "
        "empty = the GPU table's default per GPU)")
    nodes: int = Field(1, ge=1, description="multi-node (beta): containers of the GPU kind")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str) -> str:
        parse_gpu(v)
        return v


class WandbConfig(_Section):
    project: str = Field("slm-from-scratch", description="W&B project the run logs to")
    entity: str | None = Field(None, description="W&B user or team (empty = your default entity)")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online, offline (sync later) or disabled; $WANDB_MODE wins when set"
    )
    group: str | None = Field(None, description="W&B group that gathers related runs (a sweep's)")
    tags: list[str] = Field(default_factory=list, description="W&B tags of the run")
    log_model: bool = Field(True, description="upload final/best checkpoints as artifacts")


class Config(_Section):
    name: str = Field(
        "run", description="run name (a config file's default: its stem); names the run's folders"
    )
    model: GPTConfig = Field(default_factory=GPTConfig, description="the model's shape and options")
    data: DataConfig = Field(
        default_factory=DataConfig, description="where the text comes from and how it is tokenized"
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="batch, budget, optimizer, schedule, evaluation, checkpoints and precision",
    )
    modal: ModalConfig = Field(
        default_factory=ModalConfig, description="the Modal container: GPU, timeout, retries, cost"
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names folders)")
        if len(v) > MAX_NAME:
            raise ValueError(f"{len(v)} characters; use at most {MAX_NAME} (it names folders "
                             "and files)")
        return v

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model.block_size

    @property
    def tokenizer_vocab(self) -> int | None:
        """The tokenizer's vocabulary as configured (None for char: known after preparation)."""
        d = self.data
        return FIXED_VOCAB.get(d.tokenizer, d.vocab_size if d.tokenizer == "bpe" else None)

    @property
    def model_vocab(self) -> int:
        """The model's vocabulary: model.vocab_size, else the tokenizer's (char: 256, close)."""
        return self.model.vocab_size or self.tokenizer_vocab or 256

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step on each rank (from batch_tokens when it is set)."""
        t = self.training
        if t.batch_tokens is None:
            return t.gradient_accumulation_steps
        per_micro = t.batch_size * self.seq_len * world_size
        return max(1, t.batch_tokens // per_micro)

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.grad_accum(world_size) * self.training.batch_size * self.seq_len * world_size

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    """A command-line value, typed the way YAML would type it ('3e-4' is a float)."""
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides) -> dict:
    """Set dotted keys in a raw config dict: ['training.learning_rate=3e-4'] or a dict."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for o in overrides or []:
            if "=" not in o:
                raise ConfigError(f"override '{o}' must look like section.key=value")
            k, v = o.split("=", 1)
            parsed.append((k.strip(), _parse_value(v)))
        items = parsed
    for key, value in items:
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {key}: '{p}' is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def _describe(err: dict, model_cls: type[BaseModel]) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = model_cls
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            ann = field.annotation if field else None
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        allowed = sorted(parent.model_fields) if parent else []
        near = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return f"{loc}: unknown key ({hint}allowed: {', '.join(allowed)})"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    if kind != "missing" and not isinstance(got, dict):
        msg += f" (got {got!r})"
    return f"{loc or '(top level)'}: {msg}"


def _cluster_checks(gpu: str, nodes: int) -> list[str]:
    kind, n = parse_gpu(gpu)
    kind = ALIASES.get(kind, kind)
    if kind in CLUSTER_GPUS and n == gpu_spec(kind).max_count:
        return []
    return [f"modal.nodes: {nodes} containers need all GPUs of each host, e.g. modal.gpu: H100:8 "
            f"(not {gpu}); Modal's clusters offer {', '.join(g + ':8' for g in CLUSTER_GPUS)}"]


def _cross_checks(cfg: Config) -> list[str]:
    """Problems that involve more than one key."""
    errs = []
    m, d, t = cfg.model, cfg.data, cfg.training
    if cfg.modal.nodes > 1:
        errs += _cluster_checks(cfg.modal.gpu, cfg.modal.nodes)
    if t.seq_len and t.seq_len > m.block_size:
        errs.append(
            f"training.seq_len: {t.seq_len} is longer than model.block_size {m.block_size}; "
            "lower seq_len or raise block_size"
        )
    # chat fine-tuning from model.init_from uses the source's tokenizer, not data.vocab_size's
    tok_vocab = None if d.format == "chat" and m.init_from else cfg.tokenizer_vocab
    if m.vocab_size is not None and tok_vocab is not None and m.vocab_size < tok_vocab:
        errs.append(
            f"model.vocab_size: {m.vocab_size} is smaller than the {d.tokenizer} tokenizer's "
            f"{tok_vocab} tokens; remove model.vocab_size or set it to at least {tok_vocab}"
        )
    return errs


def validate_config(raw: dict, source: str = "config") -> Config:
    """Validate a raw dict; raise one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, Config) for err in e.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)) from None
    errs = _cross_checks(cfg)
    if errs:
        raise ConfigError(f"{source}: {len(errs)} problem(s)\n  " + "\n  ".join(errs))
    if cfg.model.vocab_size is None and cfg.tokenizer_vocab:  # char: known once the corpus is read
        cfg.model.vocab_size = cfg.tokenizer_vocab
    return cfg


class _Duplicate(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _Duplicate(f"{key!r} is given twice (again at line {line}); "
                                  "keep one and merge their settings")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        shipped = sorted(x.name for x in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        extra = f"; shipped configs: {', '.join('configs/' + s for s in shipped)}" if shipped else ""
        raise SLMError(f"config file not found: {path}{extra}")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except _Duplicate as e:
        raise ConfigError(f"{path}: {e}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty; copy one of configs/*.yaml and edit it")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (model:, data:, training:, ...) at top level")
    raw.setdefault("name", p.stem)
    return raw


def load_config(path: str | Path, overrides=None) -> Config:
    """Read, override and validate a YAML config. Raises ConfigError listing every problem."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate_config(raw, str(path))


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved in a checkpoint (already validated once)."""
    d = dict(d)
    if isinstance(d.get("data"), dict) and d["data"].get("tokenizer") in FIXED_VOCAB:
        # a saved config lists every key; data.vocab_size means nothing for fixed tokenizers
        d["data"] = {k: v for k, v in d["data"].items() if k != "vocab_size"}
    return validate_config(d, "checkpoint config")
