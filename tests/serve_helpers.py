"""A real Hypercorn server on 127.0.0.1 in a background thread, for tests that talk HTTP to the app."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState, create_app
from maxjax.serve.server import bind, run
from maxjax.tokenizer import Tokenizer, load_gguf_tokenizer
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
