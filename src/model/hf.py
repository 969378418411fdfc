"""Weights between our GPT and Hugging Face `transformers` (no transformers import needed here).

    arch = architecture(cfg)                 # "gpt2", "llama" or "qwen3" (or a clear refusal)
    hf_sd = to_hf(model.state_dict(), cfg)   # transformers' names and layouts
    cfg_kw, sd = from_hf(hf_config, hf_sd)   # and back

Which transformers architecture matches which model options, exactly:
    GPT2LMHeadModel   pos_emb learned, norm layernorm, mlp gelu (tanh), no qk_norm (the default)
    LlamaForCausalLM  pos_emb rope, norm rmsnorm, mlp swiglu, no qk_norm
    Qwen3ForCausalLM  pos_emb rope, norm rmsnorm, mlp swiglu, qk_norm, bias false
GPT-2 stores linear weights transposed (Conv1D). The padded embedding rows (pad_vocab_multiple)
are dropped on export, so transformers' logits equal ours over the real vocab.

Reading model folders and the hub for `model.init_from` is src/training/init_from.py's job.
"""

from __future__ import annotations

import torch

from src.errors import SLMError

GPT2_SIZES = {  # name: (n_layer, n_head, n_embd); all have 1024 positions and 50257 tokens
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
HUB_ORG = "openai-community"
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
RMS_EPS, LN_EPS = 1e-6, 1e-5  # what src/model/gpt.py uses


# ----------------------------------------------------------------------------- architecture


def architecture(cfg) -> str:
    """The transformers architecture that computes exactly what our model does, or SLMError."""
    extra = [f"model.{k}: true" for k in ("value_embeds", "unet_skips") if getattr(cfg, k, False)]
    if extra:
        raise SLMError(
            f"no transformers architecture matches this model: {' and '.join(extra)} "
            "(no transformers model has them). Export the weights with --to safetensors instead"
        )
    if cfg.pos_emb == "learned":
        want = (("norm", "layernorm"), ("mlp", "gelu"), ("qk_norm", False))
        bad = [f"model.{k}: {getattr(cfg, k)}" for k, ok in want if getattr(cfg, k) != ok]
        if bad:
            raise SLMError(
                f"no transformers architecture matches this model exactly: with pos_emb: learned "
                f"the match is GPT-2, which has LayerNorm, a GELU MLP and no QK-norm, but "
                f"{', '.join(bad)}. Export the weights with --to safetensors instead"
            )
        return "gpt2"
    bad = [f"model.{k}: {getattr(cfg, k)}" for k, ok in (("norm", "rmsnorm"), ("mlp", "swiglu"))
           if getattr(cfg, k) != ok]
    if cfg.qk_norm and cfg.bias:
        bad.append("model.bias: true with qk_norm: true (Qwen3's MLP has no biases)")
    if bad:
        raise SLMError(
            f"no transformers architecture matches this model exactly: with pos_emb: rope the "
            f"matches are Llama (rmsnorm + swiglu) and Qwen3 (+ qk_norm), but {', '.join(bad)}. "
            "Export the weights with --to safetensors instead"
        )
    return "qwen3" if cfg.qk_norm else "llama"


def hf_config(cfg, eot_id: int | None = None) -> dict:
    """transformers config fields (model_type included) for our model config."""
    arch = architecture(cfg)
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    if arch == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden if cfg.mlp_hidden != 4 * cfg.n_embd else None,
            "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings, **special,
        }
    out = {
        "model_type": arch,
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": RMS_EPS, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "tie_word_embeddings": cfg.tie_embeddings, **special,
    }
    if arch == "llama":
        out["mlp_bias"] = cfg.bias
    return out


# ----------------------------------------------------------------------------- weights


