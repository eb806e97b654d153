"""Blocks shared by every architecture: norms, projections, rotary embeddings, paged attention, the MLP.

Axis letters used in einsum strings and shape comments:
  B batch rows, T new tokens per row (1 in decode, the chunk in prefill), D model width,
  K key/value heads, G query heads per key/value head, H = K * G query heads, E head width,
  P pages gathered per row, S = P * page_size attended past positions, F MLP width.

Projection kernels are held in the layout the model's `Backend` chose (`models/backend.py`): [out, in] as
checkpoints ship them, or packed for maxjax's CPU kernel; Q/K/V and gate/up are fused into one matmul each, laid
out so that an even split of the fused output axis keeps whole heads and matching MLP columns together
(`fuse_qkv`, `fuse_gate_up`): what tensor parallelism over heads and MLP columns needs.

Every weight names its axes (`nnx.Param` metadata `out_sharding`, in the shape of its layout): "vocab", "embed",
"heads" (query heads x head width), "kv_heads" (the fused Q/K/V output, grouped by KV head), "mlp", "head_dim".
`graph/mesh.py` maps the names onto the device mesh. On a mesh of several devices the CPU kernels, which XLA
cannot partition, run per shard (`project_per_shard`, `paged_attention`).

Past the package's usual 400 lines: these are the layers every family shares, kept in one file so each model
file reads against one place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from maxjax import kernels
from maxjax.kernels import pallas_past, quant
from maxjax.models.backend import (
    CHECKPOINT_LAYOUT,
    Backend,
    CpuPanels,
    CpuQuantPanels,
    GGUFBlocks,
    PastKernel,
    Shards,
    WeightLayout,
)
from maxjax.models.config import RopeConfig
from maxjax.weights.quantized import QuantizedRows

Axes = tuple[str | None, str | None]
"""Logical names of a projection's [out, in] axes (`graph/mesh.py`)."""


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A weight with the logical names of its axes (sharded by them when placed, never at creation)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square norm; `offset` is 1.0 for Gemma-style norms that store `weight - 1`."""

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, dtype: jnp.dtype = jnp.float32,
                 axis: str = "embed"):
        self.weight = _param(jnp.ones((dim,), dtype), (axis,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.weight[...].astype(jnp.float32) + self.offset)).astype(x.dtype)


class Linear(nnx.Module):
    """`x @ kernel.T (+ bias)`, the kernel held in `layout` (`models/backend.py`): [out, in] as checkpoints ship
    it, or packed for a kernel. `axes` names the [out, in] axes (`graph/mesh.py`; unnamed: replicated)."""

    def __init__(self, d_in: int, d_out: int, *, axes: Axes = (None, None), bias: bool = False,
                 dtype: jnp.dtype = jnp.float32, layout: WeightLayout = CHECKPOINT_LAYOUT):
        self.kernel = _param(jnp.zeros(layout.shape(d_out, d_in), dtype), layout.axes(*axes))
        self.bias = _param(jnp.zeros((d_out,), dtype), axes[:1]) if bias else None
        self.d_out = d_out
        self.axes = axes
        self.layout = layout
        self.shards: Shards | None = None
        """The mesh of several devices a packed kernel runs on per shard (`use_backend`); None: one device."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.shards is not None and self.layout.custom_call:
            y = project_per_shard(self.layout, self.shards, self.layout.axes(*self.axes), x, self.kernel[...],
                                  self.d_out)
        else:
            y = self.layout.apply(x, self.kernel[...], self.d_out)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def use_layout(self, layout: WeightLayout) -> None:
        """Hold the kernel in `layout` from now on, packing it there (in place: the weights are never held twice);
        a kernel in GGUF's blocks takes the form `layout` multiplies them in (`WeightLayout.for_blocks`)."""
        self.layout = _relayout(self.kernel, self.layout, layout, self.axes)

    def hold_blocks(self, blocks: QuantizedRows, dtype: jnp.dtype) -> None:
        """Hold the kernel as GGUF's blocks (`GGUFBlocks`), from the [out, in] tensor kept in them."""
        self.layout = _hold_blocks(self.kernel, blocks, dtype, self.axes)


