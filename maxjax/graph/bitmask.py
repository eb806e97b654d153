"""Grammar masks inside the graph: a packed per-row bitmask of allowed tokens applied to the logits.

The host (`maxjax.serve.grammar`) writes one row of int32 words per request, bit t % 32 of word t // 32 set when
token t is allowed, all ones for an unconstrained row; so every row of a step takes the same operations and a new
grammar never changes a shape. Unpacking is a broadcast shift and and over [B, W, 32], no gather and no loop over
the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unpack_bitmask(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """bitmask [B, W] int32 (W * 32 >= vocab_size) -> allowed [B, vocab_size] bool."""
    b, words = bitmask.shape
    if words * 32 < vocab_size:
        raise ValueError(f"a mask of {words} words covers {words * 32} tokens, not {vocab_size}")
    # An arithmetic shift fills the high bits with the sign; `& 1` keeps only the bit shifted down to bit 0.
    bits = jnp.right_shift(bitmask[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return bits.reshape(b, words * 32)[:, :vocab_size].astype(jnp.bool_)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [B, V] float32 with the tokens bitmask [B, W] int32 disallows set to -inf."""
    allowed = unpack_bitmask(bitmask, logits.shape[1])
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))
