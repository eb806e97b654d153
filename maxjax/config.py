"""Frozen configuration objects. Every default is decided here, once; validation names the bad value and the fix.

`PipelineConfig` = `ModelConfig` (which weights, which dtype, which devices) + `KVCacheConfig` (the page pool) +
`SchedulerConfig` (batch and chunk sizes) + `ServerConfig` (the HTTP side, with its `ImageLimits`) +
`CompileCacheConfig`. The CLI builds these from flags; nothing else reads flags or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageLimits:
    """What the HTTP side accepts as a request's images (`serve/images.py`). How many one request may carry is the
    engine's (`SchedulerConfig.max_images_per_request`, sent back as `VisionInfo.max_images`)."""

    allowed_roots: tuple[Path, ...] = ()
    """Directories whose files a request may name (`file://` URLs, absolute paths), symlinks and `..` resolved
    first; empty: no local file is read. Remote URLs are never fetched."""
    max_bytes: int = 20 * 2**20
    """The largest encoded image (a data URL's decoded bytes, a file's size)."""
    max_pixels: int = 32_000_000
    """The most pixels (width x height) an image may have, read from its header before it is decoded."""
    max_body_bytes: int = 50 * 2**20
    """The largest request body (OpenAI's own limit): room for a request's images as base64 data URLs."""

    def __post_init__(self) -> None:
        for root in self.allowed_roots:
            if not root.is_absolute() or not root.is_dir():
                raise ValueError(f"allowed image root {root} is not a directory: name an existing directory by its "
                                 "absolute path")
        for name in ("max_bytes", "max_pixels", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side of `max serve`."""

    host: str = "127.0.0.1"
    """Address to bind. The default keeps the server private to this machine."""
    port: int = 8000
    api_key: str | None = None
    """When set, every /v1 route answers 401 unless the request has `Authorization: Bearer <api_key>`."""
    served_model_name: str | None = None
    """The model id clients use; defaults to the --model value (or the default model's name)."""
    max_queue_size: int = 256
    """Requests waiting for a batch row beyond this get 429 with Retry-After."""
    shutdown_timeout: float = 30.0
    """Seconds open requests get to finish after SIGTERM or Ctrl-C (new ones get 503); the rest are then ended."""
    tool_call_parser: str | None = None
    """How the model writes tool calls (`hermes`, `llama3_json`, `mistral`); None: detected from the chat
    template and vocabulary, else `hermes`."""
    reasoning_parser: str | None = None
    """Splits `<think>` reasoning into `reasoning_content` (`qwen3`, `deepseek_r1`); None: no splitting."""
    task: str | None = None
    """`embed`: serve /v1/embeddings too (pooled hidden states); `generate`: text only; None: `embed` when the
    checkpoint declares its pooling (sentence-transformers modules, GGUF pooling_type), else `generate`."""
    web_ui: bool = True
    """Serve the chat page at `/` (its files under `/static/`, without the API key: the page holds no secret and
    sends the key on its /v1 calls); off, `/` is a 404 like any unknown route."""
    images: ImageLimits = field(default_factory=ImageLimits)
    """What a request's images may be (where files are read from, sizes)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.shutdown_timeout < float("inf"):
            raise ValueError(f"shutdown_timeout {self.shutdown_timeout} must be a number of seconds >= 0, e.g. 30")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range: use 0-65535")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size {self.max_queue_size} must be at least 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """How requests are batched."""

    max_batch_size: int = 32
    """Most rows in one decode step."""
    max_length: int | None = None
    """Longest sequence (prompt + output) in tokens; None = the model's own context length."""
    prefill_chunk_size: int = 512
    """Prompt tokens processed in one prefill step; longer prompts are chunked so decodes keep running."""
    overlap: bool = True
    """Dispatch each step before the tokens of the one before are fetched (`EngineCore.step`)."""
    max_images_per_request: int = 8
    """The most images one request may carry, for a model that takes images (`VisionInfo.max_images`); more is
    a 400."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size {self.max_batch_size} must be at least 1")
        if self.max_length is not None and self.max_length < 16:
            raise ValueError(f"max_length {self.max_length} is too small: use at least 16")
        if self.prefill_chunk_size < 16 or self.prefill_chunk_size & (self.prefill_chunk_size - 1):
            raise ValueError(f"prefill_chunk_size {self.prefill_chunk_size} must be a power of two >= 16")
        if self.max_images_per_request < 1:
            raise ValueError(f"max_images_per_request {self.max_images_per_request} must be at least 1")


@dataclass(frozen=True)
class KVCacheConfig:
    """The paged KV cache."""

    page_size: int = 16
    """Tokens per page."""
    device_memory_utilization: float | None = None
    """Share of the device's memory the server may use; the KV pool gets what the weights leave. On CPU the
    device's memory is what the OS reports available at start. None: 0.9 on accelerators; on CPU a quarter of
    the available memory, rounded down to a power of two of full-length sequences (graph/memory.py)."""
    num_pages: int | None = None
    """An explicit pool size in pages (tests use a small one); overrides the utilization budget."""

    def __post_init__(self) -> None:
        if self.device_memory_utilization is not None and not 0.0 < self.device_memory_utilization <= 1.0:
            raise ValueError(
                f"device_memory_utilization {self.device_memory_utilization} must be in (0, 1], e.g. 0.9"
            )
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size {self.page_size} must be a power of two")


@dataclass(frozen=True)
class CompileCacheConfig:
    """Where compiled executables persist between starts (`max warm-cache` fills it; see graph/compile_cache.py)."""

    enabled: bool = True
    """Load executables from the cache and store new ones; off, every start compiles the whole grid again."""
    directory: Path | None = None
    """None = `compile/` under `maxjax.paths.cache_dir()`, decided when the cache is opened."""

    def __post_init__(self) -> None:
        if self.directory is not None and self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"compile cache directory {self.directory} is a file: name a directory")


@dataclass(frozen=True)
class DistributedConfig:
    """`--coordinator`, `--num-processes` and `--process-id` (as `jax.distributed.initialize` spells them): one
    program over several processes (`serve/distributed.py`)."""

    coordinator: str
    """HOST:PORT of process 0, where JAX's coordination service listens; the leader's step channel is on PORT + 1."""
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator {self.coordinator!r} must be HOST:PORT")
        if self.num_processes < 2:
            raise ValueError(f"num_processes {self.num_processes} must be at least 2 (one process needs none of this)")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} must be 0 to {self.num_processes - 1}")

    @property
    def leader(self) -> bool:
        """Process 0: serves HTTP and schedules; the others follow its steps."""
        return self.process_id == 0

    @property
    def channel(self) -> tuple[str, int]:
        """Where the leader sends its steps: the coordinator's host, its port + 1."""
        host, _, port = self.coordinator.rpartition(":")
        return host, int(port) + 1


@dataclass(frozen=True)
class PipelineConfig:
    """Everything `max serve` / `max generate` need, built once from the command line."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    compile_cache: CompileCacheConfig = field(default_factory=CompileCacheConfig)
    distributed: DistributedConfig | None = None
    """Several processes, one program; None: this process alone."""
