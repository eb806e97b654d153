"""Fill the compile cache for a deployment, and optionally prove that `max serve` then starts warm.

    .venv/bin/python scripts/warmup.py [--check] [--no-fill] [MAX SERVE FLAGS...]

Every flag this script does not know goes to `max warm-cache` and, with `--check`, to `max serve` (so both see
the same model, grid and KV pool, and so the same executables). Steps:

1. `max warm-cache FLAGS` compiles whatever the cache lacks (skipped with `--no-fill`).
2. With `--check`: start `max serve FLAGS` on a free port with JAX_LOG_COMPILES=1, time it from the start of
   the process to `/health` 200, send one completion, wait until every cached executable is loaded, and print
   the figures: seconds to ready, the first completion's latency, executables compiled and loaded, compilations
   JAX logged. Exits 1 when the server compiled a model graph although the cache was filled.

`--no-fill --check --compile-cache-dir $(mktemp -d)` measures a cold start (an empty cache).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MAX = str(Path(sys.executable).parent / "max")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def check(flags: list[str], timeout: float, filled: bool) -> int:
    """Start `max serve FLAGS`, time it to /health 200, report; returns the exit status."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="maxjax-warmup-")) / "serve.log"
    env = dict(os.environ, JAX_LOG_COMPILES="1")
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([MAX, "serve", *flags, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        while _get(url + "/health") != 200:
            if proc.poll() is not None or time.perf_counter() - start > timeout:
                print(log.read_text()[-3000:], file=sys.stderr)
                print(f"max serve did not become ready (log: {log})", file=sys.stderr)
                return 1
            time.sleep(0.05)
        ready_s = time.perf_counter() - start
        request = urllib.request.Request(url + "/v1/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "The capital of France is", "max_tokens": 8,
                                                          "temperature": 0}).encode())
        sent = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            text = json.load(response)["choices"][0]["text"]
        first_s = time.perf_counter() - sent
        loaded_s = None
        while time.perf_counter() - start < timeout:
            text_log = log.read_text()
            if "cached executables loaded" in text_log or " 0 found in the compile cache" in text_log:
                loaded_s = time.perf_counter() - start
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = log.read_text().splitlines()
    compiles = [line for line in lines if "Compiling " in line]
    model_compiles = [line for line in compiles if any(f"jit({name})" in line for name in ("step", "score", "encode"))]
    ready = next((line.split(": ", 1)[1] for line in lines if "executables ready in" in line), "?")
    print(f"max serve {' '.join(flags)}")
    print(f"  /health 200 after {ready_s:.1f} s (process start to ready); {ready}")
    if loaded_s is not None:
        print(f"  every executable resident after {loaded_s:.1f} s")
    print(f"  the first completion (8 tokens) took {first_s:.2f} s and said {text!r}")
    print(f"  JAX compile log: {len(model_compiles)} model graphs traced and compiled, {len(compiles)} jit "
          "compilations in all")
    print(f"  server log: {log}")
    if filled and model_compiles:
        print("FAIL: the server compiled model graphs although the cache was filled", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Then time a `max serve` start to /health 200.")
    parser.add_argument("--no-fill", action="store_true", help="Skip `max warm-cache`.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds to wait for the server.")
    args, flags = parser.parse_known_args()
    if not args.no_fill:
        start = time.perf_counter()
        rc = subprocess.call([MAX, "warm-cache", *flags])
        if rc:
            sys.exit(rc)
        print(f"max warm-cache took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.check:
        sys.exit(check(flags, args.timeout, filled=not args.no_fill))


if __name__ == "__main__":
    main()
