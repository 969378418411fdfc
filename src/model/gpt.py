"""A GPT language model in one file: GPT-2's architecture by default, modern options by switch.

    from src.training.config import load_config
    from src.model.gpt import GPT
    model = GPT(load_config("configs/tiny.yaml").model)
    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids

Defaults reproduce GPT-2 (learned positions, LayerNorm, GELU, tied embeddings, biases), so the
124M/350M/774M/1.5B configs have GPT-2's parameter counts and export exactly to `transformers`.
Switches: `pos_emb: rope`, `norm: rmsnorm`, `qk_norm: true`, `mlp: swiglu | relu2`,
`tie_embeddings: false`, `bias: false`. Two more lower the loss per step of small models but have no
`transformers` architecture to export to: `value_embeds: true` (each block adds a token table of its
own to the attention values) and `unet_skips: true` (block n-1-i also reads block i's input, through
a learned weight). Attention runs through `scaled_dot_product_attention`
(flash attention on GPUs that have it). Generation uses a KV cache (`generate`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Sampling(BaseModel):
    """How generated tokens are drawn: the one set of ranges that `slm sample` and `slm chat`
    check their flags (and chat its /commands) against."""

    max_new_tokens: int = Field(200, ge=1, description="tokens to generate")
    temperature: float = Field(0.8, ge=0, description="0 = always the likeliest token")
    top_k: int | None = Field(None, ge=0, description="keep the k likeliest tokens (0 = all)")
    top_p: float | None = Field(None, gt=0, le=1, description="keep the likeliest tokens that "
                                "hold this probability")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes the samples repeatable")
    samples: int = Field(1, ge=1, description="samples per prompt")
    batch_size: int = Field(8, ge=1, description="samples generated together")


class GPTConfig(BaseModel):
    """The model's shape. Also the `model:` section of a training config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_layer: int = Field(12, ge=1, description="number of transformer blocks")
    n_head: int = Field(12, ge=1, description="attention heads per block")
    n_embd: int = Field(768, ge=1, description="width of the residual stream")
    block_size: int = Field(1024, ge=2, description="longest sequence the model can read")
    vocab_size: int | None = Field(
        None, ge=2, description="token ids the model accepts; empty = the tokenizer's size"
    )
    pad_vocab_multiple: int = Field(
        64, ge=1, description="embedding rows rounded up to this multiple (faster matmuls)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    bias: bool = Field(True, description="biases in linear layers and norms (GPT-2: true)")
    pos_emb: Literal["learned", "rope"] = Field(
        "learned", description="position encoding: a learned table (GPT-2) or rope (rotary)"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="normalisation layer (GPT-2: layernorm)"
    )
    qk_norm: bool = Field(False, description="RMS-normalise queries and keys per head")
    mlp: Literal["gelu", "swiglu", "relu2"] = Field(
        "gelu", description="feed-forward type (GPT-2: gelu; relu2 = ReLU squared)"
    )
    mlp_ratio: float = Field(4.0, gt=0, description="feed-forward width / n_embd")
    tie_embeddings: bool = Field(True, description="share token embedding and output head")
    value_embeds: bool = Field(
        False, description="value embeddings: each block adds its own token table to the "
        "attention values (n_layer x vocab x n_embd more parameters, no extra FLOPs; no "
        "transformers export)"
    )
    unet_skips: bool = Field(
        False, description="U-net skips: block n-1-i also reads block i's input through a "
        "learned weight (no transformers export)"
    )
    init_std: float = Field(0.02, gt=0, description="std of the normal weight init")
    grad_checkpoint: bool = Field(
        False, description="recompute activations in backward (less memory, ~30% slower)"
    )
    init_from: str | None = Field(
        None, description="start from weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a path"
    )

    @model_validator(mode="after")
    def _check_shape(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("pos_emb: rope needs an even head size (n_embd / n_head)")
        if self.unet_skips and self.n_layer < 2:
            raise ValueError("unet_skips needs n_layer >= 2 (it joins block i to block n-1-i)")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it comes from the tokenizer)")
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def mlp_hidden(self) -> int:
        h = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":  # two input matrices: keep the parameter count of a 2-matrix MLP
            h = (2 * h // 3 + 63) // 64 * 64
        return h


# The keys that fix the model's shape and computation: a checkpoint only continues, and
# model.init_from only loads, into a model whose keys all agree.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple",
              "pos_emb", "rope_theta", "norm", "qk_norm", "mlp", "mlp_ratio", "tie_embeddings",
              "bias", "value_embeds", "unet_skips")


def shape_of(model_cfg: dict) -> dict:
    """The shape keys of a saved `model:` section; a key that files written before it existed
    lack takes its default (the computation those files had)."""
    fields = GPTConfig.model_fields
    return {k: model_cfg.get(k, fields[k].default) for k in SHAPE_KEYS}


def _norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=cfg.bias, eps=1e-5)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D/2). Rotate pairs (first half, second half).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for generation: prefill once, then one token per step.

    Holds `max_len` positions for `batch` rows; `pos` counts the positions already written (the
    model advances it after each forward).
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device):
        self.shape = (cfg.n_layer, 2, batch, cfg.n_head, max_len, cfg.head_dim)
        self.device = device
        self.kv: torch.Tensor | None = None  # allocated at the first keys, in their dtype
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) after the cached positions; return all keys and values so far.

        The cache takes its dtype from the keys (under autocast they are bf16/fp16 while the
        weights, e.g. an FSDP shard after the final checkpoint, may be float32)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} were asked for")
        if self.kv is None:
            self.kv = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
        self.kv[layer, 0, :, :, self.pos : end] = k
        self.kv[layer, 1, :, :, self.pos : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)

    def forward(self, x, rope=None, cache: KVCache | None = None, mask=None, ve=None):
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:  # value embeddings: this block's token table, (B, T, C)
            v = v + ve
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, S, D): the cached positions and these
        drop = self.cfg.dropout if self.training else 0.0
        # mask (B, 1, T, S) when given; else causal, which for T == S is the plain triangle and for
        # one new token over a cache is "see everything" (the caller passes a mask otherwise)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, h = cfg.mlp, cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, 2 * h if cfg.mlp == "swiglu" else h, bias=cfg.bias)
        self.c_proj = nn.Linear(h, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True

    def forward(self, x):
        x = self.c_fc(x)
        if self.kind == "gelu":
            x = F.gelu(x, approximate="tanh")  # GPT-2's gelu_new
        elif self.kind == "relu2":
            x = F.relu(x).square()
        else:
            a, b = x.chunk(2, dim=-1)
            x = F.silu(a) * b
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1, self.attn = _norm(cfg, cfg.n_embd), Attention(cfg, layer)
        self.ln_2, self.mlp = _norm(cfg, cfg.n_embd), MLP(cfg)

    def forward(self, x, rope=None, cache=None, mask=None, ve=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=_norm(cfg, cfg.n_embd),
            )
        )
        if cfg.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
            freqs = torch.outer(torch.arange(cfg.block_size).float(), inv)  # (T, D/2)
            self.register_buffer("rope_cos", freqs.cos(), persistent=False)
            self.register_buffer("rope_sin", freqs.sin(), persistent=False)
        if cfg.value_embeds:
            self.transformer["ve"] = nn.ModuleList(nn.Embedding(V, cfg.n_embd)
                                                   for _ in range(cfg.n_layer))
        if cfg.unet_skips:  # one weight per pair (block i's input -> block n-1-i), starting at 1
            self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if self.transformer.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            if getattr(m, "residual_scale", False):  # GPT-2: scale residual projections
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 * N (matmul weights) + 12 * L * T * C (attention scores).

        N counts the non-embedding weights plus the output head (the token-embedding lookup costs
        no FLOPs); the attention term is PaLM's appendix-B estimate; forward+backward = 3x forward.
        """
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        skip = ("transformer.wte.", "transformer.wpe.", "transformer.ve.", "lm_head.")
        n = sum(p.numel() for k, p in self.named_parameters() if p.dim() >= 2 and not k.startswith(skip))
        n += self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * cfg.n_layer * T * cfg.n_embd

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None, pad=None,
                last_only: bool = False):
        """idx (B, T) -> (logits (B, T, padded_vocab), loss or None).

        cache: a KVCache to read and extend (generation). pad: (B,) count of left-padding tokens
        per row (batched prompts of different lengths): padding is never attended to and each
        row's positions start at its first real token. last_only: logits of the last position
        only, (B, 1, padded_vocab) (a long prompt's prefill then never holds T x vocab logits).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens > block_size {self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        mask = None
        if pad is not None or (cache is not None and start > 0 and T > 1):
            keys = torch.arange(start + T, device=idx.device)  # (S,)
            mask = keys[None, None, :] <= pos[None, :, None]  # (1, T, S) causal
            if pad is not None:
                pad = torch.as_tensor(pad, device=idx.device).view(B)
                mask = mask & (keys[None, None, :] >= pad[:, None, None])  # (B, T, S)
                mask = mask | (keys[None, None, :] == pos[None, :, None])  # a pad sees itself
                pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T) positions per row
            mask = mask[:, None]  # (B or 1, 1, T, S)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D/2) or (B, T, D/2)
            rope = (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])
        x = self.transformer.drop(x)
        x = self._blocks(x, idx, rope, cache, mask)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V_padded)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def _blocks(self, x, idx, rope, cache, mask):
        """The residual stream through every block (with value embeddings and U-net skips when
        the config has them)."""
        n, cfg = self.cfg.n_layer, self.cfg
        skips = []  # unet_skips: the inputs of the first n // 2 blocks
        for i, block in enumerate(self.transformer.h):
            if cfg.unet_skips and i >= n - n // 2:
                x = x + self.skip_weights[i - (n - n // 2)] * skips.pop()
            elif cfg.unet_skips and i < n // 2:
                skips.append(x)
            ve = self.transformer.ve[i](idx) if cfg.value_embeds else None
            if cfg.grad_checkpoint and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, None, ve,
                                                      use_reentrant=False)
            else:
                x = block(x, rope, cache, mask, ve)
        return x

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        pad=None,
        seed: int | None = None,
        stop_tokens=None,
    ):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; yields (B, 1) per step.

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. seed (or a torch.Generator) makes sampling repeatable. pad: (B,)
        left-padding per row, for prompts of different lengths. stop_tokens: ids that end a row;
        generation stops early once every row has produced one (later tokens of a finished row
        are to be ignored by the caller).

        With use_cache the prompt is run once (prefill), then each new token costs one position.
        The model reads the last block_size tokens: once a row grows past that, each step recomputes
        the window (exact, but no faster than without the cache). Output with and without the
        cache is the same.
        """
        if generator is None and seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        V = self.cfg.vocab_size or self.cfg.padded_vocab
        bs, B = self.cfg.block_size, idx.size(0)
        if pad is not None:
            pad = torch.as_tensor(pad, device=idx.device).view(B)
        stop = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache, x = None, idx
        for _ in range(max_new_tokens):
            if idx.size(1) > bs:  # past the window: drop the oldest tokens (padding first)
                cut = idx.size(1) - bs
                idx = idx[:, cut:]
                pad = None if pad is None else (pad - cut).clamp(min=0)
                x = idx
                if cache is not None:
                    cache.pos = 0  # re-prefill the window
            if use_cache and cache is None:
                size = min(bs, idx.size(1) + max_new_tokens)
                cache = KVCache(self.cfg, B, size, idx.device)
            if not use_cache:
                x = idx
            logits, _ = self(x, cache=cache, pad=pad)
            nxt = sample_next(logits[:, -1, :V].float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            x = nxt
            yield nxt
            if len(stop):
                done |= torch.isin(nxt[:, 0], stop)
                if bool(done.all()):
                    return


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token (B, 1) from logits (B, V): greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[:, 0] = False  # always keep the likeliest token
        probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)
