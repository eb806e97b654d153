"""Time the quantized projection kernel (`maxjax_qproject`) against the float32 one (`maxjax_project`) on
SmolLM2-135M's projection shapes.

    .venv/bin/python scripts/bench_qproject.py [--rows 1 8] [--runs 7] [--min-mb 96] [--kinds q8_0 q4_1] [--layers]

Each shape is timed as a chain of calls on distinct copies of the weight, at least `--min-mb` MB of them for
every form (float32 too), so that, as in a decode step, the weights come from memory and not from the 32 MB of
L3. Prints the median time per call over `--runs` runs and the rate at which the weights were read (bytes of the
packed form / time), then this machine's memory read rate as `bench_decode.py` measures it.

With `--layers`, instead: SmolLM2's 30 layers of projections as a decode step chains them (QKV, O, gate/up,
down, each feeding the next), in each of `--kinds`, the kinds taking turns within one process so that the
machine's drift between runs falls on all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import gguf
import jax
import numpy as np
from bench_decode import machine_rates

from maxjax import kernels
from maxjax.kernels import quant

SHAPES = [(576, 576, "q / o"), (1536, 576, "gate / up"), (576, 1536, "down"), (960, 576, "qkv fused"),
          (49152, 576, "tied LM head")]


def timed(fn: Callable[[], object], runs: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--min-mb", type=float, default=96.0)
    parser.add_argument("--kinds", nargs="+", default=["q8_0", "q4_1"], choices=list(quant.KINDS))
    parser.add_argument("--layers", action="store_true", help="time the 30 layers' chain (docstring)")
    args = parser.parse_args()
    if args.layers:
        layers_chain(args)
        return

    built = kernels.load()
    assert built is not None, "the CPU kernels did not build"
    rng = np.random.default_rng(0)
    print(f"panel {built.panel}, {jax.device_count()} device(s), median of {args.runs} runs; "
          "GB/s = bytes of the packed weights read / time")
    print(f"{'shape':>24} {'rows':>4} | " + " | ".join(f"{name:>22}" for name in ["float32", *args.kinds]))
    for out, in_, label in SHAPES:
        w = (rng.standard_normal((out, in_)) * 0.05).astype(np.float32)
        forms: dict[str, tuple[np.ndarray, Callable[..., jax.Array]]] = {
            "float32": (kernels.pack(w, built.panel), lambda x, p, out=out: kernels.project(x, p, out))}
        for kind in args.kinds:
            raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType(quant.KINDS[kind].ggml_type))
            forms[kind] = (quant.repack(kind, raw, out, in_, built.panel),
                           lambda x, p, kind=kind, out=out: quant.qproject(x, p, kind, out))
        for rows in args.rows:
            x = jax.numpy.asarray(rng.standard_normal((rows, in_)), np.float32)
            cells = []
            for packed, call in forms.values():
                copies = max(1, int(np.ceil(args.min_mb * 1e6 / packed.nbytes)))
                weights = [jax.device_put(packed.copy()) for _ in range(copies)]
                chain = jax.jit(lambda x, ws, call=call: [call(x, w) for w in ws])
                seconds = timed(lambda chain=chain, x=x, weights=weights: chain(x, weights), args.runs) / copies
                cells.append(f"{seconds * 1e3:7.3f} ms {packed.nbytes / seconds / 1e9:6.1f} GB/s")
                del weights
            print(f"{label:>12} {out:5d}x{in_:<5d} {rows:4d} | " + " | ".join(f"{c:>22}" for c in cells))
    bandwidth, gflops = machine_rates()
    print(f"machine: memory read {bandwidth:.1f} GB/s, float32 matmul {gflops:.0f} GFLOP/s (bench_decode.py's)")


def layers_chain(args: argparse.Namespace) -> None:
    """The 30-layer chain of SmolLM2's projections in each kind, the kinds taking turns (`--layers`)."""
    built = kernels.load()
    assert built is not None, "the CPU kernels did not build"
    rng = np.random.default_rng(0)
    d, qkv, ffn = 576, 960, 1536
    shapes = [(qkv, d), (d, d), (2 * ffn, d), (d, ffn)]
    chains = {}
    for kind in args.kinds:
        packed = []
        for out, in_ in shapes:
            w = (rng.standard_normal((out, in_)) * 0.05).astype(np.float32)
            raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType(quant.KINDS[kind].ggml_type))
            packed.append(quant.repack(kind, raw, out, in_, built.panel))
        chains[kind] = [[jax.device_put(p.copy()) for p in packed] for _ in range(30)]

    def step(x: jax.Array, layers: list[list[jax.Array]], kind: str) -> jax.Array:
        for w_qkv, w_o, w_gate_up, w_down in layers:
            h = quant.qproject(x, w_qkv, kind, qkv)
            x = x + quant.qproject(h[:, :d], w_o, kind, d)
            g = quant.qproject(x, w_gate_up, kind, 2 * ffn)
            x = x + quant.qproject(g[:, :ffn] * g[:, ffn:], w_down, kind, d)
        return x

    run = jax.jit(step, static_argnums=2)
    for rows in args.rows:
        x = jax.numpy.asarray(rng.standard_normal((rows, d)) * 0.1, np.float32)
        times: dict[str, list[float]] = {kind: [] for kind in args.kinds}
        for kind in args.kinds:
            jax.block_until_ready(run(x, chains[kind], kind))
        for _ in range(args.runs):
            for kind in args.kinds:
                start = time.perf_counter()
                jax.block_until_ready(run(x, chains[kind], kind))
                times[kind].append(time.perf_counter() - start)
        for kind in args.kinds:
            nbytes = sum(w.nbytes for layer in chains[kind] for w in layer)
            seconds = statistics.median(times[kind])
            print(f"30 layers, {kind:>5}, {rows:3d} rows: {seconds * 1e3:7.2f} ms, {nbytes / 1e6:6.1f} MB "
                  f"at {nbytes / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