class Embedding(nnx.Module):
    """The token embedding table [vocab, dim], held in `layout`: `embed(tokens)` looks rows up; `attend(hidden)`
    multiplies by the table's transpose, the LM head of a model with tied embeddings (in `CpuPanels`, lookups read
    the panels in place, so a tied head runs through the projection kernel without a second copy of the table).
    """

    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype = jnp.float32,
                 layout: WeightLayout = CHECKPOINT_LAYOUT):
        self.weight = _param(jnp.zeros(layout.shape(vocab_size, dim), dtype), layout.axes(*self.AXES))
        self.vocab_size = vocab_size
        self.dim = dim
        self.layout = layout
        self.shards: Shards | None = None

    AXES: Axes = ("vocab", "embed")

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] -> embeddings [..., dim]."""
        return self.layout.rows(self.weight[...], tokens)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., dim] -> [..., vocab]."""
        if self.shards is not None and self.layout.custom_call:
            return project_per_shard(self.layout, self.shards, self.layout.axes(*self.AXES), hidden,
                                     self.weight[...], self.vocab_size)
        return self.layout.apply(hidden, self.weight[...], self.vocab_size)

    def use_layout(self, layout: WeightLayout) -> None:
        """Hold the table in `layout` from now on, packing it there (in place)."""
        self.layout = _relayout(self.weight, self.layout, layout, self.AXES)

    def hold_blocks(self, blocks: QuantizedRows, dtype: jnp.dtype) -> None:
        """Hold the table as GGUF's blocks (`GGUFBlocks`)."""
        self.layout = _hold_blocks(self.weight, blocks, dtype, self.AXES)


def _hold_blocks(param: nnx.Param, blocks: QuantizedRows, dtype: jnp.dtype, axes: Axes) -> GGUFBlocks:
    layout = GGUFBlocks(blocks.encoding, jnp.dtype(dtype).name)
    assert blocks.blocks.shape == layout.shape(*blocks.shape), (blocks, layout)
    param.set_metadata("out_sharding", layout.axes(*axes))
    param.set_value(blocks.blocks)  # type: ignore[arg-type]
    return layout


def _relayout(param: nnx.Param, old: WeightLayout, new: WeightLayout, axes: Axes) -> WeightLayout:
    if isinstance(old, GGUFBlocks | CpuQuantPanels):  # blocks take the form `new`'s backend multiplies them in
        new = new.for_blocks(old if isinstance(old, GGUFBlocks) else GGUFBlocks(old.encoding))
    if new == old:
        return new
    param.set_metadata("out_sharding", new.axes(*axes))
    w = param[...]
    if isinstance(old, GGUFBlocks):  # the file's rows: repacked for the kernel, or dequantized at load
        raw = np.asarray(w)
        kind = quant.KINDS[old.encoding]
        out, d_in = raw.shape[0], raw.shape[1] // kind.block_bytes * kind.block_weights
        if isinstance(new, CpuQuantPanels):
            value = quant.repack(old.encoding, raw, out, d_in, new.panel, new.int8)
        else:
            dense = quant.dequantize(old.encoding, raw, out, d_in).astype(old.dtype, copy=False)
            value = new.pack(dense) if isinstance(new, CpuPanels) else dense
    else:
        assert not old.packed, f"{old} cannot be repacked into {new}: pack from the checkpoint's [out, in] layout"
        assert not isinstance(new, GGUFBlocks | CpuQuantPanels), f"float weights cannot be held as {new}"
        if not isinstance(new, CpuPanels):
            return new
        value = new.pack(np.asarray(w))
    param.set_value(jax.device_put(value, w.sharding) if isinstance(w, jax.Array) else value)  # type: ignore[arg-type]
    return new


