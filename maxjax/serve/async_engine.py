"""The engine thread: continuous batching between the asyncio HTTP side and the device.

The life of a request:

1. An HTTP handler calls `AsyncEngine.generate(request)`. The request is admitted there, on the caller's thread
   (`EngineCore.admit`: every value checked and converted into the step arrays' types), so a bad value is that
   request's `RequestRejected` (a 400) before anything is queued. It raises `QueueFullError` at once when the
   queue is full (the handler answers 429); otherwise it returns an async iterator and puts an "add" into the
   inbox.
2. The engine thread loops: it drains the inbox (adds and cancels) into the scheduler, runs one
   `EngineCore.step()` (at most one prefill chunk plus one decode step for every running sequence), and hands
   each request's `GenerationOutput` to its asyncio queue with `call_soon_threadsafe`. Requests join and leave
   the batch at these step boundaries.
3. The handler's iterator yields the outputs until one carries a finish reason. Closing it early (a stop
   string matched, the client disconnected) puts a "cancel" into the inbox: the next iteration removes the
   sequence and frees its batch row and KV pages.
4. With nothing to serve, the thread gives each executable of the grid that has not had it its first run, one
   per idle moment (the first run of an XLA:CPU executable costs up to 0.4 s extra; requests should not pay it;
   the decode steps had theirs before the server was ready).
5. Shutting down (`serve/http_server.py`): `open_requests()` tells the server when the last stream finished;
   `abort_all()` ends whatever is still open then with `Aborted`, and refuses new requests with it.
6. What one request carries can fail only that request: admission is where its values become step inputs, and
   an unexpected error while queueing one request goes to that request alone. If a step itself raises, no
   request caused it: the engine is broken, every open request gets the error, `on_fatal` takes the server down
   (a crashed loop must not leave clients hanging), and the thread ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from maxjax.serve.engine_core import EngineCore
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import Aborted, GenerationOutput, GenerationRequest, QueueFullError
from maxjax.serve.request import Request

log = logging.getLogger(__name__)

IDLE_QUIET = 0.5
"""Seconds without work before the engine spends idle time on first runs: a client in a closed loop sends its
next request within milliseconds of the last answer, and should not find a first run (up to 0.4 s) in its way."""


class EngineError(RuntimeError):
    """The engine loop failed; the request cannot complete."""


@dataclass
class _Stream:
    request: GenerationRequest
    admitted: Request
    """The engine's request; `_streams` is keyed by its id once the scheduler took it."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationOutput | BaseException] = field(default_factory=asyncio.Queue)
    done: bool = False

    def deliver(self, item: GenerationOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, core: EngineCore, *, model_name: str, metrics: Metrics | None = None,
                 on_fatal: Callable[[str], None] | None = None):
        self.core = core
        self.model_name = model_name
        self.max_model_len = core.scheduler.max_length
        self.pooling = core.pooling
        self.vision = core.vision
        self.metrics = metrics
        self.on_fatal = on_fatal
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, _Stream]] = []
        self._wake = threading.Event()
        self._pending_adds = 0
        self._stopped = False
        self._broken: str | None = None
        self._aborting = False
        self._streams: dict[int, _Stream] = {}
        self._idle_done = False
        self._idle_seconds = 0.0
        self._last_busy = 0.0
        self._thread = threading.Thread(target=self._run, name="maxjax-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ asyncio side

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._broken is not None:
            raise EngineError(self._broken)
        if self._aborting:
            raise Aborted("the server is shutting down")
        admitted = self.core.admit(request)  # RequestRejected: this request's 400, before anything is queued
        with self._lock:
            if self._pending_adds + len(self.core.scheduler.waiting) >= self.core.scheduler.max_queue:
                raise QueueFullError(f"{self.core.scheduler.max_queue} requests are already waiting")
            stream = _Stream(request=request, admitted=admitted, loop=asyncio.get_running_loop())
            self._inbox.append(("add", stream))
            self._pending_adds += 1
        self._wake.set()
        return self._iterate(stream)

    async def _iterate(self, stream: _Stream) -> AsyncIterator[GenerationOutput]:
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.done = True
                    raise item
                if item.finish_reason is not None:
                    stream.done = True
                yield item
                if stream.done:
                    return
        finally:
            if not stream.done:
                stream.done = True
                with self._lock:
                    self._inbox.append(("cancel", stream))
                self._wake.set()

    def open_requests(self) -> int:
        with self._lock:
            return self._pending_adds + len(self._streams)

    def abort_all(self) -> None:
        self._aborting = True
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.core.runner.wait_for_loads()

    # -------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.core.has_work:
                    self._report()
                    if not self._idle_done:
                        quiet = time.monotonic() - self._last_busy
                        if quiet < IDLE_QUIET:  # a closed loop's next request is on its way: wait for it first
                            self._wake.wait(IDLE_QUIET - quiet)
                            self._wake.clear()
                            continue
                        if self._idle_work():
                            continue
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.core.step()
                self._last_busy = time.monotonic()
                if self.metrics is not None and self.core.last_step is not None:
                    self.metrics.observe_step(*self.core.last_step)
                for seq, out in outputs:
                    stream = self._streams.get(id(seq))
                    if stream is None:
                        continue
                    if out.finish_reason is not None:
                        del self._streams[id(seq)]
                    stream.deliver(out)
                self._report()
        except BaseException as exc:  # a broken engine must not leave clients waiting forever
            log.exception("the engine loop failed")
            self._broken = f"the engine failed: {type(exc).__name__}: {exc}"
            for stream in list(self._streams.values()):
                stream.deliver(EngineError(self._broken))
            with self._lock:
                for _, stream in self._inbox:
                    stream.deliver(EngineError(self._broken))
                self._inbox.clear()
            if self.on_fatal is not None:
                self.on_fatal(self._broken)

    def _idle_work(self) -> bool:
        """With no request to serve for `IDLE_QUIET` seconds, give one executable its first run (a request arriving
        meanwhile waits for at most that one). False when there is nothing left to do."""
        start = time.perf_counter()
        if self.core.first_run_next():
            self._idle_seconds += time.perf_counter() - start
            return True
        self._idle_done = True
        log.info("every executable has had its first run (%.1f s of idle time)", self._idle_seconds)
        return False

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, stream in inbox:
            if kind == "add":
                self._add(stream)
                with self._lock:  # after the stream is in _streams: open_requests() never misses it
                    self._pending_adds -= 1
            elif self._streams.pop(id(stream.admitted), None) is not None:
                self.core.cancel(stream.admitted)
        if self._aborting:
            for stream in list(self._streams.values()):
                self.core.cancel(stream.admitted)
                stream.deliver(Aborted("the server shut down before this request finished"))
            self._streams.clear()

    def _add(self, stream: _Stream) -> None:
        if stream.done:
            return  # cancelled before it reached the scheduler
        if self._aborting:
            stream.deliver(Aborted("the server shut down before this request started"))
            return
        seq = stream.admitted
        try:
            queued = self.core.queue(seq)
        except Exception as exc:  # this request's failure (its own 500), not the engine's
            log.exception("queueing request %s failed", stream.request.request_id)
            stream.deliver(exc)
            return
        if not queued:
            stream.deliver(QueueFullError("the queue is full"))
            return
        self._streams[id(seq)] = stream

    def _report(self) -> None:
        if self.metrics is None:
            return
        sched = self.core.scheduler
        self.metrics.set_running_batch_size(len(sched.running))
        self.metrics.set_queue_depth(len(sched.waiting))
        self.metrics.set_kv_pages_in_use(sched.pages.in_use)
        self.metrics.set_images(self.core.images.encoded, self.core.images.reused)
