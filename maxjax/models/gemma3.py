"""Gemma 3: `Gemma3ForCausalLM` (1B, 270M) and the language model of `Gemma3ForConditionalGeneration` (4B, 12B,
27B; image inputs are refused at the HTTP edge).

What sets it apart from the Llama block: five sliding-window layers to every global one, each kind with its own
rotary base (10k local, 1M global with linear scaling on the larger models); RMS norms that store `weight - 1`
(`RMSNorm(offset=1.0)`), four per block (around both attention and MLP) plus per-head Q/K norms; embeddings
scaled by sqrt(hidden); scores scaled by `query_pre_attn_scalar` ** -0.5; a GeGLU MLP (tanh GELU).

GGUF (llama.cpp's `gemma3`): norms are stored with the 1 added (`weight + 1`, so llama.cpp multiplies by it
directly); the converter writes the global rotary base and window only: the 1:5 pattern, the local base 10000
and the attention scale (1/sqrt(head_dim), or 1/sqrt(hidden / heads) on the 62-layer 27B) are llama.cpp's own
constants, mirrored here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax.models import gguf_common
from maxjax.models.backend import AS_LOADED, Backend
from maxjax.models.config import TransformerConfig, text_config_of
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
from maxjax.models.llama import with_embeddings

_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
"""What transformers' `Gemma3TextConfig` assumes for keys a config leaves out (Hub configs leave out many)."""
_PATTERN = 6
"""Every sixth layer is global, unless the config says otherwise (`sliding_window_pattern`, `layer_types`)."""


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    hf = _DEFAULTS | text_config_of(hf)
    if not hf.get("layer_types"):
        pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or _PATTERN)
        hf["layer_types"] = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(int(hf["num_hidden_layers"]))
        ]
    return dataclasses.replace(TransformerConfig.from_hf(hf), qk_norm=True)


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype, backend: Backend):
        d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.backend = backend
        layout = backend.weights

        def norm(dim: int, axis: str = "embed") -> RMSNorm:
            return RMSNorm(dim, eps=cfg.rms_norm_eps, offset=1.0, dtype=dtype, axis=axis)

        self.input_norm = norm(d)
        self.qkv = Linear(d, (h + 2 * k) * e, axes=("kv_heads", "embed"), bias=cfg.attention_bias, dtype=dtype,
                          layout=layout)  # rows grouped by KV head (`fuse_qkv`)
        self.q_norm = norm(e, "head_dim")
        self.k_norm = norm(e, "head_dim")
        self.o = Linear(h * e, d, axes=("embed", "heads"), dtype=dtype, layout=layout)
        self.post_attn_norm = norm(d)
        self.pre_mlp_norm = norm(d)
        self.mlp = GatedMLP(d, cfg.intermediate_size, activation=cfg.activation, dtype=dtype, layout=layout)
        self.post_mlp_norm = norm(d)

    def __call__(
        self, x: jax.Array, cache: KVCache, layer: int, batch: AttentionBatch
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kk, v = split_qkv(self.qkv(self.input_norm(x)), h, k, e)
        q = apply_rope(self.q_norm(q), batch.cos, batch.sin)  # [B, T, H, E]
        kk = apply_rope(self.k_norm(kk), batch.cos, batch.sin)  # [B, T, K, E]
        attn = paged_attention(
            q, kk, v, cache, layer, batch, scale=cfg.attention_scale, sliding_window=cfg.layer_window(layer),
            softcap=cfg.attn_logit_softcap, past_kernel=self.backend.past_kernel,
            shards=self.backend.shards,
        )
        x = x + self.post_attn_norm(self.o(attn.reshape(b, t, h * e)))
        x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return x, kk, v


class Gemma3ForCausalLM(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtype: jnp.dtype = jnp.float32, backend: Backend = AS_LOADED):
        """`backend`: the device's weight layout and attention (`models/backend.py`); the default holds the
        checkpoint's [out, in] layout, which `use_backend` can change in place."""
        self.cfg = cfg
        self.backend = backend
        layout = backend.weights
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, layout=layout)
        self.layers = nnx.List([Gemma3DecoderLayer(cfg, dtype, backend) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=1.0, dtype=dtype)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), dtype=dtype,
                                                layout=layout)

    def forward(
        self, tokens: jax.Array | None, cache: KVCache, page_table: jax.Array, past_len: jax.Array, *,
        embeds: jax.Array | None = None, image_block: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, T] -> (final-normed hidden states [B, T, D], new keys and values [L, B, T, K, E]).

        With images (`gemma3_vision`): `embeds` [B, T, D], the merged input embeddings (`merge_image_features`,
        already scaled), in place of `tokens`; `image_block` [B, T], each token's image (0: text; `AttentionBatch`),
        so that one image's tokens attend to each other both ways. Both None: the text-only graph."""
        cfg = self.cfg
        if embeds is None:
            assert tokens is not None, "forward needs tokens or embeds"
            x = self.embed_input(tokens)
        else:
            x = embeds
        t = x.shape[1]
        positions = past_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

        def batch_for(rope: Any) -> AttentionBatch:
            cos, sin = rope_cos_sin(positions, rope_inv_freq(rope, cfg.head_dim))
            return AttentionBatch(page_table=page_table, past_len=past_len, cos=cos, sin=sin, image_block=image_block)

        global_batch = batch_for(cfg.rope)
        local_batch = batch_for(cfg.rope_local) if cfg.rope_local is not None else global_batch
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            local = bool(cfg.layer_types) and cfg.layer_types[i] == "sliding_attention"
            batch = local_batch if local else global_batch
            x, k, v = layer(x, cache, i, batch)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), jnp.stack(new_k), jnp.stack(new_v)

    def embed_input(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> the input embeddings [B, T, D], scaled by sqrt(D) (what image soft tokens replace)."""
        x = self.embed(tokens)
        # transformers rounds the scale to the embedding dtype before multiplying; so does this.
        return x * jnp.asarray(math.sqrt(self.cfg.hidden_size), x.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        out = self.lm_head(hidden) if self.lm_head is not None else self.embed.attend(hidden)
        out = out.astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return out if cap is None else jnp.tanh(out / cap) * cap

    def __call__(
        self, tokens: jax.Array, cache: KVCache, page_table: jax.Array, past_len: jax.Array,
        logit_index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens [B, T] -> (logits [B, N, V] at `logit_index` [B, N], new keys and values [L, B, T, K, E])."""
        hidden, new_k, new_v = self.forward(tokens, cache, page_table, past_len)
        return self.logits(jnp.take_along_axis(hidden, logit_index[:, :, None], axis=1)), new_k, new_v


# ------------------------------------------------------------------------------------------- weights


def load_params(cfg: TransformerConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The model's parameters as a pure dict (the shape of `nnx.to_pure_dict`), from HF tensor names (Q/K/V and
    gate/up fused by `fuse_qkv` and `fuse_gate_up`)."""
    layers = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = {"kernel": fuse_qkv([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], cfg.num_kv_heads)}
        if cfg.attention_bias:
            qkv["bias"] = fuse_qkv([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], cfg.num_kv_heads)
        layers[i] = {
            "input_norm": {"weight": get(p + "input_layernorm.weight")},
            "qkv": qkv,
            "q_norm": {"weight": get(p + "self_attn.q_norm.weight")},
            "k_norm": {"weight": get(p + "self_attn.k_norm.weight")},
            "o": {"kernel": get(p + "self_attn.o_proj.weight")},
            "post_attn_norm": {"weight": get(p + "post_attention_layernorm.weight")},
            "pre_mlp_norm": {"weight": get(p + "pre_feedforward_layernorm.weight")},
            "mlp": {
                "gate_up": {"kernel": fuse_gate_up(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))},
                "down": {"kernel": get(p + "mlp.down_proj.weight")},
            },
            "post_mlp_norm": {"weight": get(p + "post_feedforward_layernorm.weight")},
        }
    return with_embeddings(cfg, get, layers)


_LANGUAGE_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")


def multimodal_name_to_hf(name: str) -> str | None:
    """A `Gemma3ForConditionalGeneration` checkpoint name -> the text model's (`language_model.model.X` as the
    Hub stores it, `model.language_model.X` as transformers 5 names it in memory -> `model.X`); None for the
    vision tower and the projector."""
    for prefix in _LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    return None


# --------------------------------------------------------------------------------------------- GGUF


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """GGUF metadata -> an HF-style config, with llama.cpp's Gemma 3 constants where the file says nothing."""
    arch = metadata["general.architecture"]
    hf = gguf_common.hf_config_from_gguf(metadata, tensor_names, "Gemma3ForCausalLM")
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    hf["rms_norm_eps"] = float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6))
    hf["rope_local_base_freq"] = float(metadata.get(f"{arch}.rope.freq_base_swa", 10_000.0))
    hf["query_pre_attn_scalar"] = hf["hidden_size"] // heads if layers == 62 else hf["head_dim"]
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", _PATTERN)
    if hf["sliding_window"] is None:  # llama.cpp: no window, no local layers (and no local rotary base)
        hf["layer_types"] = ["full_attention"] * layers
    elif isinstance(pattern, list):  # one flag per layer: True where the layer slides
        hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        hf["sliding_window_pattern"] = int(pattern)
    return hf


gguf_name_to_hf = gguf_common.name_mapper({
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
})


def gguf_tensor_to_hf(hf_name: str, w: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    """llama.cpp stores Gemma's norms with the 1 already added; HF's (and this model's) store `weight - 1`."""
    return w - 1 if hf_name.endswith("norm.weight") else w