def project_per_shard(layout: WeightLayout, shards: Shards, axes: tuple[str | None, ...], x: jax.Array, w: jax.Array,
                      d_out: int) -> jax.Array:
    """x [..., in] times a packed weight sharded over a mesh (logical `axes`), each device running the kernel on its
    shard (`jax.shard_map`: XLA cannot partition a custom call). Output columns split (Q/K/V, gate/up): each
    device computes its own, a whole number of panels, and the shards concatenate into the padded output.
    Inputs split (the output projection, down): each device multiplies its slice of x, and the partial sums are
    added across the devices. Neither (a replicated weight: the tied LM head): every device computes it all."""
    assert isinstance(layout, CpuPanels | CpuQuantPanels), f"{layout} has no per-shard projection"
    out_axis, in_axis = shards.axis(axes[0]), shards.axis(axes[1])
    assert out_axis is None or in_axis is None, f"a weight split on both axes ({axes}) is not supported"
    lead = (None,) * (x.ndim - 1)
    if out_axis is not None:
        columns = jax.shard_map(lambda x, w: layout.apply(x, w, w.shape[0] * layout.panel), mesh=shards.mesh,
                                in_specs=(PartitionSpec(), PartitionSpec(out_axis)),
                                out_specs=PartitionSpec(*lead, out_axis))
        return columns(x, w)[..., :d_out]
    if in_axis is not None:
        partial_sums = jax.shard_map(lambda x, w: jax.lax.psum(layout.apply(x, w, d_out), in_axis),
                                     mesh=shards.mesh, in_specs=(PartitionSpec(*lead, in_axis),
                                                                 PartitionSpec(None, in_axis)),
                                     out_specs=PartitionSpec())
        return partial_sums(x, w)
    whole = jax.shard_map(lambda x, w: layout.apply(x, w, d_out), mesh=shards.mesh,
                          in_specs=(PartitionSpec(), PartitionSpec()), out_specs=PartitionSpec())
    return whole(x, w)


