"""Qwen3 (dense): the Llama block with an RMS norm over each head's queries and keys before the rotary
embedding, no Q/K/V biases, and a head width of its own (`head_dim`, not hidden / heads).

GGUF: llama.cpp's `qwen3` architecture keeps HF's Q/K row order; the norms are `attn_q_norm` / `attn_k_norm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from maxjax.models import gguf_common
from maxjax.models.config import TransformerConfig
from maxjax.models.llama import LlamaForCausalLM, load_params
from maxjax.models.qwen2 import sliding_layers

__all__ = ["Qwen3ForCausalLM", "config_from_hf", "load_params", "gguf_to_hf_config", "gguf_name_to_hf",
           "gguf_tensor_to_hf"]

_DEFAULTS = {"head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
"""What transformers' `Qwen3Config` assumes for keys a config.json leaves out."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """The Llama model with `qk_norm` set."""


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    hf = _DEFAULTS | hf
    hf = hf | sliding_layers(hf, int(hf.get("num_hidden_layers", 0)))
    return dataclasses.replace(TransformerConfig.from_hf(hf), qk_norm=True)


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    hf = gguf_common.hf_config_from_gguf(metadata, tensor_names, "Qwen3ForCausalLM")
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return hf


gguf_name_to_hf = gguf_common.name_mapper(
    gguf_common.LLAMA_LAYER_NAMES
    | {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
)


def gguf_tensor_to_hf(hf_name: str, w: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    return w
