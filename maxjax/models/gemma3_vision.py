"""Gemma 3's vision path (`Gemma3ForConditionalGeneration`): pixels -> soft tokens in the text model's width.

    pixels [N, C, H, W] -> SigLIP tower [N, P, Dv] -> 2-D average pool [N, M, Dv] -> RMS norm -> [N, M, Dt]

The SigLIP tower: the patch embedding (a stride-p convolution, here one matmul over each p x p patch), learned
position embeddings (no class token), pre-LN encoder layers with bidirectional attention and a tanh-GELU MLP,
a final LayerNorm (SigLIP's attention-pooling head is unused by Gemma 3). The projector averages the patch grid
down to `mm_tokens_per_image` soft tokens (a 64 x 64 grid to 16 x 16 = 256 on the Hub's 896-pixel models),
RMS-norms them (Gemma's `1 + weight`) and projects them to the text width.

`merge_image_features` puts the soft tokens in place of the prompt's image placeholder tokens. It takes the text
embeddings already scaled by sqrt(D), as `Gemma3ForCausalLM.forward` computes them: transformers scales in the
embedding lookup, before the merge, so the image features themselves are never scaled.

`preprocess_images` is Gemma 3's image processor without pan-and-scan: resize to the tower's size, rescale,
normalize (preprocessor_config.json). The merged embeddings go to `Gemma3ForCausalLM.forward(embeds=...)`, with
`image_block` for the text model's mask, under which the tokens of one image attend to each other both ways
(transformers' `token_type_ids`; `AttentionBatch.image_block`).

(Past 400 lines: the tower, its weights, its files and its input processing are read together.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax.models import gemma3
from maxjax.models.layers import Linear, RMSNorm


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP tower and projector of a `Gemma3ForConditionalGeneration` config (`from_hf`)."""

    hidden_size: int
    """Dv, the tower's width."""
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    """Pixels per side of the (square) input."""
    patch_size: int
    layer_norm_eps: float
    """The tower's LayerNorms' and the projector's RMS norm's epsilon."""
    mm_tokens_per_image: int
    """M, soft tokens per image (a square number)."""
    text_hidden_size: int
    """Dt, the text model's width."""
    image_token_id: int
    """The placeholder token each soft token replaces."""
    boi_token_id: int
    eoi_token_id: int

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> VisionConfig:
        """A Gemma 3 config.json dict; keys its `vision_config` leaves out take `SiglipVisionConfig`'s defaults."""
        vision = hf.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError("the model config has no vision_config: is this a Gemma3ForConditionalGeneration?")
        v = _SIGLIP_DEFAULTS | vision
        top = _GEMMA3_DEFAULTS | dict(hf)
        cfg = cls(
            hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]),
            num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
            num_channels=int(v["num_channels"]), image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
            layer_norm_eps=float(v["layer_norm_eps"]), mm_tokens_per_image=int(top["mm_tokens_per_image"]),
            text_hidden_size=gemma3.config_from_hf(dict(hf)).hidden_size,
            image_token_id=int(top.get("image_token_id", top["image_token_index"])),
            boi_token_id=int(top.get("boi_token_id", top["boi_token_index"])),
            eoi_token_id=int(top.get("eoi_token_id", top["eoi_token_index"])),
        )
        if v["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"vision_config.hidden_act {v['hidden_act']!r}: only gelu_pytorch_tanh is supported")
        if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"vision_config: image_size {cfg.image_size} should be a multiple of patch_size "
                             f"{cfg.patch_size}, hidden_size {cfg.hidden_size} of num_attention_heads {cfg.num_heads}")
        side = cfg.tokens_per_side
        if side * side != cfg.mm_tokens_per_image or cfg.patches_per_side % side:
            raise ValueError(f"mm_tokens_per_image {cfg.mm_tokens_per_image} should be the square of a divisor of "
                             f"the {cfg.patches_per_side} patches per side")
        return cfg


_SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
"""What transformers' `SiglipVisionConfig` assumes for keys a `vision_config` leaves out."""
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "mm_tokens_per_image": 256, "image_token_index": 262_144, "boi_token_index": 255_999, "eoi_token_index": 256_000,
}
"""What transformers' `Gemma3Config` assumes for the multimodal keys."""


