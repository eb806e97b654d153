"""Every GGUF storage type maxjax reads, on a tiny random Llama written as llama.cpp writes one.

The float32 weights are stored once as an HF checkpoint and once per GGML type; each file goes through
`resolve_model` + `load_model` and one prefill, and its logits are compared with the float32 checkpoint's
(which is itself checked against a NumPy forward pass of the HF model). A float32 GGUF must match exactly; the
others must be off by what their storage precision predicts, no more (a mis-packed block or a wrong Q/K order
gives errors the size of the logits themselves) and no less (the weights really were stored in that type).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from maxjax.graph.runner import CacheSpec
from maxjax.hub import resolve_model
from maxjax.pipeline import LoadedModel, load_model
from maxjax.weights import encodings
from tests.tiny_llama import (
    FILE_TYPES,
    random_weights,
    reference_logits,
    write_hf_checkpoint,
    write_llama_gguf,
)

Q = gguf.GGMLQuantizationType
TOKENS = np.array([1, 72, 259, 111, 33, 2, 200, 5, 140, 259, 64, 17, 250, 98, 3, 120], dtype=np.int32)

# Expected relative RMS error of one N(0, σ²) weight in each type. Rounding to a grid of step s leaves an
# error of RMS s/√12. Floats with m mantissa bits: s ≈ 0.72 · 2^-m of the value (0.72: mean of 1/x over a
# binade). Blocks of 32 weights: symmetric types (Q8_0, Q4_0, Q5_0) scale by the block's largest |w|, ≈ 2.1σ,
# over 127, 8 or 16 steps; affine types (Q4_1, Q5_1) span the block's range, ≈ 4.1σ, with 15 or 31 steps.
WEIGHT_ERROR: dict[gguf.GGMLQuantizationType, float] = {
    Q.F16: 0.72 * 2**-10 / 12**0.5,
    Q.BF16: 0.72 * 2**-7 / 12**0.5,
    Q.Q8_0: 2.1 / 127 / 12**0.5,
    Q.Q5_0: 2.1 / 16 / 12**0.5,
    Q.Q5_1: 4.1 / 31 / 12**0.5,
    Q.Q4_0: 2.1 / 8 / 12**0.5,
    Q.Q4_1: 4.1 / 15 / 12**0.5,
}
# Independent errors in the ~16 matrices a logit depends on add up in quadrature, so the logits' relative RMS
# error is a few times one weight's (2.2-2.8x here, for every type). Outside [1.5x, 4x] something is wrong.
AMPLIFICATION = (1.5, 4.0)


def _prefill(loaded: LoadedModel) -> np.ndarray:
    """Logits [T, V] at every position of TOKENS, run through the model's own __call__ with an empty cache."""
    cfg = loaded.config
    cache = CacheSpec(cfg.num_layers, 1, 16, cfg.num_kv_heads, cfg.head_dim, dtype=loaded.dtype).allocate()
    logits, _, _ = loaded.model(
        TOKENS[None],
        cache,
        page_table=np.zeros((1, 0), np.int32),
        past_len=np.zeros(1, np.int32),
        logit_index=np.arange(len(TOKENS), dtype=np.int32)[None],
    )
    return np.asarray(logits[0], dtype=np.float64)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(seed=0)


@pytest.fixture(scope="module")
def source_logits(weights: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("tiny-hf"), weights)
    resolved = resolve_model(str(folder))
    assert (resolved.kind, resolved.encoding) == ("hf", "float32")
    return _prefill(load_model(resolved, platform="cpu"))


@pytest.fixture(scope="module")
def relative_errors(
    weights: dict[str, np.ndarray], source_logits: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> dict[gguf.GGMLQuantizationType, float]:
    """RMS of (GGUF logits - float32 checkpoint logits) over the checkpoint logits' standard deviation."""
    folder = tmp_path_factory.mktemp("tiny-gguf")
    errors = {}
    for qtype in FILE_TYPES:
        path = write_llama_gguf(folder / f"tiny-{qtype.name}.gguf", weights, qtype)
        resolved = resolve_model(str(path))
        assert resolved.kind == "gguf"
        assert resolved.encoding == encodings.from_ggml_type(int(qtype))
        logits = _prefill(load_model(resolved, platform="cpu"))
        errors[qtype] = float(np.sqrt(np.mean((logits - source_logits) ** 2)) / source_logits.std())
    return errors


def test_float32_checkpoint_matches_the_numpy_reference(
    weights: dict[str, np.ndarray], source_logits: np.ndarray
) -> None:
    expected = reference_logits(weights, TOKENS)
    assert expected.std() > 0.5  # logits with real spread, so relative errors mean something
    np.testing.assert_allclose(source_logits, expected, atol=2e-5 * expected.std(), rtol=0)


def test_float32_gguf_matches_the_checkpoint(relative_errors: dict[gguf.GGMLQuantizationType, float]) -> None:
    assert relative_errors[Q.F32] <= 1e-5


@pytest.mark.parametrize("qtype", list(WEIGHT_ERROR), ids=lambda q: q.name)
def test_error_is_what_the_storage_type_predicts(
    qtype: gguf.GGMLQuantizationType, relative_errors: dict[gguf.GGMLQuantizationType, float]
) -> None:
    low, high = AMPLIFICATION
    ratio = relative_errors[qtype] / WEIGHT_ERROR[qtype]
    assert low <= ratio <= high, (
        f"{qtype.name}: logits off by {relative_errors[qtype]:.2e} = {ratio:.2f}x one weight's error"
    )


def test_errors_rank_by_precision(relative_errors: dict[gguf.GGMLQuantizationType, float]) -> None:
    e = relative_errors
    assert e[Q.F32] < e[Q.F16] < e[Q.BF16] < e[Q.Q8_0]
    assert e[Q.Q8_0] * 4 < min(e[Q.Q5_0], e[Q.Q5_1])  # 3 fewer bits: ~8x the step
    assert max(e[Q.Q5_0], e[Q.Q5_1]) * 1.5 < min(e[Q.Q4_0], e[Q.Q4_1])  # 1 fewer bit: ~2x the step
