"""`SupportedArchitecture` and the registry of architectures maxjax can serve.

An architecture is one file under `maxjax/models/` plus one entry here. The runner and the loader never name
a model: they look the entry up by the HF `architectures[0]` name (or, for GGUF files, by
`general.architecture`) and call what it provides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from maxjax.errors import UserError


@dataclass(frozen=True)
class SupportedArchitecture:
    name: str
    """The HF `architectures[0]` value, e.g. 'LlamaForCausalLM'."""
    example_repo_ids: tuple[str, ...]
    default_encoding: str
    supported_encodings: tuple[str, ...]
    model_class: Callable[..., Any]
    """Flax NNX module class, built as `model_class(config, dtype)`."""
    load_params: Callable[[Any, Callable[[str], np.ndarray]], dict[str, Any]]
    """(config, get HF-named tensor) -> the module's parameters as a pure dict."""
    gguf_architectures: tuple[str, ...] = ()
    """`general.architecture` values of GGUF files this entry reads."""
    gguf_to_hf_config: Callable[[Mapping[str, Any], set[str]], dict[str, Any]] | None = None
    """(GGUF metadata, tensor names) -> an HF-style config dict."""
    gguf_name_to_hf: Callable[[str], str | None] | None = None
    """llama.cpp tensor name -> HF tensor name (None: the model does not use it)."""
    gguf_tensor_to_hf: Callable[[str, np.ndarray, Mapping[str, Any]], np.ndarray] | None = None
    """Undo llama.cpp's conversion of one tensor (e.g. the Q/K row order), given its HF name and config."""


def _builtin() -> list[SupportedArchitecture]:
    from maxjax.models import llama

    return [
        SupportedArchitecture(
            name="LlamaForCausalLM",
            example_repo_ids=(
                "HuggingFaceTB/SmolLM2-135M-Instruct",
                "meta-llama/Llama-3.1-8B-Instruct",
                "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            ),
            default_encoding="bfloat16",
            supported_encodings=(
                "float32", "bfloat16", "float16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
            ),
            model_class=llama.LlamaForCausalLM,
            load_params=llama.load_params,
            gguf_architectures=("llama",),
            gguf_to_hf_config=llama.gguf_to_hf_config,
            gguf_name_to_hf=llama.gguf_name_to_hf,
            gguf_tensor_to_hf=llama.gguf_tensor_to_hf,
        )
    ]


class Registry:
    def __init__(self, architectures: list[SupportedArchitecture]):
        self._by_name: dict[str, SupportedArchitecture] = {}
        for arch in architectures:
            self.register(arch)

    def register(self, arch: SupportedArchitecture) -> None:
        """Add `arch`, replacing a registered one of the same name."""
        self._by_name[arch.name] = arch

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> SupportedArchitecture:
        if name not in self._by_name:
            raise UserError(f"architecture {name} is not supported: supported are {', '.join(self.names())}")
        return self._by_name[name]

    def for_gguf(self, gguf_arch: str) -> SupportedArchitecture:
        for arch in self._by_name.values():
            if gguf_arch in arch.gguf_architectures:
                return arch
        known = sorted({a for arch in self._by_name.values() for a in arch.gguf_architectures})
        raise UserError(f"GGUF architecture {gguf_arch!r} is not supported: supported are {', '.join(known)}")


def default_registry() -> Registry:
    return Registry(_builtin())
