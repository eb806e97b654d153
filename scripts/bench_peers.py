"""maxjax against llama.cpp's server on this machine, in one sitting: issue 18's two tables, end to end.

1. Streamed chat, 64 tokens out (EOS ignored), closed loop at each concurrency: `max benchmark` against each
   server in turn, the built-in prompts.
2. One request alone, `/v1/completions` with `max_tokens` 4, prompts of English words cut to N tokens (sent as
   token ids, so both servers see exactly N): seconds to the whole answer.

Each server runs alone (they share the cores): llama.cpp's through `../shared/bench/llama_server.sh` (built
once, about 8 minutes on 2 cores; 32 slots sharing 16,384 tokens of context for the chat table, one slot for the
long prompts, since its slots split the context), then `max serve` with its defaults (run `max warm-cache` first, or the
first requests pay for compiles), timed once its log says it has given every executable its first run (work it
defers past ready; llama.cpp has none). The tables print ratios maxjax / llama.cpp.

  .venv/bin/python scripts/bench_peers.py [--model PATH.gguf] [--concurrency 1,8,16,32] [--prompt-lens 500,1500,5000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SCRIPT = ROOT.parent / "shared" / "bench" / "llama_server.sh"
MAX = ROOT / ".venv" / "bin" / "max"


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server on port {port} exited ({process.returncode}) before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"the server on port {port} was not ready in {timeout:.0f} s")


def start(command: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    print(f"starting: {' '.join(command)} (log: {log})", file=sys.stderr)
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(port, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def chat_table(port: int, levels: str, requests: int, out: Path) -> list[dict[str, Any]]:
    """`max benchmark`'s rows (one per concurrency level) against the server on `port`."""
    command = [str(MAX), "benchmark", "--base-url", f"http://127.0.0.1:{port}/v1", "--concurrency", levels,
               "--num-requests", str(requests), "--output-tokens", "64", "--prompts", "fixed", "--json", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["levels"]


def long_prompt_ids(model: Path, lengths: list[int]) -> dict[int, list[int]]:
    """Token ids of English words, cut to each length, with the model's own tokenizer."""
    from maxjax.bench.workload import WORDS
    from maxjax.tokenizer_gguf import load_gguf_tokenizer
    from maxjax.weights.gguf import read_metadata

    tokenizer = load_gguf_tokenizer(read_metadata(model))
    rng = random.Random(0)
    text = " ".join(rng.choices(WORDS, k=max(lengths) * 2))
    ids = tokenizer.encode(text)
    return {n: ids[:n] for n in lengths}


def served_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        return str(json.load(r)["data"][0]["id"])


def completion_seconds(port: int, ids: list[int]) -> float:
    body = json.dumps({"model": served_model(port), "prompt": ids, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as r:
        r.read()
    return time.perf_counter() - start


SETTLED = "every executable has had its first run"
"""What `max serve` logs once the work it defers past ready (loading executables, their first runs) is done."""


def settle(log: Path, line: str, timeout: float = 180.0) -> None:
    """Wait until the server's log holds `line`: start-up work it does after ready stays out of the timed runs."""
    start_time = time.monotonic()
    while time.monotonic() - start_time < timeout:
        if line in log.read_text(errors="replace"):
            print(f"settled {time.monotonic() - start_time:.1f} s after ready", file=sys.stderr)
            return
        time.sleep(0.5)
    sys.exit(f"{log} never said {line!r} in {timeout:.0f} s")


def measure(name: str, command: list[str], port: int, args: argparse.Namespace, prompts: dict[int, list[int]],
            scratch: Path, alone: list[str] | None = None, settled: str | None = None) -> dict[str, Any]:
    """Both tables against the server `command` starts (once its log says `settled`, where given); the long
    prompts against `alone` instead where given (a server configured for one request: llama.cpp divides its
    context among its slots)."""
    process = start(command, port, scratch / f"{name}.log")
    try:
        if settled is not None:
            settle(scratch / f"{name}.log", settled)
        levels = chat_table(port, args.concurrency, args.num_requests, scratch / f"{name}.json")
        if alone is not None:
            stop(process)
            process = start(alone, port, scratch / f"{name}-alone.log")
        completion_seconds(port, prompts[min(prompts)][:32])  # one small request first: nothing cold is timed
        seconds = {n: completion_seconds(port, ids) for n, ids in prompts.items()}
    finally:
        stop(process)
    return {"levels": levels, "prompt_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file (default: `max fetch`'s model)")
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-lens", default="500,1500,5000")
    parser.add_argument("--skip-llama", action="store_true", help="measure maxjax only")
    parser.add_argument("--int8", action="store_true",
                        help="also measure maxjax with MAXJAX_INT8_ACTIVATIONS=1 (compiles its own executables)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args()
    from maxjax.fetch import default_model_path

    model = args.model or default_model_path()
    lengths = [int(n) for n in args.prompt_lens.split(",")]
    prompts = long_prompt_ids(model, lengths)
    scratch = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    results: dict[str, Any] = {}
    if not args.skip_llama:
        alone_ctx = str(max(lengths) + 64)
        results["llama.cpp"] = measure("llama", [str(LLAMA_SCRIPT), str(model), "8102", "32"], 8102, args, prompts,
                                       scratch, alone=["env", f"CTX={alone_ctx}", str(LLAMA_SCRIPT), str(model), "8102",
                                                       "1"])
    serve = [str(MAX), "serve", "--model", str(model), "--port", "8103"]
    results["maxjax"] = measure("maxjax", serve, 8103, args, prompts, scratch, settled=SETTLED)
    if args.int8:
        results["maxjax int8"] = measure("maxjax-int8", ["env", "MAXJAX_INT8_ACTIVATIONS=1", *serve], 8103, args,
                                         prompts, scratch, settled=SETTLED)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_tables(results: dict[str, Any]) -> None:
    names = list(results)
    levels = [row["concurrency"] for row in results[names[0]]["levels"]]
    width = max(len(n) for n in names) + 2
    print("\nstreamed chat, 64 tokens out: output tok/s (ITL p50 ms; TTFT p50 ms)")
    print(f"{'server':<{width}}" + "".join(f"{'c=' + str(c):>26}" for c in levels))
    for name in names:
        cells = [f"{r['output_throughput']:.1f} ({r['itl_ms']['median']:.1f}; {r['ttft_ms']['median']:.0f})"
                 for r in results[name]["levels"]]
        print(f"{name:<{width}}" + "".join(f"{cell:>26}" for cell in cells))
    peer = results.get("llama.cpp")
    for name in names:
        if peer is None or name == "llama.cpp":
            continue
        ratios = [a["output_throughput"] / b["output_throughput"]
                  for a, b in zip(results[name]["levels"], peer["levels"], strict=True)]
        print(f"{name + ' / llama.cpp':<{width}}" + "".join(f"{f'{r:.2f}x':>26}" for r in ratios))
    print("\none request alone, max_tokens 4: seconds")
    lengths = list(results[names[0]]["prompt_seconds"])
    print(f"{'server':<{width}}" + "".join(f"{str(n) + ' tok':>12}" for n in lengths))
    for name in names:
        seconds = results[name]["prompt_seconds"]
        growth = f"   {lengths[-1]} / {lengths[-2]}: {seconds[lengths[-1]] / seconds[lengths[-2]]:.2f}x" \
            if len(lengths) > 1 else ""
        print(f"{name:<{width}}" + "".join(f"{seconds[n]:>12.2f}" for n in lengths) + growth)


if __name__ == "__main__":
    main()