def to_hf(sd: dict, cfg) -> dict:
    """Our state dict -> transformers' (names, Conv1D layouts, real vocab rows only)."""
    arch, V = architecture(cfg), cfg.vocab_size
    sd = {k: v.detach() for k, v in sd.items()}
    sd["lm_head.weight"] = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:V]
    out = {}
    if arch == "gpt2":
        for k, v in sd.items():
            out[k] = v.t() if k.endswith(_CONV1D) else v
        for k, v in list(out.items()):  # GPT-2 always has biases: bias-free layers get zeros
            if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or k.endswith(_CONV1D):
                b = k[: -len("weight")] + "bias"
                if b not in out:
                    out[b] = torch.zeros(v.shape[-1] if k.endswith(_CONV1D) else v.shape[0],
                                         dtype=v.dtype)
        return {k: v.contiguous() for k, v in out.items()}
    C, h = cfg.n_embd, cfg.mlp_hidden
    out["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
    out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        a, m = f"transformer.h.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = sd[a + "ln_1.weight"]
        out[m + "post_attention_layernorm.weight"] = sd[a + "ln_2.weight"]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"{a}attn.c_attn.{suffix}"].split(C, dim=0)
            gate, up = sd[f"{a}mlp.c_fc.{suffix}"].split(h, dim=0)
            out |= {f"{m}self_attn.q_proj.{suffix}": q, f"{m}self_attn.k_proj.{suffix}": k,
                    f"{m}self_attn.v_proj.{suffix}": v,
                    f"{m}self_attn.o_proj.{suffix}": sd[f"{a}attn.c_proj.{suffix}"],
                    f"{m}mlp.gate_proj.{suffix}": gate, f"{m}mlp.up_proj.{suffix}": up,
                    f"{m}mlp.down_proj.{suffix}": sd[f"{a}mlp.c_proj.{suffix}"]}
        if cfg.qk_norm:
            out[m + "self_attn.q_norm.weight"] = sd[a + "attn.q_norm.weight"]
            out[m + "self_attn.k_norm.weight"] = sd[a + "attn.k_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def shape_from_hf(c: dict, source: str) -> dict:
    """GPTConfig fields for a transformers config dict, or SLMError naming what has no match."""
    kind = c.get("model_type")

    def need(cond: bool, what: str):
        if not cond:
            raise SLMError(f"{source}: {what}, which our GPT cannot reproduce exactly")

    if kind == "gpt2":
        C = c["n_embd"]
        inner = c.get("n_inner") or 4 * C
        need(c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"activation_function is {c.get('activation_function')} (ours: gelu_new)")
        need(abs(c.get("layer_norm_epsilon", LN_EPS) - LN_EPS) < 1e-12,
             f"layer_norm_epsilon is {c.get('layer_norm_epsilon')} (ours: {LN_EPS})")
        need(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx"),
             "attention scaling differs from 1/sqrt(head_dim)")
        shape = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=C,
                     block_size=c.get("n_positions", 1024), vocab_size=c["vocab_size"],
                     pos_emb="learned", norm="layernorm", qk_norm=False, mlp="gelu",
                     mlp_ratio=inner / C, tie_embeddings=c.get("tie_word_embeddings", True),
                     bias=True)
        hidden = inner
    elif kind in ("llama", "qwen3"):
        C, H = c["hidden_size"], c["num_attention_heads"]
        need(c.get("num_key_value_heads") in (None, H), "it uses grouped-query attention")
        need(c.get("head_dim") in (None, C // H), f"head_dim {c.get('head_dim')} != hidden/heads")
        need(c.get("hidden_act", "silu") == "silu", f"hidden_act is {c.get('hidden_act')}")
        need(abs(c.get("rms_norm_eps", RMS_EPS) - RMS_EPS) < 1e-12,
             f"rms_norm_eps is {c.get('rms_norm_eps')} (ours: {RMS_EPS})")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        need(rope.get("rope_type", rope.get("type", "default")) == "default",
             f"rope scaling {rope.get('rope_type') or rope.get('type')} is used")
        need(not c.get("use_sliding_window"), "it uses sliding-window attention")
        bias = bool(c.get("attention_bias", False))
        need(kind == "qwen3" or bool(c.get("mlp_bias", False)) == bias,
             "attention_bias and mlp_bias differ")
        need(not (kind == "qwen3" and bias), "a Qwen3 with attention_bias has no bias-free MLP")
        hidden = c["intermediate_size"]
        shape = dict(n_layer=c["num_hidden_layers"], n_head=H, n_embd=C,
                     block_size=c.get("max_position_embeddings", 2048), vocab_size=c["vocab_size"],
                     pos_emb="rope",
                     rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 1e4))),
                     norm="rmsnorm", qk_norm=kind == "qwen3", mlp="swiglu",
                     mlp_ratio=1.5 * hidden / C, tie_embeddings=c.get("tie_word_embeddings", False),
                     bias=bias)
    else:
        raise SLMError(f"{source}: model_type {kind!r} is not supported; GPT-2, Llama and Qwen3 "
                       "architectures can be imported")
    from src.model.gpt import GPTConfig

    if GPTConfig(**shape).mlp_hidden != hidden:
        raise SLMError(f"{source}: an MLP width of {hidden} cannot be expressed with "
                       "model.mlp_ratio (SwiGLU widths are rounded to multiples of 64)")
    return shape


