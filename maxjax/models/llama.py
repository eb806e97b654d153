"""Llama (Llama 2/3/3.1, SmolLM2, TinyLlama, and Mistral's GGUF conversions): the model and its weight adapters.

The block is the one Mistral (sliding window), Qwen2 (Q/K/V biases) and Qwen3 (per-head Q/K norms) are built
from: those differences are `TransformerConfig` fields, read here, and each family's file configures them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax.models import gguf_common
from maxjax.models.backend import AS_LOADED, Backend
from maxjax.models.config import TransformerConfig
from maxjax.models.layers import (
    AttentionBatch,
    Embedding,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    apply_rope,
    fuse_gate_up,
    fuse_qkv,
    paged_attention,
    rope_cos_sin,
    rope_inv_freq,
    split_qkv,
)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype, backend: Backend):
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.backend = backend
        layout = backend.weights
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.qkv = Linear(cfg.hidden_size, (h + 2 * k) * e, axes=("kv_heads", "embed"), bias=cfg.attention_bias,
                          dtype=dtype, layout=layout)  # rows grouped by KV head (`fuse_qkv`)
        self.q_norm = RMSNorm(e, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim") if cfg.qk_norm else None
        self.k_norm = RMSNorm(e, eps=cfg.rms_norm_eps, dtype=dtype, axis="head_dim") if cfg.qk_norm else None
        self.o = Linear(h * e, cfg.hidden_size, axes=("embed", "heads"), dtype=dtype, layout=layout)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, activation=cfg.activation, dtype=dtype, layout=layout
        )

    def __call__(
        self, x: jax.Array, cache: KVCache, layer: int, batch: AttentionBatch
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kk, v = split_qkv(self.qkv(self.input_norm(x)), h, k, e)
        if self.q_norm is not None and self.k_norm is not None:
            q, kk = self.q_norm(q), self.k_norm(kk)
        q = apply_rope(q, batch.cos, batch.sin)  # [B, T, H, E]
        kk = apply_rope(kk, batch.cos, batch.sin)  # [B, T, K, E]
        attn = paged_attention(
            q, kk, v, cache, layer, batch, scale=cfg.attention_scale, sliding_window=cfg.layer_window(layer),
            past_kernel=self.backend.past_kernel, shards=self.backend.shards,
        )
        x = x + self.o(attn.reshape(b, t, h * e))
        x = x + self.mlp(self.post_norm(x))
        return x, kk, v


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype = jnp.float32, backend: Backend = AS_LOADED):
        """`backend`: the device's weight layout and attention (`models/backend.py`); the default holds the
        checkpoint's [out, in] layout, which `use_backend` can change in place."""
        self.cfg = cfg
        self.backend = backend
        layout = backend.weights
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, layout=layout)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype, backend) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), dtype=dtype,
                                                layout=layout)

    def forward(
        self, tokens: jax.Array, cache: KVCache, page_table: jax.Array, past_len: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, T] -> (final-normed hidden states [B, T, D], new keys and values [L, B, T, K, E])."""
        b, t = tokens.shape
        x = self.embed(tokens)  # [B, T, D]
        positions = past_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.rotary_dim or self.cfg.head_dim))
        batch = AttentionBatch(page_table=page_table, past_len=past_len, cos=cos, sin=sin)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cache, i, batch)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), jnp.stack(new_k), jnp.stack(new_v)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        out = self.lm_head(hidden) if self.lm_head is not None else self.embed.attend(hidden)
        return out.astype(jnp.float32)

    def __call__(
        self, tokens: jax.Array, cache: KVCache, page_table: jax.Array, past_len: jax.Array,
        logit_index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, T] -> (logits [B, N, V] at `logit_index` [B, N], new keys and values [L, B, T, K, E])."""
        hidden, new_k, new_v = self.forward(tokens, cache, page_table, past_len)
        return self.logits(jnp.take_along_axis(hidden, logit_index[:, :, None], axis=1)), new_k, new_v


# ------------------------------------------------------------------------------------------- weights


def load_params(cfg: TransformerConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The model's parameters as a pure dict (the shape of `nnx.to_pure_dict`), from HF tensor names. Q/K/V and
    gate/up are fused here, in the layout tensor parallelism can split (`fuse_qkv`, `fuse_gate_up`)."""
    layers = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = {"kernel": fuse_qkv([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], cfg.num_kv_heads)}
        if cfg.attention_bias:
            qkv["bias"] = fuse_qkv([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], cfg.num_kv_heads)
        gate_up = fuse_gate_up(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
        layers[i] = {
            "input_norm": {"weight": get(p + "input_layernorm.weight")},
            "qkv": qkv,
            "o": {"kernel": get(p + "self_attn.o_proj.weight")},
            "post_norm": {"weight": get(p + "post_attention_layernorm.weight")},
            "mlp": {"gate_up": {"kernel": gate_up}, "down": {"kernel": get(p + "mlp.down_proj.weight")}},
        }
        if cfg.qk_norm:
            layers[i]["q_norm"] = {"weight": get(p + "self_attn.q_norm.weight")}
            layers[i]["k_norm"] = {"weight": get(p + "self_attn.k_norm.weight")}
    return with_embeddings(cfg, get, layers)


def with_embeddings(cfg: TransformerConfig, get: Callable[[str], np.ndarray], layers: dict[int, Any]) -> dict[str, Any]:
    """The whole model's parameter dict around `layers`: embeddings, final norm and (untied) LM head, which every
    decoder-only family names the same way."""
    params: dict[str, Any] = {
        "embed": {"weight": get("model.embed_tokens.weight")},
        "layers": layers,
        "norm": {"weight": get("model.norm.weight")},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight")}
    return params


# --------------------------------------------------------------------------------------------- GGUF

gguf_name_to_hf = gguf_common.name_mapper(gguf_common.LLAMA_LAYER_NAMES)
"""llama.cpp's tensor name -> HF's; None for tensors the model does not use (e.g. rope_freqs)."""


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders Q/K rows from HF's rotate-half to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's Q/K rows (used when writing GGUF files)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_to_hf(hf_name: str, w: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return unpermute_qk(w, int(hf_config["num_attention_heads"]))
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return unpermute_qk(w, int(hf_config["num_key_value_heads"]))
    return w


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """GGUF metadata -> an HF-style config dict (`config_from_hf` decides the rest)."""
    hf = gguf_common.hf_config_from_gguf(metadata, tensor_names, "LlamaForCausalLM")
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return hf


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """HF's Llama attends to every position: a `sliding_window` in its config (or a GGUF file's) is ignored."""
    cfg = TransformerConfig.from_hf(hf)
    return dataclasses.replace(cfg, sliding_window=None, layer_types=())
