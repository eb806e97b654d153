"""Gemma 3 with images against transformers' logits, on the tiny checkpoint in tests/fixtures/arch/gemma3_multimodal/.

scripts/make_vision_fixtures.py recorded transformers' logits for a prompt with one image and one with two: with
`token_type_ids` (the tokens of one image attend to each other both ways) and without (plain causal). Here the
same prompts go vision tower -> projector -> merge -> the text model through the paged KV cache: one prefill
chunk holding every image (an image's tokens must be in one chunk), then the trailing text one token at a time,
reading the images from the cache; float32, maxjax's CPU kernels as in tests/test_architectures.py.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxjax.graph.runner import CacheSpec
from maxjax.models.backend import backend_for
from maxjax.models.gemma3_vision import merge_image_features, text_embeddings
from maxjax.models.layers import AttentionBatch, KVCache, paged_attention, use_backend, write_kv
from maxjax.pipeline import LoadedModel
from tests.test_architectures import PAGE_SIZE, load
from tests.test_vision import FOLDER, TOLERANCE, config, reference, vision_model


@cache
def text_model() -> LoadedModel:
    loaded = load(FOLDER)
    use_backend(loaded.model, backend_for("cpu", loaded.dtype))
    return loaded


@nnx.jit
def _step(model: Any, embeds: jax.Array, cache: KVCache, pages: jax.Array, past_len: jax.Array,
          image_block: jax.Array | None) -> tuple[jax.Array, ...]:
    hidden, new_k, new_v = model.forward(None, cache, pages, past_len, embeds=embeds, image_block=image_block)
    return model.logits(hidden)[0], new_k, new_v


def image_blocks(tokens: np.ndarray, image_token: int) -> np.ndarray:
    """[T] -> each token's image, 1, 2, ... (0: text), as transformers groups runs of `token_type_ids`."""
    is_image = tokens == image_token
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts), 0).astype(np.int32)


def image_logits(prompt: str, bidirectional: bool) -> np.ndarray:
    """Logits [T, V] of the recorded prompt with its images."""
    record, arrays = reference()
    tokens = arrays[f"tokens_{prompt}"]
    image_token = config().image_token_id
    loaded = text_model()
    cfg = loaded.config
    features = vision_model()(jnp.asarray(arrays["pixel_values"][: record[f"prompt_{prompt}"]["images"]]))
    embeds = merge_image_features(tokens, text_embeddings(loaded.model, jnp.asarray(tokens)), features, image_token)
    blocks = image_blocks(tokens, image_token)
    prefill = int(np.nonzero(blocks)[0].max()) + 1  # every image in the first chunk; the rest decoded

    n_pages = -(-len(tokens) // PAGE_SIZE) + 1
    kv = CacheSpec(cfg.num_layers, n_pages, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=loaded.dtype).allocate()
    pages = np.arange(1, n_pages, dtype=np.int32)
    out, start = [], 0
    for n in [prefill, *[1] * (len(tokens) - prefill)]:
        positions = np.arange(start, start + n)
        block = blocks[None, start : start + n] if bidirectional else None
        logits, new_k, new_v = _step(loaded.model, embeds[None, start : start + n], kv, pages[None],
                                     np.array([start], np.int32), block)
        out.append(np.asarray(logits))
        kv = write_kv(kv, new_k, new_v, (pages[positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE)[None])
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize(("window", "want"), [
    (None, [1, 3.75, 3.75, 3.75]),  # text sees itself; each image token sees the text before and all 3 image tokens
    (2, [1, 3.75, 14 / 3, 6]),  # AND the window (q - k < 2), as transformers' sliding layers: later tokens pass
])
def test_new_tokens_of_one_image_attend_both_ways(window: int | None, want: list[float]) -> None:
    """Equal scores (q = 0), so each output is the mean of the values its token may see."""
    v = jnp.array([1.0, 2.0, 4.0, 8.0]).reshape(1, 4, 1, 1)  # [B, T, K, E]
    batch = AttentionBatch(page_table=jnp.zeros((1, 0), jnp.int32), past_len=jnp.zeros((1,), jnp.int32),
                           cos=jnp.ones((1, 4, 1)), sin=jnp.zeros((1, 4, 1)), image_block=jnp.array([[0, 1, 1, 1]]))
    empty = KVCache(jnp.zeros((1, 1, 1, 1, 4)), jnp.zeros((1, 1, 1, 4, 1)))
    out = paged_attention(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)), v, empty, 0, batch, scale=1.0,
                          sliding_window=window)
    np.testing.assert_allclose(np.asarray(out).reshape(-1), want, rtol=1e-6)
    causal = paged_attention(jnp.zeros((1, 4, 1, 1)), jnp.zeros((1, 4, 1, 1)), v, empty, 0,
                             batch._replace(image_block=None), scale=1.0, sliding_window=window)
    np.testing.assert_allclose(np.asarray(causal).reshape(-1), [1, 1.5, 7 / 3, 3.75] if window is None
                               else [1, 1.5, 3, 6], rtol=1e-6)


def test_image_blocks_number_each_run_of_image_tokens() -> None:
    assert image_blocks(np.array([1, 9, 9, 2, 9, 9, 3]), 9).tolist() == [0, 1, 1, 0, 2, 2, 0]


@pytest.mark.parametrize("prompt", ["one", "two"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["image_blocks", "causal"])
def test_logits_with_images_match_transformers(prompt: str, bidirectional: bool) -> None:
    record, arrays = reference()
    want = arrays[f"logits_{prompt}" if bidirectional else f"logits_causal_{prompt}"]
    got = image_logits(prompt, bidirectional)
    err = float(np.abs(got - want).max())
    other = float(np.abs(got - arrays[f"logits_causal_{prompt}" if bidirectional else f"logits_{prompt}"]).max())
    print(f"{prompt} {'image blocks' if bidirectional else 'causal'}: max |logit error| {err:.2e} "
          f"(vs the other mask {other:.2f}; logit std {record[f'prompt_{prompt}']['logit_std']:.2f})")
    assert err <= TOLERANCE
    assert other > 1.0  # the two masks are told apart
