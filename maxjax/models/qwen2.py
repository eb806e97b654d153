"""Qwen2 and Qwen2.5: the Llama block with biases on the Q/K/V projections (always there, never in the config).

Sliding-window attention exists in the config format (`use_sliding_window`, applied to layers from
`max_window_layers` on) but no released checkpoint turns it on; it is honoured the way transformers does.
GGUF: llama.cpp's `qwen2` architecture keeps HF's Q/K row order (NeoX-style rotary), so only names change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from maxjax.models import gguf_common
from maxjax.models.config import TransformerConfig
from maxjax.models.llama import LlamaForCausalLM, load_params

__all__ = ["Qwen2ForCausalLM", "config_from_hf", "load_params", "gguf_to_hf_config", "gguf_name_to_hf",
           "gguf_tensor_to_hf"]


class Qwen2ForCausalLM(LlamaForCausalLM):
    """The Llama model with `attention_bias` set."""


def sliding_layers(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Qwen's window switches: `use_sliding_window` (off: no window) and `max_window_layers` (the first layers
    stay full), turned into `sliding_window` + `layer_types` as transformers 5 does."""
    if not hf.get("use_sliding_window", False):
        return {"sliding_window": None, "layer_types": None}
    if hf.get("layer_types"):
        return {}
    first = int(hf.get("max_window_layers", 28))
    return {"layer_types": ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]}


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    hf = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0} | hf
    hf = hf | sliding_layers(hf, int(hf.get("num_hidden_layers", 0)))
    return dataclasses.replace(TransformerConfig.from_hf(hf), attention_bias=True)


def gguf_to_hf_config(metadata: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    return gguf_common.hf_config_from_gguf(metadata, tensor_names, "Qwen2ForCausalLM")


gguf_name_to_hf = gguf_common.name_mapper(gguf_common.LLAMA_LAYER_NAMES)


def gguf_tensor_to_hf(hf_name: str, w: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    return w