class LayerNorm(nnx.Module):
    """Mean-and-variance norm with a scale and a bias (SigLIP's), computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype: jnp.dtype):
        d = cfg.hidden_size
        self.cfg = cfg
        self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.qkv = Linear(d, 3 * d, bias=True, dtype=dtype)  # q, k, v rows stacked
        self.out = Linear(d, d, bias=True, dtype=dtype)
        self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.fc1 = Linear(d, cfg.intermediate_size, bias=True, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, d, bias=True, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, p, d = x.shape
        h, e = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(n, p, 3, h, e), 3, axis=2)  # each [N, P, 1, H, E]
        scores = jnp.einsum("nqhe,nkhe->nhqk", q[:, :, 0], k[:, :, 0]).astype(jnp.float32) * e**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # every patch sees every patch
        attn = jnp.einsum("nhqk,nkhe->nqhe", probs, v[:, :, 0]).reshape(n, p, d)
        x = x + self.out(attn)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True))


class Gemma3VisionModel(nnx.Module):
    """SigLIP tower + Gemma 3's projector: pixel values [N, C, H, W] -> soft tokens [N, M, Dt]."""

    def __init__(self, cfg: VisionConfig, dtype: jnp.dtype = jnp.float32):
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.patch = Linear(cfg.num_channels * p * p, d, bias=True, dtype=dtype)  # the convolution, flattened
        self.position = nnx.Param(jnp.zeros((cfg.patches_per_side**2, d), dtype))
        self.layers = nnx.List([SiglipEncoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mm_norm = RMSNorm(d, eps=cfg.layer_norm_eps, offset=1.0, dtype=dtype)
        self.mm_proj = Linear(d, cfg.text_hidden_size, dtype=dtype)

    def encode(self, pixels: jax.Array) -> jax.Array:
        """pixel values [N, C, H, W] -> the tower's last hidden state [N, P, Dv], patches in row-major order."""
        cfg = self.cfg
        n, c, g, p = pixels.shape[0], cfg.num_channels, cfg.patches_per_side, cfg.patch_size
        assert pixels.shape[1:] == (c, cfg.image_size, cfg.image_size), f"pixels {pixels.shape}, size {cfg.image_size}"
        patches = pixels.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        x = self.patch(patches.astype(self.position.dtype)) + self.position[...]  # [N, P, Dv]
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)

    def project(self, hidden: jax.Array) -> jax.Array:
        """The tower's output [N, P, Dv] -> soft tokens [N, M, Dt]: each token the mean of a k x k block of patches."""
        cfg = self.cfg
        n, d, s = hidden.shape[0], cfg.hidden_size, cfg.tokens_per_side
        k = cfg.patches_per_side // s
        pooled = hidden.astype(jnp.float32).reshape(n, s, k, s, k, d).mean(axis=(2, 4)).astype(hidden.dtype)
        return self.mm_proj(self.mm_norm(pooled.reshape(n, s * s, d)))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.project(self.encode(pixels))


# ------------------------------------------------------------------------------------------- merging


def text_embeddings(text_model: gemma3.Gemma3ForCausalLM, tokens: jax.Array) -> jax.Array:
    """tokens [..., T] -> embeddings [..., T, D] scaled by sqrt(D), as `Gemma3ForCausalLM.forward` computes them."""
    return text_model.embed_input(tokens)


def merge_image_features(tokens: jax.Array | np.ndarray, embeds: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Text embeddings [..., T, D] with the image placeholder positions of `tokens` [..., T] replaced, in order,
    by the soft tokens `features` [n_images, M, D] (as transformers' `masked_scatter`: row-major over the batch).
    The number of placeholders must be n_images * M (checked when `tokens` is a NumPy array)."""
    d = embeds.shape[-1]
    flat_features = features.reshape(-1, d).astype(embeds.dtype)  # [n_images * M, D]
    if isinstance(tokens, np.ndarray) and (n := int((tokens == image_token_id).sum())) != flat_features.shape[0]:
        raise ValueError(f"the prompt has {n} image tokens but the images give {flat_features.shape[0]} soft "
                         f"tokens ({features.shape[0]} images of {features.shape[1]})")
    is_image = jnp.asarray(tokens).reshape(-1) == image_token_id
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, max(flat_features.shape[0] - 1, 0))  # each placeholder's soft token
    merged = jnp.where(is_image[:, None], flat_features[index], embeds.reshape(-1, d))
    return merged.reshape(embeds.shape)


# ------------------------------------------------------------------------------------------- weights


_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                   "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def vision_name_to_hf(name: str) -> str | None:
    """A checkpoint name -> `vision_tower.X` (the Hub's `vision_tower.vision_model.X`, or transformers 5's
    `model.vision_tower.X`) or `multi_modal_projector.X`; None for the language model and SigLIP's unused head."""
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return None if rest.startswith("head.") else "vision_tower." + rest
    for prefix in _PROJECTOR_PREFIXES:
        if name.startswith(prefix):
            return "multi_modal_projector." + name[len(prefix):]
    return None


def load_params(cfg: VisionConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The vision model's parameters as a pure dict (`nnx.to_pure_dict`'s shape) from `vision_name_to_hf` names."""

    def linear(name: str) -> dict[str, np.ndarray]:
        return {"kernel": get(name + ".weight"), "bias": get(name + ".bias")}

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"weight": get(name + ".weight"), "bias": get(name + ".bias")}

    layers = {}
    for i in range(cfg.num_layers):
        p = f"vision_tower.encoder.layers.{i}."
        layers[i] = {
            "norm1": norm(p + "layer_norm1"),
            "qkv": {part: np.concatenate([linear(p + f"self_attn.{n}_proj")[part] for n in "qkv"])
                    for part in ("kernel", "bias")},
            "out": linear(p + "self_attn.out_proj"),
            "norm2": norm(p + "layer_norm2"),
            "fc1": linear(p + "mlp.fc1"),
            "fc2": linear(p + "mlp.fc2"),
        }
    conv = get("vision_tower.embeddings.patch_embedding.weight")  # [Dv, C, p, p]
    return {
        "patch": {"kernel": conv.reshape(conv.shape[0], -1), "bias": get("vision_tower.embeddings.patch_embedding.bias")},
        "position": get("vision_tower.embeddings.position_embedding.weight"),
        "layers": layers,
        "post_norm": norm("vision_tower.post_layernorm"),
        "mm_norm": {"weight": get("multi_modal_projector.mm_soft_emb_norm.weight")},
        # stored [Dv, Dt] (x @ W); Linear holds [out, in]
        "mm_proj": {"kernel": np.ascontiguousarray(get("multi_modal_projector.mm_input_projection_weight").T)},
    }


def load_vision_model(folder: Path, dtype: jnp.dtype = jnp.float32) -> Gemma3VisionModel:
    """The vision model of a `Gemma3ForConditionalGeneration` checkpoint folder (config.json, *.safetensors)."""
    vision = open_vision(folder, json.loads((folder / "config.json").read_text()), None, None)
    if vision is None:
        raise ValueError(f"{folder}: the model config has no vision_config")
    return vision.build(dtype)


def build_vision_model(cfg: VisionConfig, params: dict[str, Any], dtype: jnp.dtype = jnp.float32) -> Gemma3VisionModel:
    """The model holding `params` (`load_params`'s dict), built without initializing random weights first.
    Raises ValueError naming the first parameter whose shape is not the one `cfg` gives it."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma3VisionModel(cfg, dtype)))

    def check(path: tuple[Any, ...], want: Any, got: np.ndarray) -> None:
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"the vision parameter {jax.tree_util.keystr(path)} has shape {list(got.shape)}, but "
                             f"the config gives it {list(want.shape)}")

    jax.tree_util.tree_map_with_path(check, nnx.to_pure_dict(state), params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageProcessing:
    """Gemma 3's image processor settings (preprocessor_config.json; pan-and-scan not supported)."""

    height: int
    width: int
    resample: int = 2
    """PIL's resampling filter code (2: bilinear, Gemma 3's)."""
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], cfg: VisionConfig) -> ImageProcessing:
        """A preprocessor_config.json dict (its size defaults to the tower's image size)."""
        if hf.get("do_pan_and_scan"):
            raise ValueError("preprocessor_config.json: do_pan_and_scan is not supported; set it to false")
        size = hf.get("size") or {}
        return cls(
            height=int(size.get("height", cfg.image_size)), width=int(size.get("width", cfg.image_size)),
            resample=int(hf.get("resample", 2)), rescale_factor=float(hf.get("rescale_factor", 1 / 255)),
            image_mean=tuple(float(m) for m in hf.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(s) for s in hf.get("image_std", (0.5, 0.5, 0.5))),
            do_resize=bool(hf.get("do_resize", True)), do_rescale=bool(hf.get("do_rescale", True)),
            do_normalize=bool(hf.get("do_normalize", True)),
        )


def preprocess_images(images: Sequence[np.ndarray], proc: ImageProcessing) -> np.ndarray:
    """RGB uint8 images [H, W, 3] -> pixel values [N, 3, height, width] float32, as transformers' Gemma 3 processor
    (its PIL backend) computes them: resize, rescale, normalize."""
    out = []
    for image in images:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image should be RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        if proc.do_resize and image.shape[:2] != (proc.height, proc.width):
            image = resize(image, proc.height, proc.width, proc.resample)
        x = image.astype(np.float64)
        if proc.do_rescale:
            x = x * proc.rescale_factor
        x = x.astype(np.float32)
        if proc.do_normalize:
            x = (x - np.array(proc.image_mean, np.float32)) / np.array(proc.image_std, np.float32)
        out.append(x.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int, resample: int = 2) -> np.ndarray:
    """An RGB uint8 image resized with Pillow (the filter `resample`), or, without Pillow, NumPy's bilinear
    (`resize_bilinear`, within a level or two of Pillow's)."""
    try:
        from PIL import Image
    except ImportError:
        return resize_bilinear(image, height, width)
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling(resample)))


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's bilinear resize in NumPy (a triangle filter widened by the scale when shrinking, so that shrinking
    averages; one axis then the other) without its intermediate rounding: uint8 [H, W, C] -> [height, width, C]."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        centers = (np.arange(n_out) + 0.5) * scale  # [n_out]
        taps = np.arange(n_in) + 0.5  # [n_in]
        w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centers[:, None]) / support)  # [n_out, n_in]
        return w / w.sum(axis=1, keepdims=True)

    x = image.astype(np.float64)
    x = np.einsum("oh,hwc->owc", weights(image.shape[0], height), x)
    x = np.einsum("ow,hwc->hoc", weights(image.shape[1], width), x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- opening


@dataclass(frozen=True)
class VisionCheckpoint:
    """A model's vision tower, its files opened (`open_vision`): what the engine needs to send it images."""

    config: VisionConfig
    processing: ImageProcessing
    get: Callable[[str], np.ndarray]
    """`vision_name_to_hf` name -> the stored tensor."""

    def build(self, dtype: jnp.dtype = jnp.float32) -> Gemma3VisionModel:
        """The vision model, its weights cast to `dtype`."""
        np_dtype = np.dtype(jnp.dtype(dtype))
        return build_vision_model(self.config, load_params(self.config, lambda name: self.get(name).astype(
            np_dtype, copy=False)), dtype)


def open_vision(folder: Path | None, hf_config: Mapping[str, Any] | None, mmproj: Path | None,
                tokenizer: Any) -> VisionCheckpoint | None:
    """The vision tower of a Gemma 3 checkpoint folder (its config's `vision_config`, the safetensors' tower and
    projector, preprocessor_config.json), or of llama.cpp's mmproj file; None for a text-only checkpoint."""
    from maxjax.errors import UserError

    if mmproj is not None:
        from maxjax.weights.mmproj import open_gemma3_mmproj

        return open_gemma3_mmproj(mmproj, tokenizer)
    if folder is None or hf_config is None or not isinstance(hf_config.get("vision_config"), dict):
        return None
    from maxjax.weights.safetensors import SafetensorsWeights

    cfg = VisionConfig.from_hf(hf_config)
    preprocessor = folder / "preprocessor_config.json"
    try:
        processing = ImageProcessing.from_hf(json.loads(preprocessor.read_text()) if preprocessor.exists() else {}, cfg)
    except (ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{preprocessor}: {e}") from None
    weights = SafetensorsWeights(folder)
    stored = {hf: name for name in weights.names if (hf := vision_name_to_hf(name)) is not None}

    def get(name: str) -> np.ndarray:
        if name not in stored:
            raise UserError(f"{folder}: the checkpoint has no vision tensor {name}; is it complete?")
        return weights.get(stored[name])

    return VisionCheckpoint(cfg, processing, get)