def from_hf(hf_sd: dict, cfg) -> dict:
    """transformers' state dict -> ours for cfg (vocab rows padded, positions cropped)."""
    sd = {}
    for k, v in hf_sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in k:
            continue  # GPT-2's causal-mask buffers, rotary caches: not weights
        if not k.startswith(("transformer.", "model.", "lm_head.")):
            k = "transformer." + k  # GPT-2's original files hold the bare GPT2Model
        sd[k] = v
    out = {}
    if cfg.pos_emb == "learned":
        for k, v in sd.items():
            out[k] = v.t() if k.endswith(_CONV1D) else v
        out["transformer.wpe.weight"] = out["transformer.wpe.weight"][: cfg.block_size]
        if not cfg.bias:
            out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    else:
        out["transformer.wte.weight"] = sd["model.embed_tokens.weight"]
        out["transformer.ln_f.weight"] = sd["model.norm.weight"]
        if "lm_head.weight" in sd:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(cfg.n_layer):
            a, m = f"transformer.h.{i}.", f"model.layers.{i}."
            out[a + "ln_1.weight"] = sd[m + "input_layernorm.weight"]
            out[a + "ln_2.weight"] = sd[m + "post_attention_layernorm.weight"]
            for s in ("weight", "bias") if cfg.bias else ("weight",):
                p = m + "self_attn."
                out[f"{a}attn.c_attn.{s}"] = torch.cat(
                    [sd[f"{p}{x}_proj.{s}"] for x in ("q", "k", "v")])
                out[f"{a}attn.c_proj.{s}"] = sd[f"{p}o_proj.{s}"]
                out[f"{a}mlp.c_fc.{s}"] = torch.cat(
                    [sd[f"{m}mlp.gate_proj.{s}"], sd[f"{m}mlp.up_proj.{s}"]])
                out[f"{a}mlp.c_proj.{s}"] = sd[f"{m}mlp.down_proj.{s}"]
            if cfg.qk_norm:
                out[a + "attn.q_norm.weight"] = sd[m + "self_attn.q_norm.weight"]
                out[a + "attn.k_norm.weight"] = sd[m + "self_attn.k_norm.weight"]
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["transformer.wte.weight"]
    for k in ("transformer.wte.weight", "lm_head.weight"):  # pad to the padded vocab
        w = out[k]
        if w.size(0) < cfg.padded_vocab:
            extra = torch.zeros(cfg.padded_vocab - w.size(0), w.size(1), dtype=w.dtype)
            out[k] = torch.cat([w, extra])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.float().contiguous() for k, v in out.items()}
