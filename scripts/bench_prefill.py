"""Time one prefill chunk of one prompt at several lengths of cached past: where a long prompt's time goes.

    .venv/bin/python scripts/bench_prefill.py [--model PATH] [--chunk 512] [--past 0 1024 2048 4096]
                                              [--runs 3] [--xla-attention]

Each step is the server's compiled prefill graph (sampling included) for one row of `--chunk` new tokens after
`--past` cached tokens. A prompt of N tokens is N / chunk such steps at pasts 0, chunk, 2 chunk, ..., so the
growth of the step time with the past is what makes long prompts cost more than their length: the projections
cost the same at every past, attention over the past grows with it. Prints the median step time of `--runs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from maxjax.graph import batch
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.hub import resolve_model
from maxjax.models.backend import backend_for
from maxjax.pipeline import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--past", type=int, nargs="+", default=[0, 1024, 2048, 4096])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--xla-attention", action="store_true",
                        help="attention over the past in XLA's form instead of maxjax's CPU kernel")
    args = parser.parse_args()

    device = jax.devices()[0]
    loaded = load_model(resolve_model(args.model), platform=device.platform)
    cfg = loaded.config
    ps = args.page_size
    pages = -(-(max(args.past) + args.chunk) // ps)
    grid = BucketGrid(max_batch_size=1, prefill_chunk=args.chunk, max_pages=-(-args.max_length // ps), page_size=ps)
    spec = CacheSpec(cfg.num_layers, 1 + pages, ps, cfg.num_kv_heads, cfg.head_dim, loaded.dtype)
    backend = backend_for(device.platform, loaded.dtype)
    if args.xla_attention:
        backend = dataclasses.replace(backend, past_kernel=False)
    runner = ModelRunner(loaded.model, spec, grid, device, backend=backend)
    shape = (1, args.chunk, grid.max_pages)
    start = time.perf_counter()
    runner.compile(shape)
    print(f"{backend}; chunk {args.chunk}, compile {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    for past in args.past:
        inputs = batch.padding(1, args.chunk, grid.max_pages, vocab_size=runner.vocab_size)
        row_pages = 1 + np.arange(-(-(past + args.chunk) // ps))
        inputs.page_table[0, : len(row_pages)] = row_pages
        positions = past + np.arange(args.chunk)
        inputs.slots[0] = row_pages[positions // ps] * ps + positions % ps
        inputs.past_len[0] = past
        inputs.tokens[0] = rng.integers(100, 10000, args.chunk)
        inputs.logit_index[0, 0] = args.chunk - 1
        inputs.batch_row[0] = 1
        inputs.sampling.position[0] = past + args.chunk - 1
        np.asarray(runner.step(inputs)[0].tokens)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            np.asarray(runner.step(inputs)[0].tokens)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        print(f"past {past:6d}: {ms:8.1f} ms  ({ms / args.chunk:.2f} ms/token)")


if __name__ == "__main__":
    main()
