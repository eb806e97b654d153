"""One ragged step carrying a prefill chunk and the decode rows together, against today's two executables.

    .venv/bin/python scripts/bench_ragged.py [--model PATH] [--batch 1 8 16] [--chunk 64 256] [--context 128]
                                             [--runs 7] [--steps 3] [--pad 16]

Today an engine iteration with a prompt chunk to prefill and running decode rows runs two executables: a
prefill step (1, chunk) and a decode step (bucket, 1), so the weights are read twice. The ragged step flattens
every new token of the iteration into one token axis [N] (the chunk's tokens, then one per decode row, then
padding up to a multiple of `--pad`) and runs each projection and MLP once over [1, N, D]. Attention is per
token: over the new tokens of its own request (an [N, N] mask: same request, not later) and over its request's
cached past through `kernels.paged_past`, each token a row of one query (its request's page-table row and past
length gathered per token). The KV pool is written once after all layers; each request's last token is sampled
greedily.

The model's own modules are reused (embed, input_norm, qkv, o, post_norm, mlp, norm, logits), on the backend
`ModelRunner` puts it on; only the attention is this script's (`ragged_attention`). Decode rows attend
`--context` cached tokens, filled by real prefill steps of random prompts; the prefill chunk has no past.
Timings interleave the variants (the order flips every run) and report the median ms per iteration; "today /
ragged" is the median of the per-run ratios. Every case first checks that both paths pick the same greedy
tokens on the same pool.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax import kernels
from maxjax.graph import batch
from maxjax.graph import mesh as meshes
from maxjax.graph.batch import StepInputs
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.hub import resolve_model
from maxjax.models.backend import backend_for
from maxjax.models.layers import KVCache, apply_rope, rope_cos_sin, rope_inv_freq, split_qkv, write_kv
from maxjax.pipeline import load_model


@dataclass(frozen=True)
class Request:
    """One request's part of an iteration."""

    tokens: np.ndarray
    """[T] its new tokens (a prompt chunk, or the one token a decode row feeds)."""
    past: int
    """Tokens already cached."""
    pages: np.ndarray
    """Its pages, in order, covering past + new tokens."""
    batch_row: int = 0
    """Its row in the runner's persistent batch (0: the scratch row)."""

    def slots(self, page_size: int) -> np.ndarray:
        pos = self.past + np.arange(len(self.tokens))
        return (self.pages[pos // page_size] * page_size + pos % page_size).astype(np.int32)


class RaggedInputs(NamedTuple):
    tokens: np.ndarray
    """[N] int32: every new token of the iteration, request after request, then padding."""
    positions: np.ndarray
    """[N] int32: each token's position in its request."""
    token_req: np.ndarray
    """[N] int32: each token's request, an index into `req_pages` and `req_past` (0: padding)."""
    slots: np.ndarray
    """[N] int32: where each token's K/V goes (padding -> page 0, the scratch page)."""
    req_pages: np.ndarray
    """[R + 1, P] int32: each request's page table (row 0, padding's: page 0)."""
    req_past: np.ndarray
    """[R + 1] int32: each request's cached tokens."""
    out_index: np.ndarray
    """[R] int32: each request's last token in the token axis (the rows sampled)."""


def runner_inputs(reqs: list[Request], rows: int, width: int, table_width: int, vocab: int,
                  page_size: int) -> StepInputs:
    """Today's batch of `reqs`: one row each, padded to (rows, width) as `batch.padding` lays it out."""
    inputs = batch.padding(rows, width, table_width, vocab)
    for r, req in enumerate(reqs):
        t = len(req.tokens)
        inputs.tokens[r, :t] = req.tokens
        inputs.slots[r, :t] = req.slots(page_size)
        inputs.page_table[r, : len(req.pages)] = req.pages
        inputs.past_len[r] = req.past
        inputs.logit_index[r, 0] = t - 1
        inputs.batch_row[r] = req.batch_row
    return inputs


def ragged_inputs(reqs: list[Request], pad: int, table_width: int, page_size: int) -> RaggedInputs:
    n_live = sum(len(req.tokens) for req in reqs)
    n = -(-n_live // pad) * pad
    tokens, positions, token_req, slots = (np.zeros(n, np.int32) for _ in range(4))
    req_pages = np.zeros((len(reqs) + 1, table_width), np.int32)
    req_past = np.zeros(len(reqs) + 1, np.int32)
    out_index = np.zeros(len(reqs), np.int32)
    at = 0
    for i, req in enumerate(reqs, start=1):
        t = len(req.tokens)
        tokens[at:at + t] = req.tokens
        positions[at:at + t] = req.past + np.arange(t)
        token_req[at:at + t] = i
        slots[at:at + t] = req.slots(page_size)
        req_pages[i, : len(req.pages)] = req.pages
        req_past[i] = req.past
        at += t
        out_index[i - 1] = at - 1
    return RaggedInputs(tokens, positions, token_req, slots, req_pages, req_past, out_index)


# ------------------------------------------------------------------------------------------ the ragged step


def ragged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, layer: int,
                     page_table: jax.Array, past_len: jax.Array, positions: jax.Array, token_req: jax.Array,
                     *, scale: float, window: int | None) -> jax.Array:
    """q [N, H, E], k_new / v_new [N, K, E] (rotary applied) -> [N, H, E]: each token over the new tokens of its
    request up to itself, then over its request's cached past (`kernels.paged_past`, one row per token)."""
    n, h, e = q.shape
    k_heads = k_new.shape[1]
    g = h // k_heads
    qg = q.reshape(n, k_heads, g, e) * scale  # [N, K, G, E]: the kernel's [B, K, M, E] with B = N, M = G
    # The new tokens as one matrix per KV head ([K, N * G, E] queries, like paged_attention's [B, K, T * G, E]):
    # the scores [K, N * G, N] are born in the layout the softmax reduces, with no transpose of their own.
    qk = qg.transpose(1, 0, 2, 3).reshape(k_heads, n * g, e)
    visible = (token_req[:, None] == token_req[None, :]) & (positions[None, :] <= positions[:, None])  # [N, N]
    if window is not None:
        visible = visible & (positions[:, None] - positions[None, :] < window)
    scores = jnp.einsum("kme,uke->kmu", qk, k_new)  # [K, N * G, N]
    scores = jnp.where(jnp.repeat(visible, g, axis=0)[None], scores, -1e30)
    run_max = jnp.max(scores, axis=-1)  # every token sees itself: finite
    p = jnp.exp(scores - run_max[..., None])
    run_sum = jnp.sum(p, axis=-1)
    out = jnp.einsum("kmu,uke->kme", p, v_new)  # [K, N * G, E]

    def per_token(a: jax.Array) -> jax.Array:  # [K, N * G, ...] -> [N, K, G, ...]
        return jnp.moveaxis(a.reshape(k_heads, n, g, *a.shape[2:]), 0, 1)

    query_pos = jnp.broadcast_to(positions[:, None], (n, g)).astype(jnp.int32)
    run_max, run_sum, out = kernels.paged_past(
        qg, cache.k, cache.v, page_table, past_len, query_pos, per_token(run_max), per_token(run_sum),
        per_token(out), layer=layer, window=window, softcap=None,
    )
    return (out / run_sum[..., None]).reshape(n, h, e)


def _ragged_step(graphdef: nnx.GraphDef, treedef: Any, attend: bool, params: list[jax.Array], cache: KVCache,
                 r: RaggedInputs) -> tuple[KVCache, jax.Array]:
    """(params, pool, ragged batch) -> (pool, greedy token of each request [R]). With `attend` False the
    attention is skipped (its output is q): what the step costs without it."""
    model: Any = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    cfg = model.cfg
    h, k_heads, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n = r.tokens.shape[0]
    page_table, past_len = r.req_pages[r.token_req], r.req_past[r.token_req]  # [N, P], [N]
    x = model.embed(r.tokens[None])  # [1, N, D]
    cos, sin = rope_cos_sin(r.positions[None], rope_inv_freq(cfg.rope, cfg.rotary_dim or cfg.head_dim))
    new_k, new_v = [], []
    for i, layer in enumerate(model.layers):
        q, k, v = split_qkv(layer.qkv(layer.input_norm(x)), h, k_heads, e)  # [1, N, H | K, E]
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = q[0]
        if attend:
            attn = ragged_attention(q[0], k[0], v[0], cache, i, page_table, past_len, r.positions, r.token_req,
                                    scale=cfg.attention_scale, window=cfg.layer_window(i))
        x = x + layer.o(attn.reshape(1, n, h * e))
        x = x + layer.mlp(layer.post_norm(x))
        new_k.append(k)
        new_v.append(v)
    raw = model.logits(model.norm(x[0, r.out_index]))  # [R, V]
    # As in runner._step: the write visibly after the last layer's reads, so XLA does not copy the pool.
    after_reads = (raw[0, 0] > jnp.inf).astype(cache.k.dtype)
    cache = write_kv(cache, jnp.stack(new_k) + after_reads, jnp.stack(new_v) + after_reads, r.slots[None])
    return cache, jnp.argmax(raw, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- measuring


def measure(fns: dict[str, Callable[[], Any]], runs: int, steps: int) -> dict[str, list[float]]:
    """ms per call of each fn, one figure per run; the variants interleaved, their order flipped every run."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for run in range(runs):
        for name in names if run % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16], help="decode rows per iteration")
    parser.add_argument("--chunk", type=int, nargs="+", default=[64, 256], help="prefill chunk lengths")
    parser.add_argument("--context", type=int, default=128, help="cached tokens of each decode row")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="iterations timed per run")
    parser.add_argument("--pad", type=int, default=16, help="the ragged token axis is padded to a multiple of this")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=8192, help="sets the page-table width, as the server's")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the ragged step without attention")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("batch", "chunk"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} {getattr(args, name)}: every value must be at least 1")
    if args.context < 0 or args.pad < 1 or args.runs < 1 or args.steps < 1:
        parser.error("--context must be >= 0, --pad, --runs and --steps >= 1")

    loaded = load_model(resolve_model(args.model))
    cfg = loaded.config
    ps, max_rows = args.page_size, max(args.batch)
    chunk_cap = 1 << max(4, (max(args.chunk) - 1).bit_length())
    grid = BucketGrid(max_batch_size=max_rows, prefill_chunk=chunk_cap, max_pages=-(-args.max_length // ps),
                      page_size=ps)
    if max(args.chunk) > args.max_length or args.context + 1 > args.max_length:
        parser.error(f"--chunk and --context must fit in --max-length {args.max_length}")
    decode_pages = -(-(args.context + 1) // ps)
    prefill_pages = -(-chunk_cap // ps)
    spec = CacheSpec(cfg.num_layers, 1 + max_rows * decode_pages + prefill_pages, ps, cfg.num_kv_heads,
                     cfg.head_dim, loaded.dtype)
    backend = backend_for(jax.devices()[0].platform, loaded.dtype)
    if backend.past_kernel is not True:
        raise SystemExit(f"the ragged step reads the past through maxjax's CPU kernel; this backend ({backend}) "
                         "has none: run on CPU with float32 weights and a C++ compiler")
    runner = ModelRunner(loaded.model, spec, grid, backend=backend)
    table_width, vocab = grid.max_pages, runner.vocab_size
    params, treedef = jax.tree.flatten(runner.state)  # the runner's placed, packed weights: not a copy
    weight_mb = sum(p.nbytes for p in params) / 2**20
    rep = meshes.replicated(runner.mesh)
    jitted = jax.jit(_ragged_step, static_argnums=(0, 1, 2), donate_argnums=(4,),
                     out_shardings=(spec.shardings(runner.mesh), rep))

    def ragged(r: RaggedInputs, attend: bool = True) -> np.ndarray:
        runner.cache, tokens = jitted(runner.graphdef, treedef, attend, params, runner.cache, r)
        return np.asarray(tokens)

    def today(steps: list[StepInputs]) -> list[np.ndarray]:
        outs = [runner.step(inputs)[0].tokens for inputs in steps]  # all dispatched, then all fetched
        return [np.asarray(out) for out in outs]

    print(f"{cfg.architecture}, {cfg.num_layers} layers, weights {weight_mb:.0f} MiB {jnp.dtype(loaded.dtype).name}; "
          f"{backend}; {jax.devices()[0]}")
    print(f"decode rows: {args.context} cached tokens each; prefill chunk: no past; ragged N padded to a multiple "
          f"of {args.pad}; median of {args.runs} runs x {args.steps} iterations, interleaved")

    # Each decode row's past, prefilled for real; its next token is the one that prefill picked.
    rng = np.random.default_rng(args.seed)
    decode_rows: list[Request] = []
    width = grid.chunk_bucket(min(args.context, chunk_cap)) if args.context else 0
    if width:
        runner.compile((1, width, table_width))
    for r in range(max_rows):
        pages = 1 + r * decode_pages + np.arange(decode_pages, dtype=np.int32)
        prompt = rng.integers(0, vocab, args.context, dtype=np.int32)
        token = rng.integers(0, vocab, dtype=np.int32)
        for start in range(0, args.context, width):
            piece = Request(prompt[start:start + width], start, pages)
            token = today([runner_inputs([piece], 1, width, table_width, vocab, ps)])[0][0]
        decode_rows.append(Request(np.array([token], np.int32), args.context, pages, batch_row=r + 1))
    prefill_pages_ids = 1 + max_rows * decode_pages + np.arange(prefill_pages, dtype=np.int32)

    header = (f"{'iteration':<24} {'today ms':>9} {'(prefill':>9} {'decode)':>8} {'N':>5} {'ragged ms':>10} "
              f"{'w/o attn':>9} {'today/ragged':>13}  same tokens")
    lines = []
    cases = [(chunk, rows) for chunk in args.chunk for rows in args.batch] + [(0, rows) for rows in args.batch]
    for chunk, rows in cases:
        decodes = decode_rows[:rows]
        bucket = grid.batch_bucket(rows)
        steps = []
        reqs = list(decodes)
        if chunk:
            prefill = Request(rng.integers(0, vocab, chunk, dtype=np.int32), 0, prefill_pages_ids)
            steps.append(runner_inputs([prefill], 1, grid.chunk_bucket(chunk), table_width, vocab, ps))
            reqs = [prefill, *decodes]
        steps.append(runner_inputs(decodes, bucket, 1, table_width, vocab, ps))
        r = ragged_inputs(reqs, args.pad, table_width, ps)
        for inputs in steps:
            runner.compile((*inputs.tokens.shape, table_width))

        # Correctness, on the same pool: both paths write the same slots, and neither reads a slot it writes.
        ref = today(steps)
        want = np.concatenate([ref[0][:1]] * bool(chunk) + [ref[-1][:rows]])
        got = ragged(r)
        same = f"{int((got == want).sum())}/{len(want)}"

        fns: dict[str, Callable[[], Any]] = {"today": partial(today, steps), "ragged": partial(ragged, r)}
        if chunk:
            fns["prefill"] = partial(today, steps[:1])
            fns["decode"] = partial(today, steps[1:])
        if not args.no_breakdown:
            ragged(r, attend=False)
            fns["noattn"] = partial(ragged, r, False)
        for fn in fns.values():
            fn()  # first runs (XLA:CPU builds its runtime objects then)
        times = measure(fns, args.runs, args.steps)
        ms = {name: statistics.median(t) for name, t in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["today"], times["ragged"], strict=True))
        name = f"chunk {chunk:3d} + {rows:2d} decode" if chunk else f"decode only, {rows:2d} rows"
        parts = (f"{ms['prefill']:9.1f} {ms['decode']:8.1f}" if chunk else f"{'':9} {ms['today']:8.1f}")
        noattn = f"{ms['noattn']:9.1f}" if "noattn" in ms else f"{'-':>9}"
        line = (f"{name:<24} {ms['today']:9.1f} {parts} {len(r.tokens):5d} {ms['ragged']:10.1f} {noattn} "
                f"{ratio:12.2f}x  {same}")
        lines.append((chunk, ratio))
        if len(lines) == 1:
            print(header)
        print(line, flush=True)

    mixed = [ratio for chunk, ratio in lines if chunk]
    alone = [ratio for chunk, ratio in lines if not chunk]
    print(f"conclusion: with a prefill chunk, one ragged step runs {min(mixed):.2f}-{max(mixed):.2f}x the speed of "
          f"today's two executables; with decode rows only, {min(alone):.2f}-{max(alone):.2f}x today's decode step "
          "(>1: ragged faster)." if mixed else
          f"conclusion: decode rows only, ragged at {min(alone):.2f}-{max(alone):.2f}x today's decode step's speed.")


if __name__ == "__main__":
    main()
