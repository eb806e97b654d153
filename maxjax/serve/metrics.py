"""Prometheus metrics for `GET /metrics`, on a registry of their own (so two servers in one process, as in the
tests, do not collide, and nothing else in the process leaks into the page).

Who writes what:
- the HTTP layer (app.py, choices.py): requests by route and status, time to first token, inter-token latency,
  prompt and generated token counts;
- the engine loop: the gauges, through `set_running_batch_size`, `set_queue_depth`, `set_kv_pages_in_use` and
  `set_kv_pages_total`, once per step (prometheus_client is thread-safe, so the engine thread calls them directly).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """Every series the server exports, prefixed `maxjax_`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "maxjax_requests", "HTTP requests answered, by route and status code.", ["route", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "maxjax_time_to_first_token_seconds",
            "From a request's arrival to its first generated token, per choice.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "maxjax_inter_token_latency_seconds",
            "Time between consecutive engine outputs of one choice, divided by the tokens in the later one.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("maxjax_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("maxjax_generation_tokens", "Tokens generated.", registry=r)
        self.running_batch_size = Gauge(
            "maxjax_running_batch_size", "Requests in the running batch (set by the engine).", registry=r
        )
        self.queue_depth = Gauge("maxjax_queue_depth", "Requests waiting for a batch row (set by the engine).", registry=r)
        self.kv_pages_in_use = Gauge("maxjax_kv_pages_in_use", "KV cache pages allocated (set by the engine).", registry=r)
        self.kv_pages_total = Gauge("maxjax_kv_pages_total", "KV cache pages in the pool (set by the engine).", registry=r)
        self.images_encoded = Counter("maxjax_images_encoded", "Images the vision encoder ran on.", registry=r)
        self.images_reused = Counter(
            "maxjax_images_reused", "Images whose soft tokens were still in the image table, not encoded again.",
            registry=r)
        self._images = (0, 0)
        self.engine_steps = Counter("maxjax_engine_steps", "Engine iterations that ran a step.", registry=r)
        self.engine_host_seconds = Counter(
            "maxjax_engine_host_seconds",
            "Seconds the engine thread spent on the host per step (planning, building the batch, postprocessing), "
            "not waiting for the device.", registry=r)
        self.engine_device_wait_seconds = Counter(
            "maxjax_engine_device_wait_seconds", "Seconds the engine thread waited for the device's results.",
            registry=r)

    # -- HTTP layer --------------------------------------------------------------------------------------------

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def count_tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)

    # -- engine ------------------------------------------------------------------------------------------------

    def set_running_batch_size(self, n: int) -> None:
        self.running_batch_size.set(n)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_kv_pages_in_use(self, n: int) -> None:
        self.kv_pages_in_use.set(n)

    def set_kv_pages_total(self, n: int) -> None:
        self.kv_pages_total.set(n)

    def set_images(self, encoded: int, reused: int) -> None:
        """The engine's running totals (`ImageTable`): the counters go up by what is new."""
        self.images_encoded.inc(encoded - self._images[0])
        self.images_reused.inc(reused - self._images[1])
        self._images = (encoded, reused)

    def observe_step(self, host_seconds: float, device_wait_seconds: float) -> None:
        self.engine_steps.inc()
        self.engine_host_seconds.inc(host_seconds)
        self.engine_device_wait_seconds.inc(device_wait_seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text page and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
