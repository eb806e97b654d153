"""What the architectures' GGUF adapters share: llama.cpp's metadata keys read into an HF-style config dict, and
llama.cpp's tensor names mapped back to Hugging Face's.

llama.cpp's converter (`convert_hf_to_gguf.py`) writes `{arch}.*` keys (`llama.block_count`,
`gemma3.attention.sliding_window`, ...) and renames tensors (`model.layers.0.self_attn.q_proj.weight` ->
`blk.0.attn_q.weight`). Each architecture file starts from `hf_config_from_gguf` and adds what its family's
converter writes or hard-codes; the name tables below are those of gguf-py's `TensorNameMap`, kept here so that
loading never depends on gguf-py's table (the tests check the two against each other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
"""Tensors outside the blocks, the same in every family here."""

LLAMA_LAYER_NAMES = {
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
"""`blk.N.<name>` -> `model.layers.N.<name>` for Llama-shaped blocks (Llama, Mistral, Qwen2; Qwen3 adds norms)."""

_REQUIRED = ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")


def name_mapper(layer_names: Mapping[str, str], global_names: Mapping[str, str] = GLOBAL_NAMES) -> Callable[
    [str], str | None
]:
    """A `gguf_name_to_hf` for these tables: None for tensors the model does not use (e.g. `rope_freqs`)."""

    def to_hf(name: str) -> str | None:
        if name in global_names:
            return global_names[name]
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if rest in layer_names:
                return f"model.layers.{index}.{layer_names[rest]}"
        return None

    return to_hf


def hf_config_from_gguf(metadata: Mapping[str, Any], tensor_names: set[str], architecture: str) -> dict[str, Any]:
    """The keys every family's converter writes, as an HF config dict naming `architecture`.

    Raises KeyError naming a required key that is missing (the loader turns it into one clear error)."""
    arch = metadata["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None and name in _REQUIRED:
            raise KeyError(f"{arch}.{name}")
        return value

    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    n_kv = key("attention.head_count_kv", n_heads)
    vocab = key("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    # key_length is the head width where it is written; rope.dimension_count is the rotated width, which is
    # smaller under partial rotary (Phi-4-mini), and the only one Llama files carry.
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // n_heads)
    rope_dim = key("rope.dimension_count")
    window = key("attention.sliding_window")
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "sliding_window": int(window) if window else None,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if rope_dim and int(rope_dim) != head_dim:
        hf["partial_rotary_factor"] = int(rope_dim) / head_dim
    scaling = key("rope.scaling.type")
    if scaling and scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor", 1.0))}
    if key("final_logit_softcapping") is not None:
        hf["final_logit_softcapping"] = float(key("final_logit_softcapping"))
    if key("attn_logit_softcapping") is not None:
        hf["attn_logit_softcapping"] = float(key("attn_logit_softcapping"))
    return hf
