"""Phi-3 and Phi-4 (Phi3ForCausalLM): the Llama block with Q/K/V and gate/up stored fused, as maxjax keeps them
anyway, an optional sliding window (Phi-3-mini: 2047) and optional partial rotary.

Checkpoints ship `qkv_proj` (rows q, k, v) and `gate_up_proj` (rows gate, up); loading regroups their rows
into maxjax's fused layouts (`layers.fuse_qkv`: by KV head; `layers.fuse_gate_up`: gate and up in alternating
blocks), which tensor parallelism can split. GGUF: llama.cpp's `phi3` architecture keeps them fused (`attn_qkv`, and `ffn_up` holding gate and up),
keeps HF's row order (NeoX-style rotary), writes `sliding_window` 0 for "none" and the rotated width as
`rope.dimension_count`. LongRoPE (Phi-3.5, the 128k variants, Phi-4-mini) is not supported yet: those configs are
refused with a clear error when they are read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from maxjax.models import gguf_common
from maxjax.models.config import TransformerConfig
from maxjax.models.layers import fuse_gate_up, fuse_qkv
from maxjax.models.llama import LlamaForCausalLM, with_embeddings

__all__ = ["Phi3ForCausalLM", "config_from_hf", "load_params", "gguf_to_hf_config", "gguf_name_to_hf",
           "gguf_tensor_to_hf"]

_DEFAULTS = {"sliding_window": None, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
"""What transformers' `Phi3Config` assumes for keys a config.json leaves out."""


class Phi3ForCausalLM(LlamaForCausalLM):
    """The Llama model; only the weight names differ."""


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    return TransformerConfig.from_hf(_DEFAULTS | hf)


def load_params(cfg: TransformerConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The model's parameters as a pure dict, from Phi-3's HF tensor names (the fused kernels' rows regrouped)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = np.split(get(p + "self_attn.qkv_proj.weight"), [q_rows, q_rows + kv_rows])
        gate, up = np.split(get(p + "mlp.gate_up_proj.weight"), 2)
        layers[i] = {
            "input_norm": {"weight": get(p + "input_layernorm.weight")},
            "qkv": {"kernel": fuse_qkv(qkv, cfg.num_kv_heads)},
            "o": {"kernel": get(p + "self_attn.o_proj.weight")},
            "post_norm": {"weight": get(p + "post_attention_layernorm.weight")},
            "mlp": {
                "gate_up": {"kernel": fuse_gate_up(gate, up)},
                "down": {"kernel": get(p + "mlp.down_proj.weight")},
            },
        }
    return with_embeddings(cfg, get, layers)


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    return gguf_common.hf_config_from_gguf(metadata, tensor_names, "Phi3ForCausalLM")


gguf_name_to_hf = gguf_common.name_mapper({
    "attn_norm.weight": "input_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
})


def gguf_tensor_to_hf(hf_name: str, w: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    return w
