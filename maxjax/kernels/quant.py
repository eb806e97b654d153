"""GGUF's quantized blocks repacked, once on the host, for `maxjax_qproject` (qproject.cc): the projection that
reads the file's 4- and 8-bit codes and dequantizes them in registers, so a decode step reads about a fifth of
the bytes float32 weights cost.

A tensor `[out, in]` of Q8_0, Q4_0, Q4_1 blocks (32 weights each, along `in`) or K-quant super-blocks (256
weights: eight blocks of 32, or sixteen of 16, with small integer scales under float16 factors) becomes one uint8
array
`[ceil(out / P), in / 32, stride]`: for each panel of P output columns (the build's `Kernels.panel`, the last
panel zero-padded) and each block of 32 inputs, the P columns' codes interleaved (`[32][P]` int8 for Q8_0;
`[16][P]` bytes of two nibbles each for Q4_*, each column's bytes exactly as the file holds them), then their
scales `d` `[P]`, then (Q4_1) their minimums `m` `[P]`, float16 as the file holds them (a float32 copy read 20% more
bytes a step). A K-quant's block of 32 is written as one of these with float32 scales, exactly (a float16 factor
times a 6- or 8-bit integer): Q4_K as Q4_1's codes (its nibbles reordered) with d sc and -dmin m, Q5_K as int8
codes 0..31 with d sc and -dmin m, Q6_K as int8 codes q - 32 with the scales of its two halves. One contiguous
run per panel block, read
once per call; the out axis first, so panels shard as `CpuPanels`' do. For the kernel's int8 activations
(`int8=True`, Q4_* only), a block's codes are `[4][P][4]` instead: four of a column's bytes side by side.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from maxjax import kernels

BLOCK = 32
"""Weights per block along the input axis (every kind here)."""


@dataclass(frozen=True)
class Kind:
    """One GGUF block encoding as the kernel takes it."""

    ggml_type: int
    """ggml's type number."""
    block_bytes: int
    """Bytes of one block in the file (scales included)."""
    code_rows: int
    """Rows of P code bytes a block of a panel holds: 32 (one int8 per weight) or 16 (two nibbles per byte)."""
    scales: int
    """Scale vectors after the codes: 1 (d) or 2 (d, m)."""
    scale_bytes: int = 4
    """Bytes of one scale: 2 where the file's float16 scales are kept as they are, 4 for a K-quant's products."""
    block_weights: int = BLOCK
    """Weights of one block in the file: 32, or a K-quant's super-block of 256."""
    halves: bool = False
    """Its two float32 vectors are the scales of the two halves of a block (Q6_K), not d and a minimum."""

    @property
    def scale_dtype(self) -> np.dtype:
        return np.dtype("<f2" if self.scale_bytes == 2 else "<f4")

    def stride(self, panel: int) -> int:
        """Bytes of one block of one panel in the packed array."""
        return panel * (self.code_rows + self.scale_bytes * self.scales)


KINDS: dict[str, Kind] = {
    "q8_0": Kind(ggml_type=8, block_bytes=34, code_rows=32, scales=1, scale_bytes=2),  # d: f16, 32 int8 q; w = d q
    # d: f16, 16 bytes of 4-bit q; w = d (q - 8)
    "q4_0": Kind(ggml_type=2, block_bytes=18, code_rows=16, scales=1, scale_bytes=2),
    "q4_1": Kind(ggml_type=3, block_bytes=20, code_rows=16, scales=2, scale_bytes=2),  # d, m: f16, 16 bytes; d q + m
    # d, dmin: f16, 12 bytes of 6-bit scales and minimums, 128 bytes of 4-bit q; w = d sc q - dmin m, packed as
    # Q4_1's codes with float32 scales
    "q4_k": Kind(ggml_type=12, block_bytes=144, code_rows=16, scales=2, block_weights=256),
    # as Q4_K, the fifth bits in 32 bytes before the low 4: packed as int8 codes 0..31 with d sc and -dmin m
    "q5_k": Kind(ggml_type=13, block_bytes=176, code_rows=32, scales=2, block_weights=256),
    # 128 bytes of low 4 bits, 64 of high 2, 16 int8 scales (one per 16 weights), d: f16; w = d sc (q - 32),
    # packed as int8 codes q - 32 with d sc of each half of a block of 32 (no minimum)
    "q6_k": Kind(ggml_type=14, block_bytes=210, code_rows=32, scales=2, block_weights=256, halves=True),
}
"""The encodings the kernel multiplies, by maxjax's encoding name (`GGUFTensorInfo.encoding`)."""


