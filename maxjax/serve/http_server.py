"""Running the app: Hypercorn on one bound socket, the model loading beside it, a clean exit either way.

`serve(config, load)` is what `max serve` calls:

1. Bind host:port first, so a port in use fails at once (a `UserError`), not after minutes of loading.
2. Start Hypercorn on that socket, and `load(state)` in a daemon thread. Until `load` has filled in the engine and
   tokenizer and called `state.set_ready()` (done for it if it returns without), `/health` and `/v1` answer 503.
3. SIGTERM or Ctrl-C drains (`_drain`): new requests and /health answer 503 with Retry-After, open requests get
   `--shutdown-timeout` seconds to finish, whatever is still open then ends with a final error event (code
   `server_shutting_down`), and `serve` returns (exit 0). A second signal stops at once.
4. When loading fails or the engine calls `state.fatal(message)`: one line goes to the log and `serve` raises
   `SystemExit(1)`, never hangs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from maxjax.config import ServerConfig
from maxjax.errors import UserError
from maxjax.serve.app import ServingState, create_app

logger = logging.getLogger(__name__)

GRACEFUL_TIMEOUT_S = 5.0
"""After the drain, what Hypercorn gives open connections to send their last bytes."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port; read it back with `getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=1024)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --host or --port") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets: no Nagle on SSE
    return sock


async def run(app: Quart, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve `app` on the bound `sock` until `stop` is set. Hypercorn takes the socket over and closes it."""
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.accesslog = None
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def serve(config: ServerConfig, load: Callable[[ServingState], None], *, state: ServingState | None = None) -> None:
    """Serve until SIGINT/SIGTERM; raise `SystemExit(1)` when loading fails or the engine gives up."""
    state = state or ServingState(model_name=config.served_model_name or "model")
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    failure = asyncio.run(_serve(create_app(config, state), sock, state, load, f"http://{host}:{port}",
                                 shutdown_timeout=config.shutdown_timeout))
    if failure is not None:
        raise SystemExit(1)


async def _serve(
    app: Quart, sock: socket.socket, state: ServingState, load: Callable[[ServingState], None], url: str,
    *, shutdown_timeout: float = 30.0,
) -> str | None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failures: list[str] = []
    drains: list[asyncio.Task[None]] = []

    def fail(message: str) -> None:  # called from the loader or engine thread
        failures.append(message)
        loop.call_soon_threadsafe(stop.set)

    def on_signal() -> None:
        if drains or state.engine is None:
            stop.set()  # a second signal, or nothing to drain yet
        else:
            drains.append(loop.create_task(_drain(state, stop, shutdown_timeout)))

    state.on_fatal = fail
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
    logger.info("listening on %s; loading the model (GET /health answers 200 once it is ready)", url)
    threading.Thread(target=_load, args=(load, state, url), name="maxjax-load", daemon=True).start()
    await run(app, sock, stop)
    if state.engine is not None:
        # The engine thread must not be inside a device call when the interpreter exits (XLA aborts the process).
        await asyncio.to_thread(state.engine.stop)
    return failures[0] if failures else None


async def _drain(state: ServingState, stop: asyncio.Event, timeout: float) -> None:
    """Refuse new requests, give open ones `timeout` seconds, end the rest, then stop the server."""
    engine = state.engine
    assert engine is not None
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        logger.info("shutting down: new requests get 503; %d open requests get up to %.0f s to finish",
                    engine.open_requests(), timeout)
        while engine.open_requests() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = engine.open_requests()
        if left:
            logger.warning("ending %d requests still open after --shutdown-timeout %.0f s", left, timeout)
            engine.abort_all()
    finally:
        stop.set()  # whatever happened above, the server stops


def _load(load: Callable[[ServingState], None], state: ServingState, url: str) -> None:
    try:
        load(state)
        if not state.ready:
            state.set_ready()
    except UserError as exc:
        state.fatal(f"loading the model failed: {exc}")
        return
    except BaseException as exc:  # a bug, not bad input: keep the traceback
        logger.exception("loading the model failed")
        state.fatal(f"loading the model failed: {type(exc).__name__}: {exc}")
        return
    logger.info("model '%s' is ready at %s/v1", state.model_name, url)
