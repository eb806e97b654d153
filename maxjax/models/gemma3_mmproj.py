"""Gemma 3's vision tower and projector from llama.cpp's split `mmproj` GGUF file, for GGUF Gemma 3 models.

What llama.cpp's converter (`convert_hf_to_gguf.py --mmproj`, class `Gemma3VisionModel`) writes, and how it maps
back onto `gemma3_vision`'s Hugging Face names:

- metadata: `clip.projector_type` "gemma3"; `clip.vision.{image_size, patch_size, embedding_length,
  feed_forward_length, block_count, projection_dim}`, `clip.vision.attention.{head_count, layer_norm_epsilon}`,
  `clip.vision.image_{mean,std}` (from preprocessor_config.json), `clip.use_gelu` true;
  `clip.vision.projector.scale_factor`, the pooling kernel (patches per side / soft tokens per side), only when
  it is not 4, which every Gemma 3 on the Hub uses (a 64 x 64 patch grid pooled to 16 x 16 = 256 soft tokens),
  so `mm_tokens_per_image` = (patches per side / scale factor)^2, as llama.cpp's clip.cpp computes it. Floats are
  stored as float32 and read back as the shortest decimal that rounds to the same float32 (1e-06, not
  9.99999997e-07), so that they equal what config.json says.
- tensors: `v.patch_embd.{weight,bias}` (the convolution [Dv, C, p, p] as HF stores it), `v.position_embd.weight`
  [P, Dv], per layer `v.blk.N.{ln1, ln2, attn_q, attn_k, attn_v, attn_out, ffn_up, ffn_down}.{weight,bias}` (SigLIP's
  layer_norm1, layer_norm2, q/k/v/out_proj, mlp.fc1, mlp.fc2), `v.post_ln.{weight,bias}`, `mm.soft_emb_norm.weight`
  and `mm.input_projection.weight` [Dv, Dt] (HF's `mm_input_projection_weight`, x @ W, untransposed; clip.cpp
  transposes it at use). Matrices keep HF's orientation (GGUF lists dimensions the other way round; `GGUFFile`
  reverses them back). The converter adds 1 to `soft_emb_norm` (Gemma's RMS norm scales by 1 + weight; clip.cpp's
  by the weight), and only to it: SigLIP's LayerNorms are stored as they are. We subtract the 1 again.
- storage: the embeddings (`v.patch_embd`, `v.position_embd`) F32, `mm.input_projection` F16, vectors and norms
  F32, the other matrices in the file's type (F16, Q8_0, ...; F16 where a row is not whole blocks of it, as SigLIP
  so400m's 4304-wide `ffn_down`); `GGUFFile` dequantizes each to float32.

Three things an mmproj file does not say: the text model's image placeholder, start-of-image and end-of-image
tokens. `open_checkpoint` asks the GGUF model's tokenizer for `<image_soft_token>`, `<start_of_image>` and
`<end_of_image>` (`image_token_ids` looks in its vocabulary list); those it does not name take Gemma 3's ids, and
where those are past the end of its vocabulary, the model is not one that takes images (a UserError). llama.cpp
writes no metadata for them: its own runtime spells the markers as text and hands the soft tokens over directly.

`open_checkpoint` is what the pipeline calls (through `gemma3_vision.open_vision`); `load_mmproj` builds the
model at once; `read_mmproj` reads the header only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from maxjax.errors import UserError
from maxjax.models.gemma3_vision import (
    _GEMMA3_DEFAULTS,
    Gemma3VisionModel,
    ImageProcessing,
    VisionCheckpoint,
    VisionConfig,
    build_vision_model,
    load_params,
)
from maxjax.weights.gguf import GGUFFile
from maxjax.weights.mmproj import open_mmproj

PROJECTOR_TYPE = "gemma3"
DEFAULT_SCALE_FACTOR = 4
"""clip.cpp's pooling kernel for a Gemma 3 file without `clip.vision.projector.scale_factor`."""

_TOKEN_NAMES = {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                "eoi_token_id": "<end_of_image>"}
_DEFAULT_TOKEN_IDS = {field: int(_GEMMA3_DEFAULTS[key]) for field, key in (
    ("image_token_id", "image_token_index"), ("boi_token_id", "boi_token_index"), ("eoi_token_id", "eoi_token_index"))}
"""Gemma 3's, where the text model's vocabulary does not name them."""
_NORM_PLUS_ONE = "mm.soft_emb_norm.weight"