def _kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"no quantized kernel for {kind!r}: it takes {', '.join(KINDS)}") from None


def _blocks(kind: Kind, raw: np.ndarray, out: int, in_: int) -> np.ndarray:
    """The file's bytes of an [out, in] tensor as uint8 [out, in / block weights, block_bytes]."""
    if in_ % kind.block_weights:
        raise ValueError(f"in = {in_} is not a whole number of {kind.block_weights}-weight blocks")
    raw = np.asarray(raw)
    size = out * in_ // kind.block_weights * kind.block_bytes
    if raw.dtype != np.uint8 or raw.size != size:
        raise ValueError(f"expected {size} bytes of uint8 blocks for [{out}, {in_}], got {raw.size} of {raw.dtype}")
    return raw.reshape(out, in_ // kind.block_weights, kind.block_bytes)


def _codes_and_scales(kind: Kind, raw: np.ndarray, out: int, in_: int) -> tuple[np.ndarray, np.ndarray]:
    """The tensor's blocks of 32 as the packed layout holds them: codes uint8 [out, in / 32, code_rows] and scales
    [out, in / 32, scales] (d, then m) of `kind.scale_dtype`."""
    blocks = _blocks(kind, raw, out, in_)
    if kind.block_weights == BLOCK:
        return blocks[..., 2 * kind.scales :], blocks[..., : 2 * kind.scales].copy().view("<f2")
    from maxjax.weights.ggml_blocks import k_scales

    n32 = in_ // BLOCK
    flat = blocks.reshape(-1, kind.block_bytes)
    if kind.halves:  # Q6_K
        low = flat[:, :128].reshape(-1, 2, 1, 64)  # two runs of 64 bytes: low nibbles, then high nibbles
        six = np.concatenate([low & 0x0F, low >> 4], axis=2).reshape(-1, 2, 4, 32)
        high = flat[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        signed = (six | ((high & 3) << 4)).astype(np.int16) - 32
        d = flat[:, 208:210].copy().view("<f2").astype(np.float32) * flat[:, 192:208].view(np.int8)  # [n, 16]
        return signed.astype(np.int8).view(np.uint8).reshape(out, n32, BLOCK), d.reshape(out, n32, 2)
    d, dm = k_scales(flat)  # [out * super-blocks, 8, 1]
    scales = np.concatenate([d, -dm], axis=-1).reshape(out, n32, 2)
    if kind.code_rows == BLOCK:  # Q5_K: the low 4 bits as Q4_K's, bit i of byte j of the 32 the fifth of block i
        qs = flat[:, 48:].reshape(-1, 4, 1, 32)
        five = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        five |= ((flat[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        return five.reshape(out, n32, BLOCK), scales
    qs = flat[:, 16:].reshape(-1, 4, 1, 32)  # four runs of 32 bytes: blocks 2j (low), 2j + 1 (high nibbles)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(out, n32, BLOCK)
    codes = q[..., :16] | (q[..., 16:] << 4)  # Q4_1's order: byte k holds weights k and k + 16
    return codes, scales


def group(kind: str, int8: bool) -> int:
    """A column's code bytes kept side by side in a block of a panel: 4 for int8 activations (Q4_*), else 1."""
    return 4 if int8 and _kind(kind).code_rows == 16 else 1


def repack(kind: str, raw: np.ndarray, out: int, in_: int, panel: int, int8: bool = False) -> np.ndarray:
    """The file's bytes of one [out, in] tensor (`GGUFFile.raw`: uint8 [out, in / 32 * block bytes]) as the
    kernel's uint8 [ceil(out / panel), in / 32, stride] (module docstring)."""
    k = _kind(kind)
    g = group(kind, int8)
    file_codes, file_scales = _codes_and_scales(k, raw, out, in_)
    panels, n_blocks = -(-out // panel), in_ // BLOCK
    codes = np.zeros((panels * panel, n_blocks, k.code_rows), np.uint8)  # zero codes and scales: zero weights
    codes[:out] = file_codes
    padded_scales = np.zeros((panels * panel, n_blocks, k.scales), k.scale_dtype)
    padded_scales[:out] = file_scales
    by_column = codes.reshape(panels, panel, n_blocks, k.code_rows // g, g)
    codes = by_column.transpose(0, 2, 3, 1, 4)  # [panels, B, code_rows / g, P, g]
    scales = padded_scales.reshape(panels, panel, n_blocks, k.scales).transpose(0, 2, 3, 1)  # [panels, B, s, P]
    packed = np.empty((panels, n_blocks, k.stride(panel)), np.uint8)
    packed[..., : k.code_rows * panel] = codes.reshape(panels, n_blocks, -1)
    packed[..., k.code_rows * panel :] = np.ascontiguousarray(scales).view(np.uint8).reshape(panels, n_blocks, -1)
    return packed


def dequantize(kind: str, raw: np.ndarray, out: int, in_: int) -> np.ndarray:
    """The reference: the tensor's values as float32 [out, in], as ggml (and `GGUFFile.tensor`) decode them."""
    from maxjax.weights.ggml_blocks import dequantize as decode

    k = _kind(kind)
    return decode(_blocks(k, raw, out, in_).reshape(out, -1), k.ggml_type)


def qproject(x: Any, packed: Any, kind: str, out: int, int8: bool = False) -> Any:
    """x [..., in] float32 times a repacked tensor -> [..., out], as the custom call (traced into the graph; the
    kernels must be loaded, `kernels.load()`); `int8`: x rounded to int8 per block (Q4_*, packed with `int8`)."""
    import jax

    result = jax.ShapeDtypeStruct((*x.shape[:-1], out), np.float32)
    return jax.ffi.ffi_call(kernels.QUANT_TARGET, result)(x, packed, kind=np.int64(_kind(kind).ggml_type),
                                                          int8=np.int64(group(kind, int8) == 4))


# XLA's forms of the same blocks: the product where the kernel does not run (GPU, TPU, a model on XLA's own
# layouts), and the rows of a quantized embedding table. Traced into the graph: the weights stay in their
# blocks on the device and are dequantized beside the matmul (or the lookup) that uses them.


def _values(kind: Kind, codes: Any, scales: Any, dtype: Any) -> Any:
    """Weights [..., 32] of blocks in the packed layout, from their codes (uint8 [..., 32] read as int8, or
    [..., 16] bytes of two nibbles for Q4_*, low nibbles first) and their float32 scales [..., kind.scales]."""
    import jax
    import jax.numpy as jnp

    if kind.code_rows == 32:
        q = jax.lax.bitcast_convert_type(codes, jnp.int8).astype(jnp.float32)
    else:
        q = jnp.concatenate([codes & 0x0F, codes >> 4], axis=-1).astype(jnp.float32)
        if kind.scales == 1:
            q = q - 8.0
    if kind.halves:  # a scale for each half
        w = q * jnp.repeat(scales, BLOCK // 2, axis=-1)
    else:
        w = q * scales[..., 0:1] if kind.scales == 1 else q * scales[..., 0:1] + scales[..., 1:2]
    return w.astype(dtype)


def dequantize_xla(kind: str, blocks: Any, dtype: Any = np.float32) -> Any:
    """The file's bytes uint8 [..., in / 32 * block bytes] (`GGUFFile.raw`'s rows) -> [..., in] of `dtype`, in
    the graph."""
    import jax
    import jax.numpy as jnp

    k = _kind(kind)
    b = blocks.reshape(*blocks.shape[:-1], -1, k.block_bytes)
    if k.block_weights != BLOCK:
        return _super_blocks(k, b, dtype).reshape(*blocks.shape[:-1], -1)
    halves = jax.lax.bitcast_convert_type(b[..., : 2 * k.scales].reshape(*b.shape[:-1], k.scales, 2), jnp.float16)
    scales = halves.astype(jnp.float32)  # [..., n_blocks, scales]
    w = _values(k, b[..., 2 * k.scales :], scales, dtype)
    return w.reshape(*blocks.shape[:-1], -1)


def _super_blocks(k: Kind, b: Any, dtype: Any) -> Any:
    """K-quant super-blocks uint8 [..., n, block bytes] -> weights [..., n, 256] (ggml's decoding, in the graph)."""
    import jax
    import jax.numpy as jnp

    def f16(at: int) -> Any:
        return jax.lax.bitcast_convert_type(b[..., at : at + 2], jnp.float16).astype(jnp.float32)[..., None]

    lead = b.shape[:-1]
    if k.halves:  # Q6_K
        low = b[..., :128].reshape(*lead, 2, 1, 64)
        q = jnp.concatenate([low & 0x0F, low >> 4], axis=-2).reshape(*lead, 2, 4, 32).astype(jnp.int32)
        shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
        high = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts).astype(jnp.int32)
        q = ((q | ((high & 3) << 4)) - 32).astype(jnp.float32).reshape(*lead, 16, 16)
        d = f16(208) * jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)  # [..., n, 16]
        return (q * d[..., None]).astype(dtype).reshape(*lead, 256)
    a, c, e = (b[..., i : i + 4].astype(jnp.int32) for i in (4, 8, 12))
    sc = jnp.concatenate([a & 0x3F, (e & 0x0F) | ((a >> 2) & 0x30)], axis=-1).astype(jnp.float32)
    mn = jnp.concatenate([c & 0x3F, (e >> 4) | ((c >> 2) & 0x30)], axis=-1).astype(jnp.float32)
    start = 16 if k.code_rows == 16 else 48  # Q5_K: the fifth bits first
    qs = b[..., start:].reshape(*lead, 4, 1, 32)
    q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-2).astype(jnp.int32).reshape(*lead, 8, 32)
    if k.code_rows == BLOCK:
        shifts = jnp.arange(8, dtype=jnp.uint8)[:, None]
        q = q | (((b[..., None, 16:48] >> shifts) & 1).astype(jnp.int32) << 4)
    w = q.astype(jnp.float32) * (f16(0) * sc)[..., None] - (f16(2) * mn)[..., None]
    return w.astype(dtype).reshape(*lead, 256)


def panel_rows(kind: str, packed: Any, rows: Any, panel: int, dtype: Any = np.float32, int8: bool = False) -> Any:
    """Rows `rows` [...] (output columns) of a repacked tensor [panels, in / 32, stride] -> [..., in] of `dtype`,
    in the graph: a tied embedding table looked up in the kernel's layout, with no second copy of it."""
    import jax
    import jax.numpy as jnp

    k = _kind(kind)
    blocks = packed[rows // panel]  # [..., n_blocks, stride]
    column = (rows % panel)[..., None, None]  # [..., 1, 1]

    def pick(rows_of_p: Any, count: int, g: int = 1) -> Any:
        """[..., n_blocks, count * P] laid out [count / g][P][g] -> the column's [..., n_blocks, count]."""
        grid = rows_of_p.reshape(*rows_of_p.shape[:-1], count // g, panel, g).swapaxes(-1, -2)
        index = jnp.broadcast_to(column[..., None, None], (*grid.shape[:-1], 1))
        return jnp.take_along_axis(grid, index, axis=-1)[..., 0].reshape(*rows_of_p.shape[:-1], count)

    codes = pick(blocks[..., : k.code_rows * panel], k.code_rows, group(kind, int8))
    scale_bytes = blocks[..., k.code_rows * panel :].reshape(*blocks.shape[:-1], k.scales * panel, k.scale_bytes)
    scales = jax.lax.bitcast_convert_type(scale_bytes, jnp.float16 if k.scale_bytes == 2 else jnp.float32)
    scales = scales.astype(jnp.float32)  # [..., n_blocks, scales * P]
    scales = pick(scales, k.scales)  # [..., n_blocks, scales]
    w = _values(k, codes, scales, dtype)
    return w.reshape(*rows.shape, -1)
