"""`max serve`: bind the port, then load, compile every bucket and start the engine thread in the background.

`/health` answers 503 until the last bucket is compiled (or found in the compile cache) and the decode steps are
loaded, so a ready server never compiles while serving.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maxjax.config import PipelineConfig
from maxjax.devices import DeviceSpec
from maxjax.errors import UserError
from maxjax.registry import Registry
from maxjax.serve.app import ServingState
from maxjax.serve.http_server import serve

if TYPE_CHECKING:
    import jax

    from maxjax.graph.buckets import BucketGrid
    from maxjax.graph.runner import WarmUp
    from maxjax.pipeline import Checkpoint
    from maxjax.serve.engine_core import EngineCore

log = logging.getLogger(__name__)


def run_server(config: PipelineConfig, *, model: str | None, revision: str | None,
               quantization_encoding: str | None, devices: str | None, chat_template: str | None,
               custom_architectures: Sequence[str] = (), mmproj: Path | None = None) -> None:
    from maxjax.custom import registry_with

    device_spec = DeviceSpec.parse(devices)
    template = _read_template(chat_template) if chat_template else None
    registry = registry_with(custom_architectures)  # a bad module fails here, before the port is bound
    _check_architecture(model, registry)
    dist = config.distributed
    if dist is not None and not dist.leader:  # a follower serves no HTTP: it runs the leader's steps
        from maxjax.hub import resolve_model
        from maxjax.pipeline import open_checkpoint
        from maxjax.serve.distributed import follow, initialize

        initialize(dist, device_spec.platform)
        checkpoint = open_checkpoint(
            resolve_model(model, revision=revision, quantization_encoding=quantization_encoding), registry,
            mmproj=mmproj,
        )
        core, _ = build_engine(checkpoint, device_spec.select_all(), config)
        core.runner.load_cached(threads=os.cpu_count() or 1, wait=True)
        follow(dist, core.runner, _plan(core))
        return
    state = ServingState(model_name=config.server.served_model_name or model or "SmolLM2-135M-Instruct",
                         model_root=model)

    started = time.perf_counter()
    closing: list[Callable[[], None]] = []

    def load(state: ServingState) -> None:
        parts = _Parts(started)
        import jax

        from maxjax.hub import resolve_model
        from maxjax.pipeline import open_checkpoint
        from maxjax.serve.async_engine import AsyncEngine

        if dist is not None:
            from maxjax.serve.distributed import initialize

            initialize(dist, device_spec.platform)
        devices = device_spec.select() if dist is None else device_spec.select_all()
        parts.done("start-up and imports")
        checkpoint = open_checkpoint(
            resolve_model(model, revision=revision, quantization_encoding=quantization_encoding), registry,
            mmproj=mmproj,
        )
        if template is not None:
            checkpoint.tokenizer.set_chat_template(template)
        core, report = build_engine(checkpoint, devices, config, max_queue=config.server.max_queue_size,
                                    parts=parts)
        if dist is not None:  # from here on, every program this process launches its followers launch too
            from maxjax.serve.distributed import Leader

            leader = Leader(dist, _plan(core))
            core.runner.mirror = leader
            closing.append(leader.close)
            parts.done(f"{dist.num_processes - 1} followers connected")
        # Ready means ready: the decode steps, which every request runs, deserialized now (on every core) and
        # given their first runs; the other executables go on loading at the lowest priority, so they cost the
        # first requests nothing (a step that needs one before it is loaded loads it itself, once). The KV pool
        # is zeroed by then where it is not only reserved.
        threads = os.cpu_count() or 1
        loaded = core.runner.load_cached(threads=threads, wait=True, only=_decode_step)
        parts.done(f"{loaded} decode executables loaded")
        core.first_runs(decode_only=True)
        jax.block_until_ready(core.runner.cache)
        parts.done("decode first runs")
        later = core.runner.load_cached(threads=threads, nice=19)
        if later:
            log.info("loading the other %d executables in the background, at the lowest priority", later)
        state.metrics.set_kv_pages_total(core.scheduler.pages.num_pages - 1)
        engine = AsyncEngine(core, model_name=state.model_name, metrics=state.metrics, on_fatal=state.fatal)
        state.serves_embeddings = config.server.task == "embed" or (
            config.server.task is None and core.declares_pooling)
        state.set_ready(engine, checkpoint.tokenizer)
        log.info("ready %.1f s after start: %s", time.perf_counter() - started, parts)

    serve(config.server, load, state=state)
    for close in closing:
        close()


def _plan(core: EngineCore) -> dict[str, Any]:
    """What every process of one program must agree on: the pool, the grid, the mesh."""
    spec, grid = core.runner.cache_spec, core.grid
    return {"pages": spec.num_pages, "page_size": spec.page_size, "grid": [grid.max_batch_size, grid.prefill_chunk,
            grid.max_pages], "devices": core.runner.mesh.size, "image_slots": core.runner.image_slots}


def _decode_step(entry: tuple[str, Any]) -> bool:
    """A runner entry (`graph/runner.Entry`) that is a decode step: one token a row."""
    kind, shape = entry
    return kind == "step" and shape[1] == 1


def warm_cache(config: PipelineConfig, *, model: str | None, revision: str | None,
               quantization_encoding: str | None, devices: str | None,
               custom_architectures: Sequence[str] = (), mmproj: Path | None = None) -> WarmUp:
    """`max warm-cache`: compile into the compile cache every executable `max serve` with the same flags needs,
    without serving; what is already cached is only checked."""
    from maxjax.custom import registry_with
    from maxjax.graph.compile_cache import default_dir
    from maxjax.hub import resolve_model
    from maxjax.pipeline import open_checkpoint

    if not config.compile_cache.enabled:
        raise UserError("max warm-cache fills the compile cache: drop --no-compile-cache")
    registry = registry_with(custom_architectures)
    selected = DeviceSpec.parse(devices).select()
    checkpoint = open_checkpoint(
        resolve_model(model, revision=revision, quantization_encoding=quantization_encoding), registry, mmproj=mmproj
    )
    _, report = build_engine(checkpoint, selected, config)
    log.info("compile cache: %s", config.compile_cache.directory or default_dir())
    return report


def build_engine(checkpoint: Checkpoint, device: jax.Device | Sequence[jax.Device], config: PipelineConfig, *,
                 max_queue: int = 1 << 30,
                 shapes: Callable[[BucketGrid], list[tuple[int, int, int]]] | None = None,
                 parts: _Parts | None = None) -> tuple[EngineCore, WarmUp]:
    """The one path from an opened checkpoint to an engine whose executables are ready (compiled, or found in
    the compile cache): build the model for the device, place it, plan the KV pool and the grid, and warm up
    every bucket of the grid (or those `shapes(grid)` names). Several devices: tensor parallel over them.
    `max serve`, `max warm-cache` and `max generate` all come here."""
    from maxjax.graph.compile_cache import open_store
    from maxjax.pipeline import build_model
    from maxjax.serve.engine_core import EngineCore
    from maxjax.serve.protocol import Pooling

    devices = [device] if not isinstance(device, Sequence) else list(device)
    store = open_store(config.compile_cache, devices[0], devices)  # before anything compiles
    loaded = build_model(checkpoint, platform=devices[0].platform)
    if parts is not None:
        parts.done("weights and tokenizer read")
    try:
        core = EngineCore.create(loaded, devices, config.scheduler, config.kv_cache, max_queue=max_queue)
    except ValueError as e:
        raise UserError(str(e)) from None
    if parts is not None:
        parts.done("weights placed, KV pool reserved")
    core.pooling = checkpoint.pooling or Pooling()
    core.declares_pooling = checkpoint.pooling is not None
    todo = shapes(core.grid) if shapes is not None else core.grid.all_shapes()
    report = core.runner.warm_up(todo, progress=_progress(len(todo)), store=store)
    _log_warm_up(report)
    if parts is not None:
        parts.done(f"{report.compiled} executables compiled" if report.compiled else "compile cache checked")
    return core, report


class _Parts:
    """How long each part of start-up took, for the ready line of the log."""

    def __init__(self, since: float) -> None:
        self._last = since
        self._parts: list[tuple[str, float]] = []

    def done(self, part: str) -> None:
        now = time.perf_counter()
        self._parts.append((part, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{part} {seconds:.1f} s" for part, seconds in self._parts)


def _log_warm_up(report: WarmUp) -> None:
    log.info("%d executables ready in %.1f s: %d compiled, %d found in the compile cache",
             report.compiled + report.cached, report.seconds, report.compiled, report.cached)


def _check_architecture(model: str | None, registry: Registry) -> None:
    """A local checkpoint whose `architectures[0]` is not registered fails now, not after the port is bound."""
    config = Path(model) / "config.json" if model else None
    if config is None or not config.is_file():
        return  # a GGUF file, a Hub id or the default model: the loader checks those
    try:
        names = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # the loader reports an unreadable config with its own message
    if names:
        registry.get(names[0])


def _read_template(value: str) -> str:
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise UserError(f"--chat-template {value}: no such file, and not template text")


def _progress(total: int):  # type: ignore[no-untyped-def]
    """A progress bar on a terminal, a log line every tenth of the way otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc="compiling (or finding in the cache)", unit="graph")
        return lambda shape: bar.update(1)
    done = [0]

    def tick(shape: tuple[int, int, int]) -> None:
        done[0] += 1
        if done[0] == total or done[0] % max(1, total // 10) == 0:
            log.info("%d/%d graphs ready (last: %d rows x %d tokens, page table %d)", done[0], total, *shape)

    return tick