def tensor_table(cfg: VisionConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor `gemma3_vision.load_params` asks for: its name -> (llama.cpp's name, shape in HF order)."""
    d, f, c, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size
    table = {
        "vision_tower.embeddings.patch_embedding.weight": ("v.patch_embd.weight", (d, c, p, p)),
        "vision_tower.embeddings.patch_embedding.bias": ("v.patch_embd.bias", (d,)),
        "vision_tower.embeddings.position_embedding.weight": ("v.position_embd.weight", (cfg.patches_per_side**2, d)),
        "vision_tower.post_layernorm.weight": ("v.post_ln.weight", (d,)),
        "vision_tower.post_layernorm.bias": ("v.post_ln.bias", (d,)),
        "multi_modal_projector.mm_soft_emb_norm.weight": ("mm.soft_emb_norm.weight", (d,)),
        "multi_modal_projector.mm_input_projection_weight": ("mm.input_projection.weight", (d, cfg.text_hidden_size)),
    }
    layer = {  # SigLIP's name: (llama.cpp's, [out, in])
        "layer_norm1": ("ln1", (d,)), "layer_norm2": ("ln2", (d,)),
        "self_attn.q_proj": ("attn_q", (d, d)), "self_attn.k_proj": ("attn_k", (d, d)),
        "self_attn.v_proj": ("attn_v", (d, d)), "self_attn.out_proj": ("attn_out", (d, d)),
        "mlp.fc1": ("ffn_up", (f, d)), "mlp.fc2": ("ffn_down", (d, f)),
    }
    for i in range(cfg.num_layers):
        for hf, (short, shape) in layer.items():
            table[f"vision_tower.encoder.layers.{i}.{hf}.weight"] = (f"v.blk.{i}.{short}.weight", shape)
            table[f"vision_tower.encoder.layers.{i}.{hf}.bias"] = (f"v.blk.{i}.{short}.bias", shape[:1])
    return table


def image_token_ids(vocabulary: Sequence[str]) -> dict[str, int]:
    """`VisionConfig`'s token fields found by name in a GGUF model's `tokenizer.ggml.tokens` (Gemma 3's
    `<image_soft_token>`, `<start_of_image>`, `<end_of_image>`); those not found are left out."""
    wanted = {token: field for field, token in _TOKEN_NAMES.items()}
    return {wanted[token]: i for i, token in enumerate(vocabulary) if token in wanted}


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06 rather than 9.99999997e-07)."""
    return float(str(np.float32(value)))


def config_from_mmproj(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                       token_ids: Mapping[str, int] | None = None) -> VisionConfig:
    """The `VisionConfig` an mmproj file's metadata and tensor shapes describe; `token_ids` (`image_token_id`,
    `boi_token_id`, `eoi_token_id`) override Gemma 3's. Raises ValueError naming a missing or inconsistent key."""

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(name, default)
        if value is None:
            raise ValueError(f"the metadata key {name} is missing; convert the file again with llama.cpp's "
                             "convert_hf_to_gguf.py --mmproj")
        return value

    for name, n_dims in (("mm.input_projection.weight", 2), ("v.patch_embd.weight", 4)):
        if len(shapes.get(name, ())) != n_dims:
            raise ValueError(f"the file has no {n_dims}-D tensor {name}, which Gemma 3's vision tower needs: is it "
                             "Gemma 3's mmproj file? convert it again with llama.cpp")
    text_width = shapes["mm.input_projection.weight"][1]  # [Dv, Dt]: the text model's width
    ids = _DEFAULT_TOKEN_IDS | dict(token_ids or {})
    assert ids.keys() == _DEFAULT_TOKEN_IDS.keys(), f"token_ids {dict(token_ids or {})}"
    image_size, patch_size = int(key("clip.vision.image_size")), int(key("clip.vision.patch_size"))
    scale = int(key("clip.vision.projector.scale_factor", DEFAULT_SCALE_FACTOR))
    per_side = image_size // patch_size
    if scale <= 0 or per_side % scale or image_size % patch_size:
        raise ValueError(f"clip.vision.projector.scale_factor {scale} should divide the {per_side} patches per "
                         f"side (image_size {image_size} / patch_size {patch_size})")
    cfg = VisionConfig(
        hidden_size=int(key("clip.vision.embedding_length")),
        intermediate_size=int(key("clip.vision.feed_forward_length")),
        num_layers=int(key("clip.vision.block_count")),
        num_heads=int(key("clip.vision.attention.head_count")),
        num_channels=shapes["v.patch_embd.weight"][1],
        image_size=image_size, patch_size=patch_size,
        layer_norm_eps=_float32_value(key("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        mm_tokens_per_image=(per_side // scale) ** 2,
        text_hidden_size=text_width, **ids,
    )
    if metadata.get("clip.vision.projection_dim", text_width) != text_width:
        raise ValueError(f"mm.input_projection.weight projects to {text_width} but clip.vision.projection_dim is "
                         f"{metadata['clip.vision.projection_dim']}: the file is inconsistent, convert it again")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"clip.vision.embedding_length {cfg.hidden_size} is not a multiple of "
                         f"clip.vision.attention.head_count {cfg.num_heads}")
    if metadata.get("clip.use_silu") or metadata.get("clip.use_gelu") is False:
        raise ValueError("the tower's activation is not GELU (clip.use_gelu), which Gemma 3's SigLIP uses")
    return cfg


def image_processing_from_mmproj(metadata: Mapping[str, Any], cfg: VisionConfig) -> ImageProcessing:
    """Gemma 3's image processor as llama.cpp runs it from an mmproj file: bilinear resize to the tower's size,
    rescale by 1/255, normalize by `clip.vision.image_{mean,std}` (Gemma 3's 0.5 where absent)."""
    mean = metadata.get("clip.vision.image_mean", (0.5, 0.5, 0.5))
    std = metadata.get("clip.vision.image_std", (0.5, 0.5, 0.5))
    if len(mean) != cfg.num_channels or len(std) != cfg.num_channels:
        raise ValueError(f"clip.vision.image_mean {mean} and image_std {std} should have one value per channel "
                         f"({cfg.num_channels})")
    return ImageProcessing(height=cfg.image_size, width=cfg.image_size,
                           image_mean=tuple(_float32_value(m) for m in mean),
                           image_std=tuple(_float32_value(s) for s in std))


def _open(path: Path, token_ids: Mapping[str, int] | None) -> tuple[GGUFFile, VisionConfig, ImageProcessing]:
    """The file, once its metadata and tensor shapes say it is a whole Gemma 3 mmproj file: none of its data is
    read yet, so a missing or misshapen tensor is found before any weight is loaded."""
    file = open_mmproj(path, (PROJECTOR_TYPE,))
    shapes = {name: file.tensor_info(name).shape for name in file.tensor_names}
    try:
        cfg = config_from_mmproj(file.metadata, shapes, token_ids)
        processing = image_processing_from_mmproj(file.metadata, cfg)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    for name, shape in tensor_table(cfg).values():
        if name not in shapes:
            raise UserError(f"{path} has no tensor {name}, which Gemma 3's vision tower needs: the file is "
                            "incomplete or not this model's; convert it again with llama.cpp")
        if shapes[name] != shape:
            raise UserError(f"{path}: the tensor {name} has shape {list(shapes[name])}, but the file's metadata "
                            f"gives it {list(shape)}; the file is corrupt, convert it again")
    return file, cfg, processing


def _getter(file: GGUFFile, cfg: VisionConfig) -> Callable[[str], np.ndarray]:
    """`load_params` name -> the tensor as float32 in HF's orientation and meaning."""
    table = tensor_table(cfg)

    def get(hf_name: str) -> np.ndarray:
        name = table[hf_name][0]
        w = file.tensor(name)
        return w - np.float32(1) if name == _NORM_PLUS_ONE else w  # the converter stored Gemma's 1 + weight

    return get


def read_mmproj(path: Path, token_ids: Mapping[str, int] | None = None) -> tuple[VisionConfig, ImageProcessing]:
    """The vision config and image processing of Gemma 3's mmproj file, from its header alone (`load_mmproj`'s
    `token_ids`). Raises UserError, one line naming the file, when it is not one or is incomplete."""
    _, cfg, proc = _open(Path(path), token_ids)
    return cfg, proc


def load_mmproj(path: Path, token_ids: Mapping[str, int] | None = None,
                dtype: jnp.dtype = jnp.float32) -> tuple[Gemma3VisionModel, ImageProcessing]:
    """Gemma 3's vision tower and projector from llama.cpp's mmproj file, and its image processing.

    `token_ids`: the text model's `image_token_id`, `boi_token_id`, `eoi_token_id` (`image_token_ids` of its
    vocabulary); Gemma 3's where left out. Raises UserError, one line naming the file, when it is not Gemma 3's
    mmproj, lacks a tensor, or its tensors do not fit its metadata."""
    file, cfg, processing = _open(Path(path), token_ids)
    get, np_dtype = _getter(file, cfg), np.dtype(jnp.dtype(dtype))
    params = load_params(cfg, lambda name: get(name).astype(np_dtype, copy=False))
    return build_vision_model(cfg, params, dtype), processing


def open_checkpoint(path: Path, tokenizer: Any) -> VisionCheckpoint:
    """Llama.cpp's mmproj file as the pipeline's `VisionCheckpoint` (`gemma3_vision.open_vision`): its header
    checked and read, its tensors read when the model is built. `tokenizer` (the GGUF model's `Tokenizer`, or
    None) names the image placeholder tokens; Gemma 3's ids where it does not (a UserError where its vocabulary is
    too small for them). UserError as `load_mmproj`."""
    backend = getattr(tokenizer, "backend", None)
    token_ids = {} if backend is None else {
        field: i for field, token in _TOKEN_NAMES.items() if (i := backend.token_to_id(token)) is not None}
    vocab_size = getattr(tokenizer, "vocab_size", None)
    outside = [f"{_TOKEN_NAMES[field]} (Gemma 3's id {i})" for field, i in _DEFAULT_TOKEN_IDS.items()
               if field not in token_ids and vocab_size is not None and i >= vocab_size]
    if outside:
        raise UserError(f"{path}: the model's vocabulary ({vocab_size} tokens) has no {', '.join(outside)}, so "
                        "it takes no images: pass the mmproj file of a Gemma 3 that does (e.g. 4B) with its model")
    file, cfg, processing = _open(Path(path), token_ids)
    return VisionCheckpoint(cfg, processing, _getter(file, cfg))
