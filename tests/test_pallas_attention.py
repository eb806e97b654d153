"""The Pallas GPU kernel over the paged past (`kernels/pallas_past.py`) against XLA's form of `paged_attention`.

On CPU the kernel runs in Pallas's interpreter (the same kernel body, not the Triton compile); the `gpu`-marked
test compiles it on a GPU, where there is one (`scripts/device_check.sh`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.kernels import pallas_past
from maxjax.models import layers
from maxjax.models.backend import backend_for
from maxjax.models.layers import AttentionBatch, KVCache, paged_attention

LAYERS, PAGES, KV_HEADS, GROUP, PAGE = 2, 48, 2, 2, 16


def _case(seed: int, past: list[int], t: int, head_dim: int, dtype: jnp.dtype = jnp.float32):
    """Random queries, new keys/values and pools (every slot written: what lies past a row's length must be
    masked), and page tables of distinct random pages (page 0 is the scratch page tables pad with)."""
    rng = np.random.default_rng(seed)
    b, width = len(past), -(-max(max(past), 1) // PAGE) + 2
    h = KV_HEADS * GROUP
    q = rng.standard_normal((b, t, h, head_dim))
    k_new, v_new = (rng.standard_normal((b, t, KV_HEADS, head_dim)) for _ in range(2))
    k = rng.standard_normal((LAYERS, PAGES, KV_HEADS, head_dim, PAGE))
    v = rng.standard_normal((LAYERS, PAGES, KV_HEADS, PAGE, head_dim))
    table = np.zeros((b, width), np.int32)
    free = rng.permutation(np.arange(1, PAGES))
    for r, n in enumerate(past):
        used = -(-n // PAGE)
        table[r, :used], free = free[:used], free[used:]
    cast = functools.partial(jnp.asarray, dtype=dtype)
    batch = AttentionBatch(jnp.asarray(table), jnp.asarray(past, jnp.int32), jnp.zeros(()), jnp.zeros(()))
    return cast(q), cast(k_new), cast(v_new), KVCache(cast(k), cast(v)), batch


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """`paged_attention` calls the Pallas kernel through the interpreter (no GPU here)."""
    monkeypatch.setattr(layers.pallas_past, "paged_past",
                        functools.partial(pallas_past.paged_past, interpret=True))


def _both(q, k_new, v_new, cache, batch, **kw) -> tuple[np.ndarray, np.ndarray]:
    def attend(kernel):
        return jax.jit(lambda q, kn, vn, c, bt: paged_attention(q, kn, vn, c, 1, bt, scale=0.3, past_kernel=kernel,
                                                                **kw))(q, k_new, v_new, cache, batch)

    return np.asarray(attend("pallas")), np.asarray(attend(False))


@pytest.mark.parametrize(("t", "window", "softcap"), [
    (1, None, None),  # decode: M = G = 2 query rows, padded to 16
    (1, 40, None),  # Gemma's local layers: a sliding window shorter than the longest past
    (1, None, 30.0),  # Gemma 2's logit soft-cap
    (3, 40, None),  # a ragged prefill chunk continuing each row's past
    (40, None, None),  # M = 80 query rows: two blocks of 64, the second padded
])
def test_the_interpreted_kernel_matches_xla_blocks(interpreted: None, t: int, window: int | None,
                                                   softcap: float | None) -> None:
    # Pasts of 0 (only the new tokens), inside one page, a whole page, and several of XLA's 128-token blocks.
    got, want = _both(*_case(t, [0, 5, 16, 300], t, head_dim=32), sliding_window=window, softcap=softcap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_head_width_triton_cannot_tile_keeps_xla_blocks(interpreted: None) -> None:
    assert not pallas_past.fits(24, PAGE) and not pallas_past.fits(32, 8) and pallas_past.fits(256, 16)
    got, want = _both(*_case(0, [7, 33], 1, head_dim=24))
    np.testing.assert_array_equal(got, want)


def test_only_the_gpu_backend_picks_the_pallas_kernel() -> None:
    assert backend_for("gpu", jnp.bfloat16).past_kernel == "pallas"
    assert backend_for("tpu", jnp.float32).past_kernel is False
    assert backend_for("cpu", jnp.float32).past_kernel in (True, False)  # True where the CPU kernels built


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no GPU: the compiled kernel needs one (scripts/device_check.sh)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_compiled_kernel_matches_xla_blocks_on_gpu(dtype: jnp.dtype) -> None:
    gpu = jax.devices("gpu")[0]
    with jax.default_device(gpu), jax.default_matmul_precision("highest"):
        for t, window in [(1, None), (1, 40), (5, None)]:
            case = jax.device_put(_case(t, [0, 5, 16, 300, 129, 1, 64, 17], t, head_dim=64, dtype=dtype), gpu)
            got, want = _both(*case, sliding_window=window)
            tol = 1e-4 if dtype == jnp.float32 else 5e-2  # XLA rounds bfloat16 scores; the kernel does not
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)
