"""Dequantizing ggml's block types with NumPy, a whole tensor at a time.

The common block types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) are decoded here, bit-identical to gguf-py, which
decodes the others (more slowly: it works 16 rows at a time) and supplies the type tables. `GGUFFile.tensor`
(weights/gguf.py) calls `dequantize` on the packed bytes `GGUFFile.raw` gives.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

_Q = gguf.GGMLQuantizationType


def dequantize(packed: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 values `[..., values_per_row]` of block-quantized bytes `[..., bytes_per_row]` (as `GGUFFile.raw`
    gives them), bit-identical to `gguf.quants.dequantize`, which decodes the types not decoded here.

    Raises NotImplementedError for a type gguf-py cannot dequantize either.
    """
    qtype = _Q(ggml_type)
    decode = _BLOCK_DECODERS.get(qtype)
    if decode is None:
        return gguf.quants.dequantize(packed, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    values = decode(packed.reshape(-1, type_size))  # [n_blocks, block_size]
    return values.reshape(*packed.shape[:-1], packed.shape[-1] // type_size * block_size)


# Each decoder takes [n_blocks, block_bytes] uint8 and returns [n_blocks, block_size] float32, doing the same
# float32 operations in the same order as gguf-py (the integer steps are exact in float32, whatever the order),
# in place on one output array. Layouts are ggml's (ggml-common.h); every f16 field is a scale.


def _f16(field: np.ndarray) -> np.ndarray:
    """A two-byte field of each block as float32 [n_blocks, 1]."""
    return field.view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray, groups: int) -> np.ndarray:
    """4-bit values as float32 [n_blocks, 2 * packed bytes]: the packed bytes split into `groups` runs, each run's
    low nibbles followed by its high nibbles (ggml's order)."""
    n = packed.shape[0]
    runs = packed.reshape(n, groups, -1)
    out = np.empty((n, groups, 2, runs.shape[-1]), np.float32)
    np.bitwise_and(runs, 0x0F, out=out[:, :, 0], casting="unsafe")
    np.right_shift(runs, 4, out=out[:, :, 1], casting="unsafe")
    return out.reshape(n, -1)


def _q4_0(blocks: np.ndarray) -> np.ndarray:  # d: f16, 16 bytes of 4-bit q; w = d * (q - 8)
    w = _nibbles(blocks[:, 2:], 1)
    w -= 8
    w *= _f16(blocks[:, 0:2])
    return w


def _q4_1(blocks: np.ndarray) -> np.ndarray:  # d, m: f16, 16 bytes of 4-bit q; w = d * q + m
    w = _nibbles(blocks[:, 4:], 1)
    w *= _f16(blocks[:, 0:2])
    w += _f16(blocks[:, 2:4])
    return w


def _q8_0(blocks: np.ndarray) -> np.ndarray:  # d: f16, 32 int8 q; w = q * d
    w = blocks[:, 2:].view(np.int8).astype(np.float32)
    w *= _f16(blocks[:, 0:2])
    return w


def k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: d * scale and dmin * min of the 8 sub-blocks of 32, as float32 [n_blocks, 8, 1].

    Bytes 4-15 hold eight 6-bit scales and eight 6-bit mins: bytes 0-3 (of those 12) the low 6 bits of scales
    0-3, bytes 4-7 of mins 0-3; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble),
    whose top 2 bits are the top 2 bits of bytes 0-3 and 4-7.
    """
    a, b, c = blocks[:, 4:8], blocks[:, 8:12], blocks[:, 12:16]
    scale = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1).astype(np.float32)
    minimum = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1).astype(np.float32)
    return (_f16(blocks[:, 0:2]) * scale)[:, :, None], (_f16(blocks[:, 2:4]) * minimum)[:, :, None]


def _q4_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin: f16, 12 bytes of scales, 128 bytes of 4-bit q
    d, dm = k_scales(blocks)
    w = _nibbles(blocks[:, 16:], 4).reshape(-1, 8, 32)
    w *= d
    w -= dm
    return w.reshape(-1, 256)


def _q5_k(blocks: np.ndarray) -> np.ndarray:  # as Q4_K, with the fifth bits in 32 bytes before the low bits
    d, dm = k_scales(blocks)
    w = _nibbles(blocks[:, 48:], 4).reshape(-1, 8, 32)
    high = blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]  # bit i of byte j: sub-block i, value j
    w += (high & 1) << 4
    w *= d
    w -= dm
    return w.reshape(-1, 256)


def _q6_k(blocks: np.ndarray) -> np.ndarray:  # 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d: f16
    n = blocks.shape[0]
    w = _nibbles(blocks[:, :128], 2).reshape(n, 8, 32)
    high = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    w += ((high & 3) << 4).reshape(n, 8, 32)
    w -= 32
    d = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    w = w.reshape(n, 16, 16)  # a scale per 16 values
    w *= d[:, :, None]
    return w.reshape(n, 256)


_BLOCK_DECODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    _Q.Q4_0: _q4_0,
    _Q.Q4_1: _q4_1,
    _Q.Q8_0: _q8_0,
    _Q.Q4_K: _q4_k,
    _Q.Q5_K: _q5_k,
    _Q.Q6_K: _q6_k,
}
