"""Where one decode step's time goes, by the server's own compiled graph: a JAX profiler trace of `--steps` steps
(`scripts/bench_decode.py`'s inputs), each custom call named by its target (the projection kernels, attention),
the rest summed as XLA's own ops, and the weight bytes each kind of call reads per step with the rate that makes.

    .venv/bin/python scripts/profile_step.py [--batch 1] [--context 128] [--steps 20]

The trace slows every op a little (the step runs 5-10% longer than `bench_decode.py` says), so read the shares
and rates, not the total. The machine's read rate is `bench_decode.py`'s.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
from bench_decode import decode_inputs

from maxjax.graph.buckets import BucketGrid
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.hub import resolve_model
from maxjax.models.backend import backend_for
from maxjax.pipeline import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    device = jax.devices("cpu")[0]
    loaded = load_model(resolve_model(args.model), platform="cpu")
    cfg = loaded.config
    grid = BucketGrid(max_batch_size=max(args.batch, 1), prefill_chunk=16, max_pages=512, page_size=16)
    pages_per_row = -(-(args.context + 1) // 16)
    spec = CacheSpec(cfg.num_layers, 1 + args.batch * pages_per_row, 16, cfg.num_kv_heads, cfg.head_dim, loaded.dtype)
    runner = ModelRunner(loaded.model, spec, grid, device, backend=backend_for("cpu", loaded.dtype))
    rows = grid.batch_bucket(args.batch)
    shape = (rows, 1, grid.max_pages)
    inputs = decode_inputs(args.batch, rows, args.context, 16, grid.max_pages, runner.vocab_size)
    hlo = runner.compile(shape).as_text()
    target = dict(re.findall(r"(ffi_call(?:\.\d+)?) = .*?custom_call_target=\"(\w+)\"", hlo))
    for _ in range(5):
        np.asarray(runner.step(inputs)[0].tokens)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            np.asarray(runner.step(inputs)[0].tokens)
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.trace.json.gz"))
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_kind: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    step_us = 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name == "ThunkExecutor::Execute (wait for completion)":
            step_us += e.get("dur", 0)
        elif name.startswith("ffi_call"):
            kind = target.get(name, "custom call")
            per_kind[kind] += e.get("dur", 0)
            calls[kind] += 1
        elif not name.startswith(("$", "Thunk", "Pjit", "Common", "Parse", "Handle", "DevicePut", "ffi")):
            per_kind["XLA's own ops"] += e.get("dur", 0)
            calls["XLA's own ops"] += 1
    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(runner.state))
    step_ms = step_us / args.steps / 1e3
    print(f"batch {args.batch}, {args.context} tokens of context: {step_ms:.2f} ms a step traced; weights "
          f"{weight_bytes / 1e6:.1f} MB, read at {weight_bytes / step_ms / 1e6:.1f} GB/s over the whole step")
    quantized = sum(leaf.nbytes for leaf in jax.tree.leaves(runner.state) if leaf.dtype == np.uint8)
    for kind, us in per_kind.most_common():
        ms = us / args.steps / 1e3
        line = f"  {kind:<24} {ms:7.2f} ms  ({calls[kind] // args.steps} calls a step, {100 * ms / step_ms:4.1f}%)"
        if kind == "maxjax_qproject":
            line += f": {quantized / 1e6:.1f} MB of blocks at {quantized / ms / 1e6:.1f} GB/s"
        print(line)


if __name__ == "__main__":
    main()
