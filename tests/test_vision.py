"""Gemma 3's vision path against transformers, on the tiny checkpoint in tests/fixtures/arch/gemma3_multimodal/.

scripts/make_vision_fixtures.py recorded, for two random images of other sizes than the tower's 32x32, the
pixel values transformers' Gemma 3 processor gives, the SigLIP tower's output and the projector's soft tokens,
and, for a prompt with one image and one with two, the input embeddings transformers' language model receives
after the merge. The logits it recorded are compared in tests/test_vision_logits.py.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.models import gemma3_vision
from maxjax.models.gemma3_vision import (
    Gemma3VisionModel,
    ImageProcessing,
    VisionConfig,
    load_vision_model,
    merge_image_features,
    preprocess_images,
    text_embeddings,
)
from tests.test_architectures import FIXTURES, load

FOLDER = FIXTURES / "gemma3_multimodal"
TOLERANCE = 1e-4


@cache
def reference() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    record = json.loads((FOLDER / "vision_reference.json").read_text())
    sha = hashlib.sha256((FOLDER / "model.safetensors").read_bytes()).hexdigest()
    assert sha == record["checkpoint_sha256"], "the checkpoint changed: rerun scripts/make_vision_fixtures.py"
    arrays = np.load(FOLDER / "vision_reference.npz")
    return record, {k: arrays[k] for k in arrays.files}


@cache
def vision_model() -> Gemma3VisionModel:
    return load_vision_model(FOLDER)


def config() -> VisionConfig:
    return VisionConfig.from_hf(json.loads((FOLDER / "config.json").read_text()))


def images() -> list[np.ndarray]:
    _, arrays = reference()
    return [arrays["image_0"], arrays["image_1"]]


def test_config() -> None:
    cfg = config()
    assert (cfg.patches_per_side, cfg.tokens_per_side, cfg.text_hidden_size) == (4, 2, 64)
    assert (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (259, 257, 258)


def test_config_rejects_a_pool_that_does_not_divide_the_grid() -> None:
    hf = json.loads((FOLDER / "config.json").read_text())
    with pytest.raises(ValueError, match="mm_tokens_per_image 9"):
        VisionConfig.from_hf(hf | {"mm_tokens_per_image": 9})
    with pytest.raises(ValueError, match="no vision_config"):
        VisionConfig.from_hf({k: v for k, v in hf.items() if k != "vision_config"})


def test_preprocessing_matches_transformers_processor() -> None:
    _, arrays = reference()
    proc = ImageProcessing.from_hf(json.loads((FOLDER / "preprocessor_config.json").read_text()), config())
    pixels = preprocess_images(images(), proc)
    assert pixels.shape == arrays["pixel_values"].shape
    np.testing.assert_allclose(pixels, arrays["pixel_values"], atol=1e-6, rtol=0)


def test_numpy_resize_is_close_to_pillows() -> None:
    pytest.importorskip("PIL")
    for image in images():
        for size in ((32, 32), (17, 45)):
            ours = gemma3_vision.resize_bilinear(image, *size).astype(int)
            pillow = gemma3_vision.resize(image, *size).astype(int)
            assert np.abs(ours - pillow).max() <= 1, size  # Pillow rounds between the two passes


def test_vision_tower_and_projector_match_transformers() -> None:
    _, arrays = reference()
    model = vision_model()
    hidden = model.encode(jnp.asarray(arrays["pixel_values"]))
    features = model.project(hidden)
    hidden_err = float(np.abs(np.asarray(hidden) - arrays["vision_hidden"]).max())
    err = float(np.abs(np.asarray(features) - arrays["image_features"]).max())
    print(f"tower max |error| {hidden_err:.2e}, soft tokens max |error| {err:.2e} "
          f"(soft token std {arrays['image_features'].std():.2f})")
    assert features.shape == (2, 4, 64)
    assert hidden_err <= TOLERANCE and err <= TOLERANCE


@pytest.mark.parametrize("prompt", ["one", "two"])
def test_merged_embeddings_match_transformers(prompt: str) -> None:
    record, arrays = reference()
    n_images = record[f"prompt_{prompt}"]["images"]
    tokens = arrays[f"tokens_{prompt}"]
    image_token = config().image_token_id
    features = vision_model()(jnp.asarray(arrays["pixel_values"][:n_images]))
    text_model: Any = load(FOLDER).model
    merged = merge_image_features(tokens, text_embeddings(text_model, jnp.asarray(tokens)), features, image_token)
    err = float(np.abs(np.asarray(merged) - arrays[f"inputs_embeds_{prompt}"]).max())
    print(f"{prompt}: merged embeddings max |error| {err:.2e}")
    assert err <= TOLERANCE
    assert np.array_equal(np.asarray(merged)[tokens == image_token], np.asarray(features).reshape(-1, 64))


def test_merge_checks_the_placeholder_count() -> None:
    tokens = np.array([1, 259, 259, 5])
    with pytest.raises(ValueError, match="2 image tokens but the images give 4"):
        merge_image_features(tokens, jnp.zeros((4, 8)), jnp.ones((1, 4, 8)), 259)


def test_merge_fills_placeholders_in_order() -> None:
    tokens = np.array([[7, 259, 259], [259, 259, 8]])
    features = jnp.arange(4 * 2, dtype=jnp.float32).reshape(2, 2, 2)  # 2 images of 2 soft tokens
    merged = np.asarray(merge_image_features(tokens, -jnp.ones((2, 3, 2)), features, 259))
    assert merged.tolist() == [[[-1, -1], [0, 1], [2, 3]], [[4, 5], [6, 7], [-1, -1]]]


def test_names_map_from_hub_and_transformers_layouts() -> None:
    name = gemma3_vision.vision_name_to_hf
    assert name("vision_tower.vision_model.post_layernorm.weight") == "vision_tower.post_layernorm.weight"
    assert name("model.vision_tower.encoder.layers.0.mlp.fc1.bias") == "vision_tower.encoder.layers.0.mlp.fc1.bias"
    assert name("multi_modal_projector.mm_soft_emb_norm.weight") == "multi_modal_projector.mm_soft_emb_norm.weight"
    assert name("vision_tower.head.probe") is None
    assert name("language_model.model.norm.weight") is None


def test_fixture_is_small() -> None:
    new = ("vision_reference.npz", "vision_reference.json", "preprocessor_config.json")
    assert sum((FOLDER / f).stat().st_size for f in new) < 2 * 2**20
