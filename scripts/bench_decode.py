"""Time the decode step the server runs (the same compiled graph, sampling included) at several batch sizes.

    .venv/bin/python scripts/bench_decode.py [--model PATH] [--batch 1 8 32] [--context 256] [--runs 5]
                                             [--device cpu|gpu|tpu] [--xla-attention]

Each row attends `--context` cached tokens; row 0 samples with temperature 0.8 and top-p 0.9, the rest are
greedy. Prints the median step time over `--runs` runs of `--steps` steps (each step waits for its tokens,
as the engine loop does) and, beside it, the bound that reading every weight once per step at the device's
memory bandwidth sets (weight bytes / bandwidth per step, batch / that in tok/s); then the device's memory
bandwidth and float32 matmul rate as JAX measures them (all cores on CPU; best of 5), so the numbers can be
read against the roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.graph import batch
from maxjax.graph.batch import StepInputs
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.hub import resolve_model
from maxjax.models.backend import backend_for
from maxjax.pipeline import load_model


def best_of(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_rates() -> tuple[float, float]:
    """(GB/s read by a jitted sum over 1 GiB, float32 GFLOP/s of a 4096^2 matmul)."""
    big = jnp.ones((256, 1024, 1024), jnp.float32)
    total = jax.jit(jnp.sum)
    read_s = best_of(lambda: total(big).block_until_ready())
    a = jnp.ones((4096, 4096), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    mm_s = best_of(lambda: matmul(a, a).block_until_ready())
    return 2**30 / read_s / 1e9, 2 * 4096**3 / mm_s / 1e9


def decode_inputs(rows: int, bucket: int, context: int, page_size: int, table_width: int,
                  vocab_size: int) -> StepInputs:
    inputs = batch.padding(bucket, 1, table_width, vocab_size=vocab_size)
    pages_per_row = -(-(context + 1) // page_size)
    for r in range(rows):
        pages = 1 + r * pages_per_row + np.arange(pages_per_row)
        inputs.page_table[r, : min(pages_per_row, table_width)] = pages[:table_width]
        inputs.slots[r, 0] = pages[context // page_size] * page_size + context % page_size
        inputs.past_len[r] = context
    inputs.tokens[:] = 42
    inputs.sampling.temperature[0], inputs.sampling.top_p[0] = 0.8, 0.9  # row 0 samples with top-p
    inputs.sampling.seed[:] = np.arange(bucket, dtype=np.uint32)
    inputs.sampling.position[:] = context
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=8192,
                        help="the server's --max-length: it sets the page-table width (default: the server's)")
    parser.add_argument("--device", choices=["cpu", "gpu", "tpu"], default=None,
                        help="the platform to time on, its first device (default: JAX's default backend)")
    parser.add_argument("--xla-attention", action="store_true",
                        help="trace attention over the past with XLA's gathers instead of maxjax's kernel (the CPU "
                             "kernel; on GPU the Pallas kernel; the projection kernel stays), to compare the two")
    args = parser.parse_args()

    device = jax.devices(args.device)[0] if args.device else jax.devices()[0]
    loaded = load_model(resolve_model(args.model), platform=device.platform)
    cfg = loaded.config
    max_batch = max(args.batch)
    pages_per_row = -(-(args.context + 1) // args.page_size)
    grid = BucketGrid(max_batch_size=max_batch, prefill_chunk=16, max_pages=-(-args.max_length // args.page_size),
                      page_size=args.page_size)
    spec = CacheSpec(cfg.num_layers, 1 + max_batch * pages_per_row, args.page_size, cfg.num_kv_heads, cfg.head_dim,
                     loaded.dtype)
    backend = backend_for(device.platform, loaded.dtype)
    if args.xla_attention:
        backend = dataclasses.replace(backend, past_kernel=False)
    runner = ModelRunner(loaded.model, spec, grid, device, backend=backend)
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(runner.state))
    with jax.default_device(device):
        bandwidth, gflops = machine_rates()
    bound_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    print(f"device {device}, dtype {jnp.dtype(loaded.dtype).name}, context {args.context} tokens, "
          f"page size {args.page_size}, {backend}")
    print(f"weights {weight_bytes / 2**20:.1f} MiB: read once per step at {bandwidth:.1f} GB/s, a step takes at least "
          f"{bound_ms:.3f} ms")
    for rows in args.batch:
        bucket = grid.batch_bucket(rows)
        pages = grid.max_pages
        inputs = decode_inputs(rows, bucket, args.context, args.page_size, pages, runner.vocab_size)
        start = time.perf_counter()
        runner.compile((bucket, 1, pages))
        compile_s = time.perf_counter() - start

        def run(inputs: StepInputs = inputs) -> None:
            for _ in range(args.steps):
                np.asarray(runner.step(inputs)[0].tokens)

        run()
        step_ms = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run()
            step_ms.append((time.perf_counter() - start) / args.steps * 1e3)
        ms = statistics.median(step_ms)
        print(f"batch {rows:3d}: {ms:7.2f} ms/step  {rows / ms * 1e3:7.1f} tok/s   (weights-read bound "
              f"{rows / bound_ms * 1e3:9.1f} tok/s; compile {compile_s:.1f} s)")
    print(f"machine: memory read {bandwidth:.1f} GB/s, float32 matmul {gflops:.0f} GFLOP/s "
          f"(JAX on {device.platform}, best of 5)")


if __name__ == "__main__":
    main()
