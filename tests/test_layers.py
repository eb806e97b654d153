"""The float layouts' forms (`models/backend.py`): the same products, and the form each row count and platform
gets (XLA's CPU forms on "cpu", its generic forms on "gpu")."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxjax.models.backend import REDUCE_MAX_ROWS, XlaCpuForms, XlaMatmul

LAYOUTS = {"cpu": XlaCpuForms(), "gpu": XlaMatmul()}


def traced(platform: str) -> Any:
    def run(x: jax.Array, w: jax.Array) -> jax.Array:
        return LAYOUTS[platform].apply(x, w, w.shape[0])

    return jax.jit(run)


def lowered_ops(rows: int, platform: str) -> str:
    x = jax.ShapeDtypeStruct((rows, 1, 96), jnp.float32)
    w = jax.ShapeDtypeStruct((40, 96), jnp.float32)
    return str(traced(platform).lower(x, w).as_text())


@pytest.mark.parametrize("rows", [1, 2, 8, REDUCE_MAX_ROWS, REDUCE_MAX_ROWS + 1, 40])
def test_every_form_gives_the_matmul(rows: int) -> None:
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 1, 96)).astype(np.float32)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    for platform in ("cpu", "gpu"):
        got = traced(platform)(x, w)
        assert got.shape == (rows, 1, 40)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_cpu_small_batches_sum_instead_of_dot() -> None:
    for rows in (2, 8, REDUCE_MAX_ROWS):
        cpu = lowered_ops(rows, "cpu")
        assert "dot_general" not in cpu and "reduce" in cpu, rows
        assert "dot_general" in lowered_ops(rows, "gpu"), rows
    assert "dot_general" in lowered_ops(1, "cpu")
    assert "dot_general" in lowered_ops(REDUCE_MAX_ROWS + 1, "cpu")
