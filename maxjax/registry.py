"""`SupportedArchitecture` and the registry of architectures maxjax can serve.

An architecture is one file under `maxjax/models/` plus one entry here. The runner and the loader never name
a model: they look the entry up by the HF `architectures[0]` name (or, for GGUF files, by
`general.architecture`) and call what it provides. `--custom-architectures` modules (`maxjax/custom.py`) add
entries of their own, replacing built-ins of the same name.
"""

from __future__ import annotations

import importlib
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
    """Flax NNX module class, built as `model_class(config, dtype)`, with `forward(tokens, cache, page_table,
    past_len) -> (hidden, new_k, new_v)`, `logits(hidden)` and its token table as `embed`, a `layers.Embedding`
    (see `models/llama.py`)."""
    load_params: Callable[[Any, Callable[[str], np.ndarray]], dict[str, Any]]
    """(config, get HF-named tensor) -> the module's parameters as a pure dict."""
    config_from_hf: Callable[[dict[str, Any]], Any] | None = None
    """HF config dict (config.json, or `gguf_to_hf_config`'s) -> the model's config; None:
    `TransformerConfig.from_hf`."""
    weight_name_to_hf: Callable[[str], str | None] | None = None
    """Checkpoint tensor name -> the name `load_params` asks for (None: not used), for checkpoints that store
    the language model under a prefix (Gemma 3's `language_model.model.*`); None: names are used as stored."""
    gguf_architectures: tuple[str, ...] = ()
    """`general.architecture` values of GGUF files this entry reads."""
    gguf_to_hf_config: Callable[[Mapping[str, Any], set[str]], dict[str, Any]] | None = None
    """(GGUF metadata, tensor names) -> an HF-style config dict."""
    gguf_name_to_hf: Callable[[str], str | None] | None = None
    """llama.cpp tensor name -> HF tensor name (None: the model does not use it)."""
    gguf_tensor_to_hf: Callable[[str, np.ndarray, Mapping[str, Any]], np.ndarray] | None = None
    """Undo llama.cpp's conversion of one tensor (e.g. the Q/K row order), given its HF name and config."""
    open_vision: Callable[..., Any] | None = None
    """For a model that can take images: (checkpoint folder or None, HF config or None, mmproj GGUF or None,
    tokenizer) -> its vision checkpoint (`config`, `processing`, `build(dtype)` -> the module the runner calls
    as `model.vision`), or None where the files hold no vision tower (`models/gemma3_vision.py`)."""


GGUF_ENCODINGS = (
    "float32", "bfloat16", "float16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
)
"""Safetensors float types, and every GGUF storage type the loader dequantizes."""
FLOAT_ENCODINGS = ("float32", "bfloat16", "float16")


class _Lazy:
    """`maxjax.models.<module>.<name>`, imported at its first call: the built-in entries can be listed and looked
    up, and a model's files checked, before JAX (which every model module imports) is."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"maxjax.models.{self.module}"), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"maxjax.models.{self.module}.{self.name}"


def _builtin() -> list[SupportedArchitecture]:
    def entry(name: str, module: str, model_class: str, examples: tuple[str, ...], gguf: str | None,
              **extra: Any) -> SupportedArchitecture:
        adapters: dict[str, Any] = {}
        if gguf is not None:
            adapters = dict(gguf_architectures=(gguf,), gguf_to_hf_config=_Lazy(module, "gguf_to_hf_config"),
                            gguf_name_to_hf=_Lazy(module, "gguf_name_to_hf"),
                            gguf_tensor_to_hf=_Lazy(module, "gguf_tensor_to_hf"))
        return SupportedArchitecture(
            name=name, example_repo_ids=examples, default_encoding="bfloat16",
            supported_encodings=GGUF_ENCODINGS if gguf is not None else FLOAT_ENCODINGS,
            model_class=_Lazy(module, model_class), load_params=_Lazy(module, "load_params"),
            config_from_hf=_Lazy(module, "config_from_hf"), **adapters, **extra,
        )

    return [
        entry("LlamaForCausalLM", "llama", "LlamaForCausalLM", (
            "HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        ), "llama"),
        # llama.cpp converts Mistral to its `llama` architecture: those GGUF files are the Llama entry's.
        entry("MistralForCausalLM", "mistral", "MistralForCausalLM", (
            "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-Nemo-Instruct-2407",
        ), None),
        entry("Qwen2ForCausalLM", "qwen2", "Qwen2ForCausalLM", (
            "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct",
        ), "qwen2"),
        entry("Qwen3ForCausalLM", "qwen3", "Qwen3ForCausalLM", ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B"), "qwen3"),
        # A `gemma3` GGUF takes images where llama.cpp's mmproj file is given (or found beside it).
        entry("Gemma3ForCausalLM", "gemma3", "Gemma3ForCausalLM", ("google/gemma-3-1b-it",), "gemma3",
              open_vision=_Lazy("gemma3_vision", "open_vision")),
        # The multimodal checkpoints: the text model, and the vision tower beside it (`model.vision`); their GGUF
        # conversions are `gemma3` files (above).
        entry("Gemma3ForConditionalGeneration", "gemma3", "Gemma3ForCausalLM", (
            "google/gemma-3-12b-it", "google/gemma-3-4b-it", "google/gemma-3-27b-it",
        ), None, weight_name_to_hf=_Lazy("gemma3", "multimodal_name_to_hf"),
              open_vision=_Lazy("gemma3_vision", "open_vision")),
        entry("Phi3ForCausalLM", "phi3", "Phi3ForCausalLM", (
            "microsoft/Phi-3-mini-4k-instruct", "microsoft/phi-4",
        ), "phi3"),
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
            raise UserError(
                f"architecture {name} is not supported: supported are {', '.join(self.names())} "
                "(`max list`; add one with --custom-architectures)"
            )
        return self._by_name[name]

    def for_gguf(self, gguf_arch: str) -> SupportedArchitecture:
        for arch in self._by_name.values():
            if gguf_arch in arch.gguf_architectures:
                return arch
        known = sorted({a for arch in self._by_name.values() for a in arch.gguf_architectures})
        raise UserError(f"GGUF architecture {gguf_arch!r} is not supported: supported are {', '.join(known)}")


def default_registry() -> Registry:
    return Registry(_builtin())
