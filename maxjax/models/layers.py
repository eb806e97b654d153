"""Blocks shared by every architecture: norms, projections, rotary embeddings, paged attention, the MLP.

Axis letters used in einsum strings and shape comments:
  B batch rows, T new tokens per row (1 in decode, the chunk in prefill), D model width,
  K key/value heads, G query heads per key/value head, H = K * G query heads, E head width,
  P pages gathered per row, S = P * page_size attended past positions, F MLP width.

Weights are stored the way the hardware wants them, not the way checkpoints ship them: projection kernels are
[in, out] (checkpoints are [out, in]; `x @ w.T` ran 3x slower on CPU), and Q/K/V and gate/up are fused into one
matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm; `offset` is 1.0 for Gemma-style norms that store `weight - 1`."""

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, dtype: jnp.dtype = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.weight[...].astype(jnp.float32) + self.offset)).astype(x.dtype)


class Linear(nnx.Module):
    """`x @ kernel (+ bias)` with the kernel stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = False, dtype: jnp.dtype = jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class GatedMLP(nnx.Module):
    """SwiGLU (or GeGLU) with gate and up fused into one [D, 2F] matmul."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "silu", dtype: jnp.dtype = jnp.float32):
        self.gate_up = Linear(dim, 2 * hidden, dtype=dtype)
        self.down = Linear(hidden, dim, dtype=dtype)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down(act * up)


# ----------------------------------------------------------------------------------------------- rotary


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, HF's `rope_theta` + `rope_scaling` decided into one hashable value."""

    theta: float = 10000.0
    kind: str = "default"
    """'default', 'linear' or 'llama3'."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Inverse frequencies [E/2], with linear or Llama 3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * jnp.pi / inv_freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        interpolated = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(middle, interpolated, scaled)
    if rope.kind != "default":
        raise ValueError(f"rope scaling {rope.kind!r} is not supported: use default, linear or llama3")
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for `positions` [B, T]: each [B, T, E] in the rotate-half layout HF uses."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` [B, T, heads, E] by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ------------------------------------------------------------------------------------- paged attention


class AttentionBatch(NamedTuple):
    """What every attention layer of one step needs to know about the batch (built once per step)."""

    page_table: jax.Array
    """[B, P] int32: the pages holding each row's past, in order; P = 0 when no row has a past."""
    past_len: jax.Array
    """[B] int32: tokens already in the cache for each row (the position of the first new token)."""
    cos: jax.Array
    """[B, T, E] rotary tables for the new tokens."""
    sin: jax.Array


class KVCache(NamedTuple):
    """The page pools of every layer. Keys are stored transposed inside a page so that q·k is a plain matmul.

    Page 0 is never handed to a request: writes of padding tokens land there.
    """

    k: jax.Array
    """[L, num_pages, K, E, page_size]"""
    v: jax.Array
    """[L, num_pages, K, page_size, E]"""

    @property
    def page_size(self) -> int:
        return int(self.k.shape[-1])


def paged_attention(
    q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, layer: int, batch: AttentionBatch, *,
    scale: float,
    sliding_window: int | None = None, softcap: float | None = None,
) -> jax.Array:
    """Attention of the new tokens over each row's cached past plus the new tokens themselves (causally).

    q [B, T, H, E], k_new / v_new [B, T, K, E] (rotary already applied) -> [B, T, H, E].
    The cache is only read here: new keys and values are written for all layers at once after the step,
    so the pool is never copied. Past and new scores share one softmax.
    """
    b, t, h, e = q.shape
    k_heads = k_new.shape[2]
    g = h // k_heads
    # [B, K, T*G, E]: every query of one KV head in one matrix, so each product is one batched matmul.
    qg = q.reshape(b, t, k_heads, g, e).transpose(0, 2, 1, 3, 4).reshape(b, k_heads, t * g, e)
    qg = qg * scale

    query_pos = batch.past_len[:, None] + jnp.arange(t)[None, :]  # [B, T]
    new_scores = jnp.einsum("bkme,buke->bkmu", qg, k_new)  # [B, K, T*G, T]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, T]
    new_mask = jnp.broadcast_to(causal[None, :, None, :], (b, t, g, t))
    if sliding_window is not None:
        new_mask = new_mask & (
            (query_pos[:, :, None] - query_pos[:, None, :]) < sliding_window
        )[:, :, None, :]
    new_mask = new_mask.reshape(b, 1, t * g, t)
    scores = [new_scores]
    masks = [new_mask]

    num_pages = batch.page_table.shape[1]
    if num_pages:
        page_size = cache.page_size
        # Gather this layer's pages for every row: [B, P, K, E, page] -> [B, K, E, S]. Indexing the layer and
        # the pages in one gather keeps XLA from copying the layer's whole pool first.
        k_past = cache.k.at[layer, batch.page_table].get(mode="promise_in_bounds")
        k_past = k_past.transpose(0, 2, 3, 1, 4).reshape(b, k_heads, e, num_pages * page_size)
        past_scores = jnp.einsum("bkme,bkes->bkms", qg, k_past)  # [B, K, T*G, S]
        past_pos = jnp.arange(num_pages * page_size)
        past_mask = past_pos[None, :] < batch.past_len[:, None]  # [B, S]
        past_mask = jnp.broadcast_to(past_mask[:, None, :], (b, t, num_pages * page_size))
        if sliding_window is not None:
            past_mask = past_mask & ((query_pos[:, :, None] - past_pos[None, None, :]) < sliding_window)
        past_mask = jnp.broadcast_to(past_mask[:, :, None, :], (b, t, g, past_mask.shape[-1]))
        scores.insert(0, past_scores)
        masks.insert(0, past_mask.reshape(b, 1, t * g, -1))

    logits = jnp.concatenate(scores, axis=-1).astype(jnp.float32)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(jnp.concatenate(masks, axis=-1), logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)

    out = jnp.einsum("bkmu,buke->bkme", probs[..., -t:], v_new)
    if num_pages:
        v_past = cache.v.at[layer, batch.page_table].get(mode="promise_in_bounds")
        v_past = v_past.transpose(0, 2, 1, 3, 4).reshape(b, k_heads, num_pages * page_size, e)
        out = out + jnp.einsum("bkms,bkse->bkme", probs[..., :-t], v_past)
    return out.reshape(b, k_heads, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)


def write_kv(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.Array) -> KVCache:
    """Write the step's new keys/values of every layer into the pools in one scatter each.

    new_k / new_v [L, B, T, K, E]; slots [B, T] = page * page_size + offset (padding tokens point into page 0).
    The pools are donated by the caller, so XLA updates them in place.
    """
    ps = cache.page_size
    flat = slots.reshape(-1)
    pages, offsets = flat // ps, flat % ps
    n_layers, _, _, k_heads, e = new_k.shape
    k_vals = new_k.reshape(n_layers, -1, k_heads, e).transpose(1, 0, 2, 3)  # [B*T, L, K, E]
    v_vals = new_v.reshape(n_layers, -1, k_heads, e).transpose(1, 0, 2, 3)
    k = cache.k.at[:, pages, :, :, offsets].set(k_vals.astype(cache.k.dtype), mode="promise_in_bounds")
    v = cache.v.at[:, pages, :, offsets, :].set(v_vals.astype(cache.v.dtype), mode="promise_in_bounds")
    return KVCache(k, v)
