"""GGUF files as llama.cpp's converter (`convert_hf_to_gguf.py`) writes them, from float32 HF-named weights.

Imports only NumPy and gguf-py, so that both the fixture script (scripts/make_arch_fixtures.py, run with
transformers in a separate environment, which reads every file back with transformers' own GGUF loader) and the
tests (which read it with maxjax) write byte-identical files: the fixture records each file's SHA-256 and the
tests check it before comparing logits.

The conventions followed, per llama.cpp architecture:
- tensor names from gguf-py's `TensorNameMap` (the converter's own table), 2-D tensors stored in the file type,
  1-D tensors (norms, biases) in F32;
- `llama` (Llama, and Mistral, which llama.cpp converts to it): Q/K rows permuted from HF's rotate-half layout to
  interleaved pairs; `rope.dimension_count` = head width; no sliding window;
- `qwen2`, `qwen3`, `phi3`, `gemma3`: HF's row order kept (NeoX-style rotary); `key_length` / `value_length`
  where the config names a `head_dim`;
- `gemma3`: every `*norm.weight` stored with 1 added; the global rotary base as `rope.freq_base`, linear scaling
  as `rope.scaling.*`, `attention.sliding_window`; no output tensor (tied);
- `phi3`: `attn_qkv` and `ffn_up` (gate and up together) fused as HF stores them; `rope.dimension_count` = the
  rotated width; `attention.sliding_window` 0 for none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M}


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, n] (n a multiple of 256) as Q4_K super-blocks, uint8 [rows, n / 256 * 144] (gguf-py reads
    them but has no quantizer): per block of 32 a 6-bit scale and minimum under the super-block's float16 factors
    d and dmin, 4-bit codes; w = d sc q - dmin m. A plain min-max fit, not llama.cpp's search: the tests compare
    the file served different ways, never against the float weights."""
    rows, n = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [super-blocks, blocks, weights]
    lo = np.minimum(x.min(axis=-1), 0)
    scale = (x.max(axis=-1) - lo) / 15
    d = (scale.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-lo.min(axis=-1, keepdims=True) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(-lo, dminf, out=np.zeros_like(lo), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.divide(x + (dminf * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)  # [S, 8, 32]
    packed = np.empty((x.shape[0], 144), np.uint8)
    packed[:, 0:2] = d.view(np.uint8)
    packed[:, 2:4] = dmin.view(np.uint8)
    packed[:, 4:8] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # blocks 2j and 2j + 1 share 32 bytes: low and high nibbles
    packed[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return packed.reshape(rows, n // 256 * 144)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, n] (n a multiple of 256) as Q6_K super-blocks, uint8 [rows, n / 256 * 210]: 6-bit codes
    q (w = d sc (q - 32)) as 128 bytes of low 4 bits and 64 of high 2, an int8 scale per 16 weights under the
    super-block's float16 d. A plain max fit, as `quantize_q4_k`'s."""
    rows, n = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 31  # [S, 16]
    d = (scale.max(axis=-1, keepdims=True) / 127).astype(np.float16)
    df = d.astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.clip(np.rint(np.divide(x, step, out=np.zeros_like(x), where=step > 0)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [S, group, s, l]: block 4 group + s, value l
    packed = np.empty((x.shape[0], 210), np.uint8)
    low = q & 0x0F
    packed[:, :128] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    packed[:, 128:192] = np.bitwise_or.reduce(((q >> 4) & 3) << shifts, axis=2).reshape(-1, 64)
    packed[:, 192:208] = sc.view(np.uint8)
    packed[:, 208:210] = d.view(np.uint8)
    return packed.reshape(rows, n // 256 * 210)


def quantize(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A 2-D tensor in `qtype` (a K-quant where its rows are whole super-blocks, else Q8_0, as llama.cpp falls
    back), a 1-D one in F32."""
    if w.ndim != 2:
        return gguf.quants.quantize(w, Q.F32), Q.F32
    if qtype in (Q.Q4_K, Q.Q6_K):
        if w.shape[1] % 256 == 0:
            return (quantize_q4_k(w) if qtype == Q.Q4_K else quantize_q6_k(w)), qtype
        qtype = Q.Q8_0
    return gguf.quants.quantize(w, qtype), qtype
ARCHES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's `bytes_to_unicode`: the printable character that spells each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = [*SPECIAL_TOKENS, *_gpt2_byte_alphabet(), "he"]
"""A byte-level vocabulary of 260: three control tokens, the 256 bytes, one merge."""
TOKENIZER_METADATA: dict[str, Any] = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "default",
    "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.token_type": [3] * len(SPECIAL_TOKENS) + [1] * 257,  # 3: control, 1: normal
    "tokenizer.ggml.merges": ["h e"],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.padding_token_id": 0,
    "tokenizer.ggml.add_bos_token": False,
}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF's rotate-half rows of each head -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def write_gguf(
    path: Path, arch: str, config: dict[str, Any], weights: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType,
    *, name: str = "tiny", q6_k: tuple[str, ...] = (), tokenizer: dict[str, Any] | None = None,
) -> str:
    """Write `weights` (float32, HF names of a text model) as llama.cpp's `arch`; returns the file's SHA-256.
    Tensors whose names end with one of `q6_k` are stored as Q6_K (as a Q4_K_M file stores some). `tokenizer`:
    `TOKENIZER_METADATA`'s keys with other values (default: it)."""
    cfg = text_config(config)
    n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    rope = cfg.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(int(FILE_TYPES[qtype]))
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    if arch == "gemma3":
        full = rope.get("full_attention", {})
        writer.add_rope_freq_base(full.get("rope_theta", 1_000_000.0))
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        writer.add_sliding_window(cfg["sliding_window"])
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    else:
        writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // n_heads)
        writer.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]))
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
    if cfg.get("head_dim") is not None and arch in ("qwen3", "gemma3", "llama"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    meta = TOKENIZER_METADATA if tokenizer is None else tokenizer
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])

    names = gguf.get_tensor_name_map(ARCHES[arch], n_layers)
    for hf_name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, n_heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, n_kv)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + 1
        if arch == "gemma3" and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp skips it
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"gguf-py has no {arch} name for {hf_name}"
        data, stored = quantize(w, Q.Q6_K if hf_name.endswith(q6_k) and q6_k else qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


MMPROJ_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
                     Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def mmproj_storage(gguf_name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type llama.cpp's converter stores a Gemma 3 mmproj tensor in (`Gemma3VisionModel.tensor_force_quant`,
    then `ModelBase.prepare_tensors`): the projection F16, the embeddings F32, vectors and norms F32, the other
    matrices in the file type, F16 where their rows are not whole blocks of it."""
    if gguf_name.startswith("mm.input_projection"):
        return Q.F16
    if gguf_name.startswith(("v.patch_embd", "v.position_embd")) or w.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def write_mmproj(
    path: Path, config: dict[str, Any], preprocessor: dict[str, Any], weights: dict[str, np.ndarray],
    qtype: gguf.GGMLQuantizationType = Q.F16, *, projector_type: str = "gemma3", skip: tuple[str, ...] = (),
) -> str:
    """Write the vision tower and projector of a `Gemma3ForConditionalGeneration` (`weights`: float32, named
    `vision_tower.X` and `multi_modal_projector.X` as `gemma3_vision.vision_name_to_hf` gives them)
    as llama.cpp's `convert_hf_to_gguf.py --mmproj` does (`MmprojModel`, `Gemma3VisionModel`); returns the
    file's SHA-256. `projector_type` and `skip` (llama.cpp tensor names left out) make broken files for tests.

    As the converter: `clip.vision.projector.scale_factor` from preprocessor_config.json's `image_seq_length`
    (256 where absent), written only when it is not 4; `_weight` renamed `.weight`; the soft-token norm stored
    with 1 added; names from gguf-py's `TensorNameMap` for `MODEL_ARCH.MMPROJ`; types from `mmproj_storage`."""
    vision = config["vision_config"]
    n_layers = vision["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name("tiny")
    writer.add_file_type(int(MMPROJ_FILE_TYPES[qtype]))
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(text_config(config)["hidden_size"])
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(n_layers)
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(preprocessor["image_mean"])
    writer.add_vision_image_std(preprocessor["image_std"])
    writer.add_clip_projector_type(projector_type)
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    writer.add_vision_use_gelu(True)
    per_side = int(preprocessor.get("image_seq_length", 256) ** 0.5)
    scale = (vision["image_size"] // vision["patch_size"]) // per_side
    if scale > 0 and scale != 4:
        writer.add_vision_projector_scale_factor(scale)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layers)
    for hf_name, w in weights.items():
        if not hf_name.startswith(("vision_tower.", "multi_modal_projector.")) or ".head." in hf_name:
            continue
        # the converter reads the Hub's names (`vision_tower.vision_model.`), which gguf-py's table knows
        name = hf_name.replace("vision_tower.", "vision_tower.vision_model.", 1).replace("_weight", ".weight")
        w = np.asarray(w, dtype=np.float32)
        if "soft_emb_norm.weight" in name:
            w = w + 1
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"gguf-py has no mmproj name for {hf_name}"
        if gguf_name in skip:
            continue
        stored = mmproj_storage(gguf_name, w, qtype)
        writer.add_tensor(gguf_name, gguf.quants.quantize(w, stored), raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()
