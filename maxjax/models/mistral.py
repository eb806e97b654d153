"""Mistral (Mistral-7B v0.1-v0.3, Mistral-Nemo, Ministral-style configs without alternating layers): the Llama
block with sliding-window attention.

Each layer attends to the last `sliding_window` positions (HF's `MistralConfig` defaults to 4096 when a config
leaves the key out; v0.2 and later set it to null: full attention). llama.cpp converts Mistral checkpoints to
its `llama` architecture, which has no window, so Mistral GGUF files are served by the Llama entry.
"""

from __future__ import annotations

from typing import Any

from maxjax.models.config import TransformerConfig
from maxjax.models.llama import LlamaForCausalLM, load_params

__all__ = ["MistralForCausalLM", "config_from_hf", "load_params"]

_DEFAULTS = {"sliding_window": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
"""What transformers' `MistralConfig` assumes for keys a config.json leaves out."""


class MistralForCausalLM(LlamaForCausalLM):
    """The Llama model; the window comes from `TransformerConfig.sliding_window` (every layer slides)."""


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    return TransformerConfig.from_hf(_DEFAULTS | hf)
