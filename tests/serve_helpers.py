"""Real servers on 127.0.0.1 for tests that talk HTTP: the app on Hypercorn in a background thread
(`running_server`), or the installed `max serve` command in a process of its own (`max_serve`)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx2 as httpx
import openai

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState, create_app
from maxjax.serve.http_server import bind, run
from maxjax.tokenizer import Tokenizer
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import read_metadata

WORDS = " the quick brown fox jumps over a lazy dog, and then the cat sat on the mat."
"""Encoded with the real tokenizer, these make the fake engine's pool: readable output, one word a token."""


@cache
def load_tokenizer(gguf_path: Path) -> Tokenizer:
    """The real SmolLM2 tokenizer, read once per test process (reading the GGUF metadata takes seconds)."""
    return load_gguf_tokenizer(read_metadata(gguf_path))


@dataclass
class Server:
    url: str
    """http://127.0.0.1:<port> (the OpenAI base URL is `url + "/v1"`)."""
    state: ServingState

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@contextmanager
def running_server(state: ServingState, config: ServerConfig | None = None) -> Iterator[Server]:
    """Serve `state` on a free port until the block ends."""
    config = config or ServerConfig(host="127.0.0.1", port=0)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = create_app(config, state)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run(app, sock, stop))
        except BaseException as exc:  # surfaced when the block ends
            failed.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name=f"test-server-{port}", daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{port}", state)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        assert not thread.is_alive(), "the test server did not shut down"
        if failed:
            raise failed[0]


MAX = str(Path(sys.executable).parent / "max")


def free_port() -> int:
    sock = bind("127.0.0.1", 0)
    with sock:
        return int(sock.getsockname()[1])


@contextmanager
def max_serve(args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
              timeout: float = 240) -> Iterator[str]:
    """Run `max serve *args` on a free port, its output in `log`; yields http://127.0.0.1:<port> once /health
    answers 200, and stops the process when the block ends. A process that exits first fails with its log."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen([MAX, "serve", *args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env if env is not None else os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not become ready:\n" + log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


API_KEY = "test-key-123"


def real_server_args(smollm2_gguf: Path, compile_cache: Path) -> list[str]:
    """The flags of the session's real server (`real_server` in conftest.py): a small grid and pool. Another
    `max serve` with these flags and this compile cache loads its executables instead of compiling them."""
    return ["--model", str(smollm2_gguf), "--max-batch-size", "8", "--max-length", "512",
            "--prefill-chunk-size", "32", "--kv-cache-pages", "200", "--api-key", API_KEY,
            "--served-model-name", "smollm2", "--compile-cache-dir", str(compile_cache), "--task", "embed"]


@dataclass
class RealServer:
    url: str
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0,
                             _strict_response_validation=True, **kw)  # type: ignore[arg-type]

    def loose_client(self) -> openai.OpenAI:
        """For streamed legacy completions: the strict client rejects their `finish_reason: null`, which is
        what OpenAI itself sends."""
        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0,
                                  _strict_response_validation=True, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def compile_lines(self) -> list[str]:
        """The lines JAX_LOG_COMPILES makes JAX write for each compilation."""
        return [line for line in self.log.read_text().splitlines() if "Compiling " in line]
