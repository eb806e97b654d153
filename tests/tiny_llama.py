"""A tiny random Llama, written the way real checkpoints are: an HF directory and llama.cpp-style GGUF files.

The weights are float32 NumPy arrays with Hugging Face names. `write_llama_gguf` stores them as llama.cpp's
converter does (its tensor names, from gguf-py's own name map; Q/K rows permuted; `llama.*` metadata; 1-D
tensors kept in float32 whatever the file type; a byte-level gpt2 tokenizer), so the loader meets what it
meets in the wild. `reference_logits` is an independent NumPy forward pass of the HF model, the ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import safetensors.numpy

from maxjax.models.llama import gguf_name_to_hf, permute_qk
from maxjax.tokenizer_gguf import load_gguf_tokenizer

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 260,
    "hidden_size": 64,  # every matrix row is a whole number of 32-element quantization blocks
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

# llama_ftype (general.file_type) of a file whose matrices are all of one GGML type.
FILE_TYPES: dict[gguf.GGMLQuantizationType, gguf.LlamaFileType] = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}


def random_weights(seed: int = 0, config: dict[str, Any] = CONFIG) -> dict[str, np.ndarray]:
    """float32 weights with HF names: matrices with unit-variance outputs, norms around 1 with spread."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, k, e = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": matrix(h * e, d),
            p + "self_attn.k_proj.weight": matrix(k * e, d),
            p + "self_attn.v_proj.weight": matrix(k * e, d),
            p + "self_attn.o_proj.weight": matrix(d, h * e),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": matrix(f, d),
            p + "mlp.up_proj.weight": matrix(f, d),
            p + "mlp.down_proj.weight": matrix(d, f),
        }
    weights["model.norm.weight"] = norm()
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = matrix(v, d)
    return weights


# ---- the tokenizer: GPT-2's byte-level alphabet, three ChatML control tokens and one merge ---------------


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's `bytes_to_unicode`: the printable character that spells each byte, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_METADATA: dict[str, Any] = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "default",
    "tokenizer.ggml.tokens": [*SPECIAL_TOKENS, *_gpt2_byte_alphabet(), "he"],
    "tokenizer.ggml.token_type": [3] * len(SPECIAL_TOKENS) + [1] * 257,  # 3: control, 1: normal
    "tokenizer.ggml.merges": ["h e"],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.add_bos_token": False,
}
assert len(TOKENIZER_METADATA["tokenizer.ggml.tokens"]) == CONFIG["vocab_size"]


# ---- writers --------------------------------------------------------------------------------------------


def write_hf_checkpoint(
    folder: Path, weights: dict[str, np.ndarray], config: dict[str, Any] = CONFIG
) -> Path:
    """config.json, model.safetensors (float32) and a tokenizer.json with the GGUF files' vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.numpy.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    load_gguf_tokenizer(TOKENIZER_METADATA).backend.save(str(folder / "tokenizer.json"))
    return folder


def gguf_tensor_name(hf_name: str, num_layers: int) -> str:
    """llama.cpp's name for an HF tensor, from gguf-py's map (the converter's), checked against maxjax's."""
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers).get_name(
        hf_name, try_suffixes=(".weight", ".bias")
    )
    assert name is not None and gguf_name_to_hf(name) == hf_name, (hf_name, name)
    return name


def write_llama_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    qtype: gguf.GGMLQuantizationType,
    config: dict[str, Any] = CONFIG,
    *,
    arch: str = "llama",
    omit_keys: Collection[str] = (),
) -> Path:
    """A GGUF file as llama.cpp's converter writes one: every matrix stored as `qtype`, 1-D tensors as F32.

    `arch` and `omit_keys` (metadata keys left out) make broken files for the error tests."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_file_type(int(FILE_TYPES[qtype]))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    meta = TOKENIZER_METADATA
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    for hf_name, w in weights.items():
        if hf_name.endswith("q_proj.weight"):
            w = permute_qk(w, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = permute_qk(w, config["num_key_value_heads"])
        stored = qtype if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        name = gguf_tensor_name(hf_name, config["num_hidden_layers"])
        writer.add_tensor(name, gguf.quants.quantize(w, stored), raw_dtype=stored)
    for key in omit_keys:
        del writer.kv_data[0][key]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- the reference: Hugging Face's Llama forward pass, in NumPy ------------------------------------------


def reference_logits(
    weights: dict[str, np.ndarray], tokens: np.ndarray, config: dict[str, Any] = CONFIG
) -> np.ndarray:
    """tokens [T] -> logits [T, V] in float64, as transformers' LlamaForCausalLM computes them (rotate-half
    RoPE, grouped-query causal attention, SiLU-gated MLP, RMSNorm)."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    h, k, e = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps = config["rms_norm_eps"]
    t = len(tokens)

    def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    inv_freq = config["rope_theta"] ** (-np.arange(0, e, 2) / e)  # [E/2]
    angles = np.arange(t)[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]  # [T, 1, E]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]

    def rope(x: np.ndarray) -> np.ndarray:  # x [T, heads, E]
        rotated = np.concatenate([-x[..., e // 2 :], x[..., : e // 2]], axis=-1)
        return x * cos + rotated * sin

    causal = np.tril(np.ones((t, t), dtype=bool))
    x = w["model.embed_tokens.weight"][tokens]  # [T, D]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, w[p + "input_layernorm.weight"])
        q = rope((y @ w[p + "self_attn.q_proj.weight"].T).reshape(t, h, e))
        kk = rope((y @ w[p + "self_attn.k_proj.weight"].T).reshape(t, k, e))
        v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(t, k, e)
        kk, v = np.repeat(kk, h // k, axis=1), np.repeat(v, h // k, axis=1)  # [T, H, E]
        scores = np.einsum("qhe,khe->hqk", q, kk) / np.sqrt(e)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khe->qhe", probs, v).reshape(t, h * e)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T
