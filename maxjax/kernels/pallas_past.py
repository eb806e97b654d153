"""Attention over the paged past on GPU: a Pallas (Triton) kernel that reads maxjax's pool in place.

The same contract as the CPU kernel (`kernels.paged_past`): it continues the online softmax the new tokens
started (running max, sum and output) over each row's cached past, and hands the three back. One program per
(row, KV head, block of query rows): it walks the row's pages in the page table, one page a visit, loading the
page's keys [E, page] (the pool keeps keys transposed inside a page, so q·k is a plain [M, E] x [E, page]
product) and values [page, E] straight from `k [L, pages, K, E, page]` and `v [L, pages, K, page, E]`: no page is
ever gathered into a temporary, and a row costs what its own past costs (not the longest row's).

Why not JAX's `pallas.ops.gpu.paged_attention`: it wants one layer's pool as [K, pages, page, E] for both keys
and values (maxjax's keys are transposed inside a page and the pools stack the layers, so it would take a copy
of the pool every step), it returns the normalized output (the new tokens' part could not be folded in), and it
has no sliding window. The query rows M = T * G are the queries of every new token of one KV head, so the same
kernel serves decode (M = G, padded to a block of 16) and prefill chunks.

Triton's limits: the loaded tiles' sides are powers of two and a product's at least 16, so `fits` asks for a
power-of-two head width and page size of 16 or more; elsewhere `layers.paged_attention` keeps XLA's form. It keeps
it on a mesh of several devices too: under `jax.shard_map` the kernel could not be run here (Pallas's interpreter
inside a manual computation fails on CPU: "xla.sdy.GlobalToLocalShape" has no host implementation), and XLA
partitions its own form.
`interpret=True` runs the same kernel through Pallas's interpreter on any backend (the tests, on CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MIN_TILE = 16
"""The smallest side of a Triton product: query rows are padded to it, and pages and heads must reach it."""
MAX_ROWS = 64
"""Query rows per program: a prefill chunk's T * G rows are split into blocks of at most this many."""


def fits(head_dim: int, page_size: int) -> bool:
    """Whether the compiled kernel takes pools of this head width and page size (powers of two, at least 16)."""
    return all(n >= MIN_TILE and n & (n - 1) == 0 for n in (head_dim, page_size))


def _block_rows(m: int) -> int:
    return min(MAX_ROWS, max(MIN_TILE, 1 << (m - 1).bit_length()))


def _visit_pages(q_ref: Any, k_ref: Any, v_ref: Any, table_ref: Any, past_ref: Any, qpos_ref: Any, max_ref: Any,
                 sum_ref: Any, out_ref: Any, max_out: Any, sum_out: Any, out_out: Any, *, layer: int,
                 window: int | None, softcap: float | None) -> None:
    """One (row, KV head, block of query rows): q [M, E], qpos [M], the running max / sum [M] and output [M, E]."""
    row, head = pl.program_id(0), pl.program_id(1)
    page_size = k_ref.shape[-1]
    past = past_ref[row]
    q = q_ref[...]
    qpos = qpos_ref[...]
    # A query never sees a key `window` or more behind it, and the earliest query is at `past`.
    # Integer division as lax.div (truncating; both sides are non-negative): floor division's sign fix-up is more
    # than Triton's lowering needs to see.
    first = 0 if window is None else jax.lax.div(jnp.maximum(past - window + 1, 0), page_size)

    def visit(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        run_max, run_sum, out = carry
        page = table_ref[i]
        k = k_ref[layer, page, head, :, :]  # [E, page]
        v = v_ref[layer, page, head, :, :]  # [page, E]
        s = jnp.dot(q, k, preferred_element_type=jnp.float32)  # [M, page]
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        key_pos = i * page_size + jnp.arange(page_size, dtype=jnp.int32)
        valid = key_pos[None, :] < past
        if window is not None:
            valid = valid & ((qpos[:, None] - key_pos[None, :]) < window)
        s = jnp.where(valid, s, -1e30)
        new_max = jnp.maximum(run_max, jnp.max(s, axis=1))
        correction = jnp.exp(run_max - new_max)
        p = jnp.exp(s - new_max[:, None])
        run_sum = run_sum * correction + jnp.sum(p, axis=1)
        out = out * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_max, run_sum, out

    n_pages = pl.cdiv(past, page_size)
    run_max, run_sum, out = jax.lax.fori_loop(first, n_pages, visit, (max_ref[...], sum_ref[...], out_ref[...]))
    max_out[...], sum_out[...], out_out[...] = run_max, run_sum, out


@functools.partial(jax.jit, static_argnames=("layer", "window", "softcap", "interpret"))
def paged_past(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, page_table: jax.Array, past_len: jax.Array,
               query_pos: jax.Array, run_max: jax.Array, run_sum: jax.Array, out: jax.Array, *, layer: int,
               window: int | None, softcap: float | None, interpret: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Continue an online softmax over each row's cached past, read from the pool in place: q [B, K, M, E] scaled
    queries; query_pos [B, M]; run_max, run_sum [B, K, M]; out [B, K, M, E] (float32) -> the three, updated."""
    from jax.experimental.pallas import triton as plgpu

    b, k_heads, m, e = q.shape
    rows = _block_rows(m)
    pad = -m % rows
    if pad:  # padded rows: zero queries over a finite running state, sliced off below
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
        query_pos = jnp.pad(query_pos, ((0, 0), (0, pad)), mode="edge")
        run_max = jnp.pad(run_max, ((0, 0), (0, 0), (0, pad)))
        run_sum = jnp.pad(run_sum, ((0, 0), (0, 0), (0, pad)), constant_values=1.0)
        out = jnp.pad(out, ((0, 0), (0, 0), (0, pad), (0, 0)))
    mp = m + pad

    def whole(shape: tuple[int, ...]) -> pl.BlockSpec:
        return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))

    per_rows = pl.BlockSpec((None, None, rows), lambda i, h, j: (i, h, j))
    per_rows_e = pl.BlockSpec((None, None, rows, e), lambda i, h, j: (i, h, j, 0))
    kernel = functools.partial(_visit_pages, layer=layer, window=window, softcap=softcap)
    run_max, run_sum, out = pl.pallas_call(
        kernel,
        grid=(b, k_heads, mp // rows),
        in_specs=[
            per_rows_e,  # q
            whole(k_pool.shape),  # the pools: read page by page through the page table
            whole(v_pool.shape),
            pl.BlockSpec((None, page_table.shape[1]), lambda i, h, j: (i, 0)),
            whole(past_len.shape),
            pl.BlockSpec((None, rows), lambda i, h, j: (i, j)),  # query_pos
            per_rows, per_rows, per_rows_e,
        ],
        out_specs=[per_rows, per_rows, per_rows_e],
        out_shape=[jax.ShapeDtypeStruct((b, k_heads, mp), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((b, k_heads, mp, e), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="maxjax_paged_past",
    )(q, k_pool, v_pool, page_table, past_len, query_pos.astype(jnp.int32), run_max.astype(jnp.float32),
      run_sum.astype(jnp.float32), out.astype(jnp.float32))
    return run_max[:, :, :m], run_sum[:, :, :m], out[:, :, :m]
