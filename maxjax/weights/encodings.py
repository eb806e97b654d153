"""Names of weight encodings, and how to read them off GGUF files and Hugging Face configs.

An encoding names how a model's large weights are stored: a float type (`float32`, `bfloat16`, `float16`) or a
block quantization (`q4_k`, `q8_0`, ...). We use MAX's names where MAX has one and llama.cpp's type names,
lower-cased, otherwise, so `--quantization-encoding` reads the same as with `max serve`.

The GGUF numbers below are file-format facts (the `general.file_type` key holds a llama.cpp `llama_ftype`, each
tensor a `ggml_type`). They are written out here rather than imported from gguf-py so that the CLI can list and
validate encodings without importing gguf-py (and numpy) first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from maxjax.errors import UserError

FLOAT_ENCODINGS: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Encodings a model can be served in by dequantizing or casting whatever the file holds."""
IN_BLOCKS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
"""Block types the devices multiply without dequantizing them first (`kernels/quant.KINDS`): a GGUF's tensors of
these stay in them."""
QUANTIZE_AT_LOAD: tuple[str, ...] = ("q8_0", "q4_0", "q4_1")
"""Those a float checkpoint can be quantized to at load (`--quantization-encoding q8_0`; gguf-py's quantizers)."""

# llama_ftype -> encoding. The K-quant "mixes" (_S/_M/_L) differ only in which tensors get a bigger type; the
# bulk of the weights share one type, which is what the encoding names (as MAX's `q4_k` covers Q4_K_M).
_GGUF_FILE_TYPES: dict[int, str] = {
    0: "float32",
    1: "float16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    11: "q3_k",  # Q3_K_S
    12: "q3_k",  # Q3_K_M
    13: "q3_k",  # Q3_K_L
    14: "q4_k",  # Q4_K_S
    15: "q4_k",  # Q4_K_M
    16: "q5_k",  # Q5_K_S
    17: "q5_k",  # Q5_K_M
    18: "q6_k",
    19: "iq2_xxs",
    20: "iq2_xs",
    21: "q2_k",  # Q2_K_S
    22: "iq3_xs",
    23: "iq3_xxs",
    24: "iq1_s",
    25: "iq4_nl",
    26: "iq3_s",
    27: "iq3_m",
    28: "iq2_s",
    29: "iq2_m",
    30: "iq4_xs",
    31: "iq1_m",
    32: "bfloat16",
    36: "tq1_0",
    37: "tq2_0",
    38: "mxfp4_moe",
    39: "nvfp4",
    40: "q1_0",
}
_GGUF_FILE_TYPE_GUESSED = 1024  # llama.cpp ORs this in when it inferred the type instead of being told

# ggml_type -> the encoding of one tensor.
_GGML_TYPES: dict[int, str] = {
    0: "float32",
    1: "float16",
    2: "q4_0",
    3: "q4_1",
    6: "q5_0",
    7: "q5_1",
    8: "q8_0",
    9: "q8_1",
    10: "q2_k",
    11: "q3_k",
    12: "q4_k",
    13: "q5_k",
    14: "q6_k",
    15: "q8_k",
    16: "iq2_xxs",
    17: "iq2_xs",
    18: "iq3_xxs",
    19: "iq1_s",
    20: "iq4_nl",
    21: "iq3_s",
    22: "iq2_s",
    23: "iq4_xs",
    24: "int8",
    25: "int16",
    26: "int32",
    27: "int64",
    28: "float64",
    29: "iq1_m",
    30: "bfloat16",
    34: "tq1_0",
    35: "tq2_0",
    39: "mxfp4",
    40: "nvfp4",
    41: "q1_0",
}
_UNQUANTIZED_TENSOR_TYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64"}
)

KNOWN_ENCODINGS: tuple[str, ...] = tuple(
    dict.fromkeys([*FLOAT_ENCODINGS, *_GGUF_FILE_TYPES.values(), "float8_e4m3fn", "gptq", "awq"])
)
"""Every encoding name maxjax knows; whether a model supports one is the model registry's business."""

# What users type for the same thing: llama.cpp's mix names, short float names.
_ALIASES: dict[str, str] = {
    "f32": "float32",
    "fp32": "float32",
    "float": "float32",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "q2_k_s": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "fp8": "float8_e4m3fn",
}

# safetensors header dtype -> encoding, for checkpoints whose config.json does not say.
_SAFETENSORS_DTYPES: dict[str, str] = {
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
}


def is_float(encoding: str) -> bool:
    """Whether `encoding` is a float type the weights can be dequantized or cast to at load."""
    return encoding in FLOAT_ENCODINGS


def normalize(name: str) -> str:
    """The canonical name for what a user typed (`Q4_K_M` -> `q4_k`, `bf16` -> `bfloat16`).

    Raises UserError for a name maxjax does not know, listing the ones it does.
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in KNOWN_ENCODINGS:
        raise UserError(f"unknown quantization encoding {name!r}: use one of {', '.join(KNOWN_ENCODINGS)}")
    return key


def from_gguf_file_type(file_type: int) -> str | None:
    """The encoding a GGUF `general.file_type` value names, or None for a value we do not know."""
    return _GGUF_FILE_TYPES.get(int(file_type) & ~_GGUF_FILE_TYPE_GUESSED)


def from_ggml_type(ggml_type: int) -> str:
    """The encoding of one GGUF tensor, from its `ggml_type` number (gguf-py's GGMLQuantizationType)."""
    return _GGML_TYPES.get(int(ggml_type), f"ggml_type_{int(ggml_type)}")


def infer_gguf_encoding(tensors: Iterable[tuple[int, int]]) -> str:
    """The encoding of a GGUF file without `general.file_type`, from its tensors' `(ggml_type, n_dims)`.

    llama.cpp keeps 1-D tensors (norms, biases) in float32 whatever the file type, so only matrices vote: the
    most common quantized type wins; a file with no quantized matrix is named by its most common float type.
    """
    votes = Counter(from_ggml_type(ggml_type) for ggml_type, n_dims in tensors if n_dims >= 2)
    quantized = Counter({name: n for name, n in votes.items() if name not in _UNQUANTIZED_TENSOR_TYPES})
    for counter in (quantized, votes):
        if counter:
            return counter.most_common(1)[0][0]
    return "float32"


def from_hf_config(config: Mapping[str, Any]) -> str | None:
    """The encoding a Hugging Face config.json declares, or None when it does not say.

    A `quantization_config` (GPTQ, AWQ, FP8 checkpoints) takes precedence over the dtype, which then only names
    the type of the unquantized parts. transformers 5 writes `dtype`; older configs write `torch_dtype`, at the
    top level or, for multimodal configs, under `text_config`.
    """
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping) and isinstance(quant.get("quant_method"), str):
        method = quant["quant_method"].lower()
        return _ALIASES.get(method, method)
    for source in (config, config.get("text_config")):
        if not isinstance(source, Mapping):
            continue
        dtype = source.get("dtype") or source.get("torch_dtype")
        if isinstance(dtype, str) and dtype != "auto":
            key = dtype.lower().removeprefix("torch.")
            return _ALIASES.get(key, key)
    return None


def from_safetensors_dtypes(dtypes: Iterable[str]) -> str:
    """The encoding of a checkpoint whose config does not say, from its tensors' safetensors dtypes
    (`F32`, `BF16`, ...): the most common float dtype, since integer tensors are buffers, not weights."""
    votes = Counter(_SAFETENSORS_DTYPES[d] for d in dtypes if d in _SAFETENSORS_DTYPES)
    return votes.most_common(1)[0][0] if votes else "float32"
