"""The quantized projection kernel (maxjax/kernels/qproject.cc, repacked by kernels/quant.py): the product of
float32 rows with GGUF's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K blocks equals the product with them dequantized
as ggml does, to float32's rounding; with int8 activations (Q4_*, where the build has them: `Kernels.int8`), to within the
error of rounding x to int8, bounded per block (`int8_bound`), and equal to that rounding done in NumPy."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

from maxjax import kernels
from maxjax.kernels import quant

MODEL = Path("/root/.cache/maxjax/models/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def built() -> kernels.Kernels:
    k = kernels.load()
    assert k is not None, "the test machine has a C++ compiler: the kernel must build"
    return k


def random_blocks(kind: str, out: int, in_: int, seed: int) -> np.ndarray:
    """uint8 [out, in / block weights * block bytes]: every code value possible, finite float16 scales (and
    minimums; K-quants: their float16 factors, any 6- or 8-bit scales)."""
    k = quant.KINDS[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (out, in_ // k.block_weights, k.block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal((out, in_ // k.block_weights, k.scales)) * (0.02 if k.block_weights == 32 else 5e-4))
    scales = scales.astype("<f2")
    if k.halves:  # Q6_K: one float16 factor, at the end of the super-block
        blocks[..., -2:] = scales[..., :1].view(np.uint8)
    else:
        blocks[..., : 2 * k.scales] = scales.view(np.uint8)
    return blocks.reshape(out, -1)


def check(y: np.ndarray, x: np.ndarray, w: np.ndarray, int8: bool = False) -> None:
    """y = x @ w.T to 1e-4 of the sum of the terms' magnitudes (float32 sums, in another order); with `int8`,
    also to `int8_bound`, and to 1e-4 of x rounded as the kernel rounds it, times w."""
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))
    assert y.shape == expected.shape
    if int8:
        assert np.all(np.abs(y - expected) <= bound + int8_bound(x, w)), np.abs(y - expected).max()
        expected = rounded(x).astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.abs(y - expected) <= bound), np.abs(y - expected).max()


def rounded(x: np.ndarray) -> np.ndarray:
    """x as the kernel rounds it: per block of 32, dx = max |x| / 127, x ~ dx round(x / dx)."""
    blocks = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
    return (np.rint(blocks * scale) * (amax / np.float32(127))).reshape(x.shape)


def int8_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|y - x w^T| where x is rounded to int8 (each x_i off by at most dx / 2 of its block): at most the sum over
    blocks of dx / 2 * sum_i |w_i|."""
    rows, n_in = x.shape
    dx = np.abs(x.reshape(rows, n_in // 32, 32)).max(axis=-1) / 127  # [rows, blocks]
    per_block = np.abs(w.astype(np.float64)).reshape(w.shape[0], n_in // 32, 32).sum(axis=-1)  # [out, blocks]
    return (dx / 2) @ per_block.T


project = jax.jit(quant.qproject, static_argnums=(2, 3, 4))


def test_repack_layout() -> None:
    """Panel p, block b: the P columns' codes ([rows][P], or [rows / 4][P][4] for int8 activations), then d [P]
    (and m [P]) as the file's float16 bits; the last panel's missing columns zero."""
    out, in_, panel = 5, 64, 4
    for (kind, k), int8 in itertools.product(quant.KINDS.items(), (False, True)):
        if k.block_weights != quant.BLOCK:
            continue  # rewritten as blocks of 32: test_k_quants_are_packed_exactly
        raw = random_blocks(kind, out, in_, seed=k.ggml_type)
        blocks = raw.reshape(out, 2, k.block_bytes)
        packed = quant.repack(kind, raw, out, in_, panel, int8)
        g = quant.group(kind, int8)
        assert g == (4 if int8 and kind != "q8_0" else 1)
        assert packed.shape == (2, 2, k.stride(panel)) and packed.dtype == np.uint8
        for o in range(2 * panel):
            for b in range(2):
                grid = packed[o // panel, b, : k.code_rows * panel].reshape(k.code_rows // g, panel, g)
                codes = grid[:, o % panel, :].reshape(-1)
                scales = packed[o // panel, b, k.code_rows * panel :].view(k.scale_dtype).reshape(k.scales, panel)
                if o < out:
                    np.testing.assert_array_equal(codes, blocks[o, b, 2 * k.scales :])
                    assert k.scale_dtype == np.dtype("<f2")
                    file_scales = blocks[o, b, : 2 * k.scales].view("<f2")
                    np.testing.assert_array_equal(scales[:, o % panel].view(np.uint16), file_scales.view(np.uint16))
                else:
                    assert not codes.any() and not scales[:, o % panel].any()


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_are_packed_exactly(built: kernels.Kernels, kind: str) -> None:
    """Each block of 32 of a K-quant super-block becomes a block of the packed layout with float32 scales, exact
    (a float16 factor times a 6- or 8-bit integer): Q4_K a Q4_1 block (d sc, -dmin m), Q5_K int8 codes 0..31
    with d sc and -dmin m, Q6_K int8 codes q - 32 with the scales of its two halves. The packed panels (in the
    kernel's order for int8 activations too, Q4_K) and XLA's decoding of the file's bytes give ggml's values."""
    out, in_ = 21, 512
    raw = random_blocks(kind, out, in_, seed=quant.KINDS[kind].ggml_type)
    want = quant.dequantize(kind, raw, out, in_)
    rows = np.arange(out)
    lookup = jax.jit(quant.panel_rows, static_argnums=(0, 3, 4, 5))
    for int8 in (False, True) if kind == "q4_k" else (False,):
        packed = quant.repack(kind, raw, out, in_, built.panel, int8)
        np.testing.assert_array_equal(np.asarray(lookup(kind, packed, rows, built.panel, np.float32, int8)), want)
    xla = np.asarray(jax.jit(quant.dequantize_xla, static_argnums=0)(kind, raw))
    np.testing.assert_array_equal(xla, want)


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 70])
@pytest.mark.parametrize(("out", "in_"), [(37, 96), (200, 576), (5, 1536)])
@pytest.mark.parametrize(("kind", "int8"), [("q8_0", False), ("q4_0", False), ("q4_1", False), ("q4_0", True),
                                            ("q4_1", True), ("q4_k", False), ("q4_k", True), ("q5_k", False),
                                            ("q6_k", False)])
def test_qproject_matches_dequantized(built: kernels.Kernels, kind: str, int8: bool, rows: int, out: int,
                                      in_: int) -> None:
    if kind.endswith("_k"):
        in_ = -(-in_ // 256) * 256  # whole super-blocks
    if int8 and not built.int8:
        pytest.skip("this build has no int8 path (AVX2 or AVX-512 only)")
    raw = random_blocks(kind, out, in_, seed=rows * 1000 + out)
    x = np.random.default_rng(rows).standard_normal((rows, in_)).astype(np.float32)
    x[:, ::41] *= 30  # outliers, as real activations have: the blocks that hold one round the rest coarsely
    y = np.asarray(project(x, quant.repack(kind, raw, out, in_, built.panel, int8), kind, out, int8))
    check(y, x, quant.dequantize(kind, raw, out, in_), int8)


def test_leading_axes_and_the_graph(built: kernels.Kernels) -> None:
    """A [B, T, in] input (prefill) gives [B, T, out]; the traced graph calls the custom call."""
    out, in_ = 40, 64
    raw = random_blocks("q4_1", out, in_, seed=7)
    packed = quant.repack("q4_1", raw, out, in_, built.panel)
    x = np.random.default_rng(7).standard_normal((2, 3, in_)).astype(np.float32)
    assert kernels.QUANT_TARGET in project.lower(x, packed, "q4_1", out, False).as_text()
    y = np.asarray(project(x, packed, "q4_1", out, False))
    assert y.shape == (2, 3, out)
    check(y.reshape(6, out), x.reshape(6, in_), quant.dequantize("q4_1", raw, out, in_))


def test_bad_arguments_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match="q8_0, q4_0, q4_1, q4_k, q5_k, q6_k"):
        quant.repack("q3_k", np.zeros(110, np.uint8), 1, 256, 16)
    with pytest.raises(ValueError, match="whole number"):
        quant.repack("q8_0", np.zeros(34, np.uint8), 1, 48, 16)
    with pytest.raises(ValueError, match="68 bytes"):
        quant.repack("q8_0", np.zeros(34, np.uint8), 1, 64, 16)


@pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is not downloaded")
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "token_embd.weight"])
def test_real_tensor(built: kernels.Kernels, name: str) -> None:
    """A Q4_1 projection and the Q8_0 tied embedding of SmolLM2-135M, read as maxjax's GGUF reader reads them."""
    from maxjax.weights.gguf import GGUFFile

    f = GGUFFile(MODEL)
    info = f.tensor_info(name)
    out, in_ = info.shape
    raw = f.raw(name)
    w = quant.dequantize(info.encoding, raw, out, in_)
    np.testing.assert_array_equal(w, f.tensor(name))
    x = np.random.default_rng(0).standard_normal((3, in_)).astype(np.float32)
    y = np.asarray(project(x, quant.repack(info.encoding, raw, out, in_, built.panel), info.encoding, out, False))
    check(y, x, w)