def use_backend(model: nnx.Module, backend: Backend) -> nnx.Module:
    """Put `model`, built in the checkpoint's layout (the constructors' default backend), on `backend` in place:
    every `Linear` and `Embedding` repacks its weight into `backend.weights`, every module holding a `backend`
    takes this one. The same model built with `backend` has the same structure. Returns `model`."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear | Embedding):
            node.use_layout(backend.weights)
            node.shards = backend.shards
        elif isinstance(node, nnx.Module) and isinstance(getattr(node, "backend", None), Backend):
            node.backend = backend  # type: ignore[attr-defined]
    return model


GATE_UP_BLOCK = 16
"""MLP columns per block of the fused gate/up kernel (`fuse_gate_up`); fewer where F is not a multiple."""


def gate_up_block(hidden: int) -> int:
    return math.gcd(hidden, GATE_UP_BLOCK)


def fuse_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The fused gate/up kernel [2F, D] (or bias [2F]) from gate's and up's rows: blocks of `gate_up_block(F)`
    rows, alternating (gate 0, up 0, gate 1, up 1, ...), so that any even split of the output axis into a
    divisor of F / block parts gives each part matching gate and up columns."""
    f, rest = gate.shape[0], gate.shape[1:]
    assert up.shape == gate.shape, f"gate {gate.shape} and up {up.shape} differ"
    blk = gate_up_block(f)
    return np.stack([gate.reshape(f // blk, blk, *rest), up.reshape(f // blk, blk, *rest)], axis=1).reshape(
        2 * f, *rest)


class GatedMLP(nnx.Module):
    """SwiGLU (or GeGLU) with gate and up fused into one [D, 2F] matmul (laid out by `fuse_gate_up`)."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "silu", dtype: jnp.dtype = jnp.float32,
                 layout: WeightLayout = CHECKPOINT_LAYOUT):
        self.gate_up = Linear(dim, 2 * hidden, axes=("mlp", "embed"), dtype=dtype, layout=layout)
        self.down = Linear(hidden, dim, axes=("embed", "mlp"), dtype=dtype, layout=layout)
        self.hidden = hidden
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, blk = x.shape[:-1], gate_up_block(self.hidden)
        blocks = self.gate_up(x).reshape(*lead, self.hidden // blk, 2, blk)  # [..., F / blk, gate | up, blk]
        gate = blocks[..., 0, :].reshape(*lead, self.hidden)
        up = blocks[..., 1, :].reshape(*lead, self.hidden)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down(act * up)


def fuse_qkv(qkv: Sequence[np.ndarray], num_kv_heads: int) -> np.ndarray:
    """The fused Q/K/V kernel [(H + 2K) * E, D] (or bias) from [q [H * E, ...], k and v [K * E, ...]], grouped by
    KV head: the G = H / K query heads of KV head 0, k head 0, v head 0, then KV head 1's, ...; so any even split
    of the output axis into a divisor of K parts keeps each KV head with its query heads. `split_qkv` undoes it
    on the projection's output."""
    q, k, v = qkv
    rest = q.shape[1:]
    groups = [w.reshape(num_kv_heads, -1, *rest) for w in (q, k, v)]
    return np.concatenate(groups, axis=1).reshape(-1, *rest)


def split_qkv(y: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[jax.Array, ...]:
    """The fused projection's output [..., (H + 2K) * E] (`fuse_qkv`'s layout) -> q [..., H, E], k and v
    [..., K, E]."""
    lead, g = y.shape[:-1], num_heads // num_kv_heads
    groups = y.reshape(*lead, num_kv_heads, g + 2, head_dim)  # [..., K, G q heads | k | v, E]
    return groups[..., :g, :].reshape(*lead, num_heads, head_dim), groups[..., g, :], groups[..., g + 1, :]


# ----------------------------------------------------------------------------------------------- rotary


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
    """cos/sin tables for `positions` [B, T]: each [B, T, E] in the rotate-half layout HF uses.

    Computed once a step: the barrier keeps XLA from fusing cos and sin into every layer's rotation, where a
    loop fusion evaluates them again for each head of each layer (4 of a 77 ms decode step at batch 32 on CPU)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` [B, T, heads, E] by position (rotate-half convention).

    Tables narrower than E (partial rotary, R = cos.shape[-1] < E) turn the leading R dimensions and pass the
    rest through unchanged."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ------------------------------------------------------------------------------------- paged attention


class AttentionBatch(NamedTuple):
    """What every attention layer of one step needs to know about the batch (built once per step)."""

    page_table: jax.Array
    """[B, P] int32: the pages holding each row's past, in order, then page 0 (P is the most pages a row can
    hold; only as many blocks as the longest past needs are read)."""
    past_len: jax.Array
    """[B] int32: tokens already in the cache for each row (the position of the first new token)."""
    cos: jax.Array
    """[B, T, E] rotary tables for the new tokens."""
    sin: jax.Array
    image_block: jax.Array | None = None
    """[B, T] int32 or None: 0 for a text token, k for the tokens of the k-th image; the new tokens of one image
    attend to each other both ways (Gemma 3's `token_type_ids`), within the window on sliding layers. Only the
    new tokens' mask reads it: an image's tokens must all be in one prefill chunk. None: causal only."""


class KVCache(NamedTuple):
    """The page pools of every layer. Keys are stored transposed inside a page so that q·k is a plain matmul.

    Page 0 is never handed to a request: writes of padding tokens land there. `KV_AXES` names the axes.
    """

    k: jax.Array
    """[L, num_pages, K, E, page_size]"""
    v: jax.Array
    """[L, num_pages, K, page_size, E]"""

    @property
    def page_size(self) -> int:
        return int(self.k.shape[-1])


KV_AXES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("layers", "pages", "kv_heads", "head_dim", "page"),
    ("layers", "pages", "kv_heads", "page", "head_dim"),
)
"""The logical axis names of `KVCache.k` and `.v` (`graph/mesh.py`): split by KV head under tensor parallelism."""


BLOCK_TOKENS = 128
"""Tokens of each row's past one attention block visits (whole pages: at least one).

The number of blocks is decided at run time from the longest past in the batch, so one executable serves
every context length (the page table is always `max_pages` wide) and a step costs what its live context
costs, rounded up to a block. Small blocks keep that rounding and the gathered temporaries small; a visit
costs microseconds of loop overhead, which long contexts can afford.
"""


def paged_attention(
    q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, layer: int, batch: AttentionBatch, *,
    scale: float, sliding_window: int | None = None, softcap: float | None = None, past_kernel: PastKernel = False,
    shards: Shards | None = None,
) -> jax.Array:
    """Attention of the new tokens over each row's cached past plus the new tokens themselves (causally).

    q [B, T, H, E], k_new / v_new [B, T, K, E] (rotary already applied) -> [B, T, H, E]. `past_kernel`
    (`Backend.past_kernel`) says who reads the past: True, maxjax's CPU kernel (float32 on CPU): all of the
    attention in `kernels.paged_attention` where the page size and head width are whole vectors and no image
    needs its two-way mask, else the graph's new-token part continued by `kernels.paged_past`; "pallas", the Pallas GPU kernel (`kernels/pallas_past.py`; XLA's form on a mesh or where the head width
    or page size does not fit Triton's tiles); False, XLA's blocks below. The CPU kernel on a mesh of several
    devices (`shards`) runs per shard: each device over its KV heads and its part of the pool.

    The cache is only read here: new keys and values are written for all layers at once after the step, so
    the pool is never copied. The past is visited `BLOCK_TOKENS` at a time, as many blocks as the
    longest past in the batch needs (a loop whose trip count is data, not shape), with an online softmax
    (running max, sum and output), so the gathered pages never exist all at once.
    """
    b, t, h, e = q.shape
    k_heads = k_new.shape[2]
    g = h // k_heads
    m_rows = t * g
    # [B, K, T*G, E]: every query of one KV head in one matrix, so each product is one batched matmul.
    qg = q.reshape(b, t, k_heads, g, e).transpose(0, 2, 1, 3, 4).reshape(b, k_heads, m_rows, e) * scale
    query_pos = jnp.repeat(batch.past_len[:, None] + jnp.arange(t)[None, :], g, axis=1)  # [B, T*G]

    def masked(scores: jax.Array, key_pos: jax.Array, valid: jax.Array) -> jax.Array:
        """scores [B, K, M, S]; key_pos [S] or [B, S]; valid [B, M, S]."""
        if sliding_window is not None:
            valid = valid & ((query_pos[:, :, None] - key_pos[..., None, :]) < sliding_window)
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        return jnp.where(valid[:, None], scores.astype(jnp.float32), -1e30)

    if (past_kernel is True and batch.image_block is None and e % kernels.WHOLE_VECTORS == 0
            and cache.page_size % kernels.WHOLE_VECTORS == 0):  # all of it in the CPU kernel
        assert cache.k.dtype == qg.dtype == jnp.float32, f"the CPU attention kernel reads float32, not {cache.k.dtype}"
        attend: Callable[..., jax.Array] = functools.partial(kernels.paged_attention, layer=layer,
                                                            window=sliding_window, softcap=softcap)
        if shards is not None:
            heads = PartitionSpec(None, shards.axis("kv_heads"))  # q and the output [B, K, ...]
            new = PartitionSpec(None, None, shards.axis("kv_heads"))  # [B, T, K, E] and the pools [L, N, K, ...]
            attend = jax.shard_map(attend, mesh=shards.mesh, out_specs=heads, in_specs=(
                heads, new, new, new, new, PartitionSpec(), PartitionSpec(), PartitionSpec()))
        out = attend(qg, k_new, v_new, cache.k, cache.v, batch.page_table, batch.past_len, query_pos.astype(jnp.int32))
        return out.astype(q.dtype).reshape(b, k_heads, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)

    # The new tokens first: every query sees at least itself, so the running max starts finite.
    new_pos = batch.past_len[:, None] + jnp.arange(t)[None, :]  # [B, T]
    s_new = jnp.einsum("bkme,buke->bkmu", qg, k_new)  # [B, K, M, T]
    allowed = new_pos[:, None, :] <= query_pos[:, :, None]  # [B, M, T]
    if batch.image_block is not None:  # or both tokens in the same image (AND the window, in `masked`)
        query_block = jnp.repeat(batch.image_block, g, axis=1)[:, :, None]  # [B, M, 1]
        allowed = allowed | ((query_block == batch.image_block[:, None, :]) & (query_block > 0))
    s_new = masked(s_new, new_pos, allowed)
    run_max = jnp.max(s_new, axis=-1, keepdims=True)  # [B, K, M, 1]
    p = jnp.exp(s_new - run_max)
    run_sum = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkmu,buke->bkme", p.astype(v_new.dtype), v_new).astype(jnp.float32)

    if past_kernel == "pallas" and (shards is not None or not pallas_past.fits(e, cache.page_size)):
        past_kernel = False  # XLA's form: Triton cannot tile this pool, or a mesh (`pallas_past` says why)
    if batch.page_table.shape[1] and past_kernel:
        if past_kernel == "pallas":
            past = functools.partial(pallas_past.paged_past, layer=layer, window=sliding_window, softcap=softcap)
        else:
            assert cache.k.dtype == qg.dtype == jnp.float32, (
                f"the CPU attention kernel reads float32, not {cache.k.dtype}")
            past = functools.partial(kernels.paged_past, layer=layer, window=sliding_window, softcap=softcap)
        if shards is not None:
            heads = PartitionSpec(None, shards.axis("kv_heads"))  # q and the running sums [B, K, ...]
            pool, whole = PartitionSpec(None, None, shards.axis("kv_heads")), PartitionSpec()
            past = jax.shard_map(past, mesh=shards.mesh, in_specs=(heads, pool, pool, whole, whole, whole, heads,
                                                                   heads, heads), out_specs=(heads, heads, heads))
        run_max, run_sum, out = past(
            qg, cache.k, cache.v, batch.page_table, batch.past_len, query_pos.astype(jnp.int32),
            run_max[..., 0], run_sum[..., 0], out,
        )
        run_max, run_sum = run_max[..., None], run_sum[..., None]
    elif batch.page_table.shape[1]:
        page_size = cache.page_size
        block_pages = max(1, BLOCK_TOKENS // page_size)
        block_len = block_pages * page_size
        pad = -batch.page_table.shape[1] % block_pages
        page_table = jnp.pad(batch.page_table, ((0, 0), (0, pad)))  # padding points at page 0, masked anyway
        # Each pool seen as rows of one page of one layer: a gather of whole rows is the cheapest XLA:CPU has.
        k_rows = cache.k.reshape(-1, k_heads * e * page_size)
        v_rows = cache.v.reshape(-1, k_heads * e * page_size)
        first_row = layer * cache.k.shape[1]

        def visit(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            run_max, run_sum, out = carry
            pages = jax.lax.dynamic_slice_in_dim(page_table, i * block_pages, block_pages, axis=1).reshape(-1)
            k_blk = k_rows.at[first_row + pages].get(mode="promise_in_bounds")  # [B * bp, K * E * ps]
            k_blk = k_blk.reshape(b, block_pages, k_heads, e, page_size).transpose(0, 2, 3, 1, 4)
            k_blk = k_blk.reshape(b, k_heads, e, block_len)
            v_blk = v_rows.at[first_row + pages].get(mode="promise_in_bounds")  # [B * bp, K * ps * E]
            v_blk = v_blk.reshape(b, block_pages, k_heads, page_size, e).transpose(0, 2, 1, 3, 4)
            v_blk = v_blk.reshape(b, k_heads, block_len, e)
            key_pos = i * block_len + jnp.arange(block_len)
            valid = jnp.broadcast_to((key_pos[None, :] < batch.past_len[:, None])[:, None, :], (b, m_rows, block_len))
            s = masked(jnp.einsum("bkme,bkes->bkms", qg, k_blk), key_pos, valid)
            new_max = jnp.maximum(run_max, jnp.max(s, axis=-1, keepdims=True))
            correction = jnp.exp(run_max - new_max)
            p = jnp.exp(s - new_max)
            run_sum = run_sum * correction + jnp.sum(p, axis=-1, keepdims=True)
            out = out * correction + jnp.einsum("bkms,bkse->bkme", p.astype(v_blk.dtype), v_blk)
            return new_max, run_sum, out

        n_blocks = (jnp.max(batch.past_len) + block_len - 1) // block_len
        run_max, run_sum, out = jax.lax.fori_loop(0, n_blocks, visit, (run_max, run_sum, out))

    out = (out / run_sum).astype(q.dtype)
    return out.reshape(b, k_heads, t, g, e).transpose(0, 2, 1, 3, 4).reshape(b, t, h, e)


def write_kv(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.typing.ArrayLike) -> KVCache:
    """Write the step's new keys/values of every layer into the pools in one scatter each.

    new_k / new_v [L, B, T, K, E]; slots [B, T] = page * page_size + offset (padding tokens point into page 0).
    The pools are donated by the caller, so XLA updates them in place.
    """
    ps = cache.page_size
    flat = jnp.asarray(slots).reshape(-1)
    pages, offsets = flat // ps, flat % ps
    n_layers, _, _, k_heads, e = new_k.shape
    k_vals = new_k.reshape(n_layers, -1, k_heads, e).transpose(1, 0, 2, 3)  # [B*T, L, K, E]
    v_vals = new_v.reshape(n_layers, -1, k_heads, e).transpose(1, 0, 2, 3)
    k = cache.k.at[:, pages, :, :, offsets].set(k_vals.astype(cache.k.dtype), mode="promise_in_bounds")
    v = cache.v.at[:, pages, :, offsets, :].set(v_vals.astype(cache.v.dtype), mode="promise_in_bounds")
    return KVCache(k, v)
