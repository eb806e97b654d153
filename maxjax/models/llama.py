"""Llama (Llama 2/3/3.1, SmolLM2, TinyLlama, and Mistral's GGUF conversions): the model and its weight adapters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax.models.config import TransformerConfig
from maxjax.models.layers import (
    AttentionBatch,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    apply_rope,
    paged_attention,
    project,
    rope_cos_sin,
    rope_inv_freq,
)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype):
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.qkv = Linear(cfg.hidden_size, (h + 2 * k) * e, bias=cfg.attention_bias, dtype=dtype)
        self.o = Linear(h * e, cfg.hidden_size, dtype=dtype)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)

    def __call__(
        self, x: jax.Array, cache: KVCache, layer: int, batch: AttentionBatch
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kk, v = jnp.split(self.qkv(self.input_norm(x)), [h * e, (h + k) * e], axis=-1)
        q = apply_rope(q.reshape(b, t, h, e), batch.cos, batch.sin)  # [B, T, H, E]
        kk = apply_rope(kk.reshape(b, t, k, e), batch.cos, batch.sin)  # [B, T, K, E]
        v = v.reshape(b, t, k, e)
        attn = paged_attention(q, kk, v, cache, layer, batch, scale=e**-0.5)
        x = x + self.o(attn.reshape(b, t, h * e))
        x = x + self.mlp(self.post_norm(x))
        return x, kk, v


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype = jnp.float32):
        self.cfg = cfg
        self.embed = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype)

    def forward(
        self, tokens: jax.Array, cache: KVCache, page_table: jax.Array, past_len: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, T] -> (final-normed hidden states [B, T, D], new keys and values [L, B, T, K, E])."""
        b, t = tokens.shape
        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
        positions = past_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim))
        batch = AttentionBatch(page_table=page_table, past_len=past_len, cos=cos, sin=sin)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cache, i, batch)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), jnp.stack(new_k), jnp.stack(new_v)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        out = self.lm_head(hidden) if self.lm_head is not None else project(hidden, self.embed[...])
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
    """The model's parameters as a pure dict (the shape of `nnx.to_pure_dict`), from HF tensor names."""
    layers = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = {"kernel": np.concatenate([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])}
        if cfg.attention_bias:
            qkv["bias"] = np.concatenate([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        gate_up = np.concatenate([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        layers[i] = {
            "input_norm": {"weight": get(p + "input_layernorm.weight")},
            "qkv": qkv,
            "o": {"kernel": get(p + "self_attn.o_proj.weight")},
            "post_norm": {"weight": get(p + "post_attention_layernorm.weight")},
            "mlp": {"gate_up": {"kernel": gate_up}, "down": {"kernel": get(p + "mlp.down_proj.weight")}},
        }
    params: dict[str, Any] = {
        "embed": get("model.embed_tokens.weight"),
        "layers": layers,
        "norm": {"weight": get("model.norm.weight")},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight")}
    return params


# --------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_name_to_hf(name: str) -> str | None:
    """llama.cpp's tensor name -> HF's; None for tensors the model does not use (e.g. rope_freqs)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{index}.{_GGUF_LAYER_NAMES[rest]}"
    return None


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


_GGUF_REQUIRED = ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """GGUF metadata -> an HF-style config dict (`TransformerConfig.from_hf` decides the rest)."""
    arch = metadata["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None and name in _GGUF_REQUIRED:
            raise KeyError(f"{arch}.{name}")
        return value

    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    n_kv = key("attention.head_count_kv", n_heads)
    vocab = key("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
        "head_dim": int(key("rope.dimension_count") or key("attention.key_length") or hidden // n_heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if key("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
    return hf
