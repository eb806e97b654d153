"""The device side of a step: the pure programs of `graph/programs.py` (the step, `(params, kv pages, last tokens,
batch arrays) -> (kv pages, last tokens, sampled tokens and logprobs, hidden states)`; the vision encoder; the
prompt scores), compiled once per bucket of the grid, and a thin `ModelRunner` around them.

The runner never names a model: it sees a Flax NNX module with the call signature of
`LlamaForCausalLM.__call__` and splits it once (`nnx.split`); the state's leaves, as a flat list, are what the
jitted core receives, as an argument (closing over the weights as constants triples compile time; flattening
the NNX state on every call costs ~2 ms a step). The KV pools are donated to
every step, so XLA updates them in place.

Every array lives on a device mesh (`graph/mesh.py`; one device unless `--devices` names several): the weights
and the KV pool with the sharding their logical axis names give under `mesh.rules_for` the model, the batch
replicated. The step and score graphs are jitted with those as their input and output shardings: one SPMD
program for all the devices, which XLA partitions (the CPU kernels, which it cannot, run per shard:
`Backend.shards`).

(Past the package's usual 400 lines: the graph kinds, the cache key, the executables they share and the
device-side state the programs take (the KV pool, the last tokens, the image table) are one mechanism, kept in
one file.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax import kernels
from maxjax.graph import batch, programs
from maxjax.graph import mesh as meshes
from maxjax.graph.batch import StepInputs
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.compile_cache import ExecutableStore, PendingLoads, compile_for_store
from maxjax.graph.programs import PromptScores
from maxjax.graph.sampling import (
    SampleOutput,
)
from maxjax.models.backend import Backend, Shards, backend_for
from maxjax.models.layers import KV_AXES, KVCache, use_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_pages: int
    """Pages in the pool, page 0 (the scratch page for padding writes) included."""
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The K and V pools' shapes (`KVCache`)."""
        return ((self.num_layers, self.num_pages, self.num_kv_heads, self.head_dim, self.page_size),
                (self.num_layers, self.num_pages, self.num_kv_heads, self.page_size, self.head_dim))

    def shardings(self, mesh: jax.sharding.Mesh, rules: meshes.Rules = meshes.RULES) -> KVCache:
        """The pools' shardings on `mesh`: split by KV head where the rules put "kv_heads" (`layers.KV_AXES`)."""
        return KVCache(*(meshes.sharding(axes, shape, mesh, rules, what=f"the KV pool's {name}")  # type: ignore[arg-type]
                         for name, axes, shape in zip("kv", KV_AXES, self.shapes, strict=True)))

    def allocate(self, mesh: jax.sharding.Mesh | None = None, rules: meshes.Rules = meshes.RULES, *,
                 reserve: bool = False) -> KVCache:
        """The K and V pools, placed on `mesh` (default: the first device) and zero-filled; with `reserve` (the CPU
        kernels loaded: `kernels.reserve`), allocated but not written, so the memory becomes resident only as
        steps write pages (on several devices, each reserves its own shard: XLA cannot partition the call)."""
        fill = kernels.reserve if reserve else jnp.zeros
        mesh = mesh or meshes.make_mesh(jax.devices()[:1])
        shardings = self.shardings(mesh, rules)
        if mesh.size == 1 or not reserve:
            return jax.jit(lambda: KVCache(*(fill(shape, self.dtype) for shape in self.shapes)),
                           out_shardings=shardings)()
        placed: list[Any] = list(shardings)  # NamedShardings, in KVCache's fields
        local = [s.shard_shape(shape) for s, shape in zip(placed, self.shapes, strict=True)]
        per_shard = jax.shard_map(lambda: KVCache(*(fill(shape, self.dtype) for shape in local)), mesh=mesh,
                                  in_specs=(), out_specs=KVCache(*(s.spec for s in placed)))
        return jax.jit(per_shard, out_shardings=shardings)()


StepShape = tuple[int, int, int]
"""(rows, new tokens per row, page-table width): one bucket of the grid."""


class GraphKind(Protocol):
    """One kind of graph the runner compiles, once per shape: its name (in the compile-cache key), the shapes a
    set of step buckets needs of it, how to lower it at one shape, and what a shape costs (to load the cheapest
    first). Every kind goes through the same lower / compile / store / load path (`ModelRunner._executable`)."""

    @property
    def name(self) -> str: ...

    def shapes(self, steps: Sequence[StepShape]) -> list[Any]: ...

    def lower(self, shape: Any) -> Any: ...

    def describe(self, shape: Any) -> list[int]:
        """The shape as the compile-cache key records it."""
        ...

    def cost(self, shape: Any) -> int: ...


Entry = tuple[str, Any]
"""One executable of the runner: its graph kind's name and its shape."""


@dataclass(frozen=True)
class _StepGraph:
    """The step (`programs.step`), one per bucket of the grid."""

    runner: ModelRunner
    name: str = "step"

    def shapes(self, steps: Sequence[StepShape]) -> list[Any]:
        return list(steps)

    def lower(self, shape: StepShape) -> Any:
        r = self.runner
        return r._jitted.lower(r.graphdef, r._treedef, r._params, r._cache_avals, r._last_tokens_aval,
                               batch.abstract(*shape, r.vocab_size), r._images_aval)

    def describe(self, shape: StepShape) -> list[int]:
        return list(shape)

    def cost(self, shape: StepShape) -> int:
        return shape[0] * shape[1]


@dataclass(frozen=True)
class _ScoreGraph:
    """Prompt logprobs from a prefill's hidden states (`programs.score`), one per prefill chunk width."""

    runner: ModelRunner
    name: str = "score"

    def shapes(self, steps: Sequence[StepShape]) -> list[Any]:
        return sorted({tokens for _, tokens, _ in steps if tokens > 1})

    def lower(self, width: int) -> Any:
        r = self.runner
        hidden = jax.ShapeDtypeStruct((1, width, r.hidden_size), r.cache_spec.dtype)
        return r._score.lower(r.graphdef, r._treedef, r._params, hidden, jax.ShapeDtypeStruct((1, width), jnp.int32))

    def describe(self, width: int) -> list[int]:
        return [1, width, self.runner.hidden_size]

    def cost(self, width: int) -> int:
        return width


@dataclass(frozen=True)
class _VisionGraph:
    """The vision encoder writing the image table (`programs.encode`), one per bucket of images (a model that takes
    images only)."""

    runner: ModelRunner
    name: str = "vision"

    def shapes(self, steps: Sequence[StepShape]) -> list[Any]:
        return list(self.runner.image_buckets)

    def lower(self, n: int) -> Any:
        r = self.runner
        rep = meshes.replicated(r.mesh)
        pixels = jax.ShapeDtypeStruct((n, *r.pixel_shape), jnp.float32, sharding=rep)
        return r._encode.lower(r.graphdef, r._treedef, r._params, r._images_aval, pixels,
                               jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep))

    def describe(self, n: int) -> list[int]:
        return [n, *self.runner.pixel_shape]

    def cost(self, n: int) -> int:
        return n


@dataclass(frozen=True)
class WarmUp:
    """What `ModelRunner.warm_up` did."""

    seconds: float
    compiled: int
    """Executables lowered and compiled (and stored, with a compile cache)."""
    cached: int
    """Executables found in the compile cache: checked, loaded on first use or by `load_cached`."""


class ModelRunner:
    """Holds the split model, the KV pools and one compiled executable per bucket.

    The model is put on `backend` (default: `backend_for` the device and the pool's dtype) in place before it is
    split: its weight layouts and attention are then part of the graph definition every executable is traced
    from and keyed by. Its weights and the pool are placed on `mesh` (default: a one-device mesh of `device`, or
    of the first device) as their logical axes say under `mesh.rules_for` the model (`graph/mesh.py`); on a mesh
    of several devices the backend carries it (`Backend.shards`), so the CPU kernels run per shard.
    """

    def __init__(self, model: nnx.Module, cache_spec: CacheSpec, grid: BucketGrid, device: jax.Device | None = None,
                 *, backend: Backend | None = None, mesh: jax.sharding.Mesh | None = None, image_slots: int = 0,
                 images_per_step: int = 0):
        self.mesh = mesh or meshes.make_mesh([device or jax.devices()[0]])
        self.device = self.mesh.devices.flat[0]
        self.grid = grid
        self.cache_spec = cache_spec
        self.rules = meshes.rules_for(self.mesh, cache_spec.num_kv_heads)
        backend = backend or backend_for(self.device.platform, cache_spec.dtype)
        if self.mesh.size > 1:
            backend = dataclasses.replace(backend, shards=Shards(self.mesh.abstract_mesh, self.rules))
            log.info("tensor parallel over %d %s devices (%s): heads%s and MLP columns split", self.mesh.size,
                     self.device.platform, ", ".join(str(d.id) for d in self.mesh.devices.flat),
                     ", KV heads" if dict(self.rules).get("kv_heads") else "")
        self.backend = backend
        use_backend(model, self.backend)
        log.debug("model on %s, mesh %s", self.backend, dict(self.mesh.shape))
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        leaves, self._treedef = jax.tree.flatten(state)
        self._param_shardings = meshes.param_shardings(state, self.mesh, self.rules)
        self._params: list[jax.Array] = jax.device_put(leaves, self._param_shardings)
        self.state = jax.tree.unflatten(self._treedef, self._params)
        # Where attention reads the pool through the CPU kernel (which never reads past a row's cached length),
        # the pool is only reserved: it costs nothing at start and becomes resident as it is written. Otherwise
        # it is zeroed on a thread of its own (on CPU, seconds per GiB of first-touch page faults), which
        # warm-up overlaps; `cache` waits for it.
        cache_shardings = cache_spec.shardings(self.mesh, self.rules)
        self._cache_avals = KVCache(*(jax.ShapeDtypeStruct(shape, cache_spec.dtype, sharding=sharding)  # type: ignore[arg-type]
                                      for shape, sharding in zip(cache_spec.shapes, cache_shardings, strict=True)))
        self._cache: KVCache | None = None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maxjax-kv")
        self._allocation = pool.submit(cache_spec.allocate, self.mesh, self.rules, reserve=self.lazy_pool)
        pool.shutdown(wait=False)
        self.vocab_size, self.hidden_size = model.embed.vocab_size, model.embed.dim  # type: ignore[attr-defined]
        # Explicit shardings in and out (the batch and the results replicated): the graphs are partitioned for
        # the mesh they will run on, and the pool keeps its sharding from step to step.
        rep = meshes.replicated(self.mesh)
        self._jitted = jax.jit(programs.step, static_argnums=(0, 1), donate_argnums=(3, 4),
                               in_shardings=(self._param_shardings, cache_shardings, rep, rep, rep),
                               out_shardings=(cache_shardings, rep, rep, rep))
        # A model that takes images (`model.vision`) keeps an image table on the device, [slots + 1, M, D] (the
        # last slot: the scratch slot padding images write), which `encode_images` fills and prefill steps read.
        vision: Any = getattr(model, "vision", None)
        self.image_slots = image_slots if vision is not None else 0
        self.image_buckets: tuple[int, ...] = ()
        self._images: jax.Array | None = None
        self._images_aval: jax.ShapeDtypeStruct | None = None
        if self.image_slots:
            vc = vision.cfg
            self.pixel_shape = (vc.num_channels, vc.image_size, vc.image_size)
            self.tokens_per_image = vc.mm_tokens_per_image
            most = max(images_per_step, 1)
            self.image_buckets = (*(1 << i for i in range(most.bit_length()) if 1 << i < most), most)
            table = (self.image_slots + 1, vc.mm_tokens_per_image, self.hidden_size)
            self._images_aval = jax.ShapeDtypeStruct(table, cache_spec.dtype, sharding=rep)
            self._images = jax.device_put(np.zeros(table, np.dtype(cache_spec.dtype)), rep)
            self._encode = jax.jit(programs.encode, static_argnums=(0, 1), donate_argnums=(3,),
                                   in_shardings=(self._param_shardings, rep, rep, rep), out_shardings=rep)
        # The token each batch row sampled last (row 0: the scratch row padding rows write), kept on the device
        # from step to step: decode rows read their next token here (`StepInputs.feed`).
        self._last_tokens_aval = jax.ShapeDtypeStruct((grid.max_batch_size + 1,), jnp.int32, sharding=rep)
        self._last_tokens = jax.device_put(np.zeros(grid.max_batch_size + 1, np.int32), rep)
        self._score = jax.jit(programs.score, static_argnums=(0, 1), in_shardings=(self._param_shardings, rep, rep),
                              out_shardings=rep)
        self._graphs: dict[str, GraphKind] = {g.name: g for g in (_StepGraph(self), _ScoreGraph(self),
                                                                  _VisionGraph(self))}
        self._executables: dict[Entry, Any] = {}
        self._store: ExecutableStore | None = None
        self._fingerprint: dict[str, Any] = {}
        self._pending: dict[Entry, str] = {}
        """Entries verified in the store and not loaded yet, with their keys."""
        self._loads: PendingLoads | None = None
        self._loaders: list[threading.Thread] = []
        self._ran: set[tuple[int, int, int]] = set()
        """Step shapes whose executable has run at least once (see `first_run`)."""
        self.mirror: Callable[[str, tuple[Any, ...]], None] | None = None
        """On the leader of several processes: sends each call that launches a program (`step`, `encode_images`,
        `score`) to the followers before it is made, so every process runs the same programs in the same order
        (`serve/distributed.py`)."""
        self.following = False
        """A follower: `score` reads the hidden states of its own last step (the leader sends None for them)."""
        self._last_hidden: jax.Array | None = None

    @property
    def lazy_pool(self) -> bool:
        """Whether the pool is only reserved (attention reads it through the CPU kernel), not zeroed."""
        return self.backend.past_kernel is True

    @property
    def cache(self) -> KVCache:
        """The KV pools (the first use waits until they are allocated)."""
        if self._cache is None:
            self._cache = self._allocation.result()
        return self._cache

    @cache.setter
    def cache(self, value: KVCache) -> None:
        self._cache = value

    def compile(self, shape: tuple[int, int, int]) -> Any:
        """The executable of one bucket: loaded from the compile cache, or lowered with abstract inputs and
        compiled (idempotent)."""
        return self._executable(("step", shape), warn=False)

    def warm_up(self, shapes: list[tuple[int, int, int]] | None = None, progress: Any = None,
                store: ExecutableStore | None = None) -> WarmUp:
        """Make every bucket of the grid (or `shapes`) and its prompt-logprob graph ready to run.

        Without a `store`, every executable is compiled here. With one, an executable found in it is only
        checked (checksum) and is deserialized on its first use or by `load_cached()`; the rest are compiled
        and stored. Either way nothing compiles afterwards. Lowering (tracing, which holds the GIL) runs here
        while XLA compiles earlier buckets on a thread per core: on 2 cores that is 1.7x faster than one after
        the other.
        """
        start = time.perf_counter()
        if store is not None and store is not self._store:
            self._store, self._fingerprint = store, store.fingerprint(self.graphdef, self.state)
        steps = shapes if shapes is not None else self.grid.all_shapes()
        entries = [e for g in self._graphs.values() for e in ((g.name, s) for s in g.shapes(steps))
                   if e not in self._executables]
        cached = 0
        if self._store is not None:
            for entry in entries:
                key = self._key(entry)[0]
                if entry in self._pending or self._store.verify(key):
                    self._pending[entry] = key
                    cached += 1
                    if progress is not None and entry[0] == "step":
                        progress(entry[1])
            self._loads = PendingLoads(self._store, self._pending)
        build = [e for e in entries if e not in self._pending]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = {pool.submit(self._compile_lowered, e, self._graphs[e[0]].lower(e[1])): e for e in build}
            for future in as_completed(futures):
                kind, arg = entry = futures[future]
                self._executables[entry] = future.result()
                if progress is not None and kind == "step":
                    progress(arg)
        if self._store is not None and build:
            self._store.prune()
        return WarmUp(time.perf_counter() - start, compiled=len(build), cached=cached)

    def load_cached(self, *, threads: int = 1, wait: bool = False, only: Callable[[Entry], bool] | None = None,
                    nice: int = 0) -> int:
        """Deserialize the executables warm-up found in the compile cache and not loaded yet (those `only` picks,
        else all), on `threads` background threads (a step that needs one first loads it itself); with `wait`,
        return once they are loaded. `nice` 19 loads them at the lowest priority, yielding the cores to the
        steps that serve. Smallest steps first: what a new server runs first. Returns how many were started."""
        if self._loads is None:
            return 0
        kinds = list(self._graphs)
        order = sorted((e for e in self._pending if e not in self._executables and (only is None or only(e))),
                       key=lambda e: (kinds.index(e[0]), self._graphs[e[0]].cost(e[1])))
        workers = self._loads.start(order, self._executables.__setitem__, threads=threads, nice=nice)
        self._loaders += workers
        if wait:
            for worker in workers:
                worker.join()
        return len(order)

    def wait_for_loads(self, timeout: float = 60.0) -> None:
        """Wait for the threads `load_cached` started (before the process exits: a thread still inside XLA's
        deserializer when the interpreter ends aborts the process)."""
        deadline = time.monotonic() + timeout
        for worker in self._loaders:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _key(self, entry: Entry) -> tuple[str, dict[str, Any]]:
        """The compile-cache key of one entry and what it hashes: the runner's fingerprint (model, device kind,
        versions, code), the mesh (its axes, their sizes and the device kind: not which devices, so an
        executable serves any device of its kind), the KV pool, the bucket grid, and the entry's kind and shape.
        The grid is in every key,
        although an executable depends only on its own shape and the pool: a changed grid never loads an old
        executable, and most grid changes resize the pool (which every step takes) anyway."""
        kind, arg = entry
        spec, grid = self.cache_spec, self.grid
        material: dict[str, Any] = {
            **self._fingerprint, "mesh": meshes.describe(self.mesh),
            **({"process": [jax.process_index(), jax.process_count()]} if jax.process_count() > 1 else {}),
            "cache": [spec.num_layers, spec.num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim,
                      jnp.dtype(spec.dtype).name],
            "grid": [grid.max_batch_size, grid.prefill_chunk, grid.max_pages, grid.page_size],
            "kind": kind, "shape": self._graphs[kind].describe(arg),
        }
        return ExecutableStore.key(material), material

    def _compile_lowered(self, entry: Entry, lowered: Any) -> Any:
        """XLA-compile one lowered entry (on a worker thread: XLA releases the GIL) and store it."""
        if self._store is None:
            return lowered.compile()
        compiled = compile_for_store(lowered)
        self._store.save(*self._key(entry), compiled)
        return compiled

    def _executable(self, entry: Entry, *, warn: bool = True) -> Any:
        """An entry's executable: already loaded, loaded now from the compile cache, or compiled now."""
        executable = self._executables.get(entry)
        if executable is None:
            executable = self._loads.take(entry) if self._loads is not None else None
            if executable is None:
                if warn:
                    log.warning("compiling %s graph %s outside warm-up", *entry)
                executable = self._compile_lowered(entry, self._graphs[entry[0]].lower(entry[1]))
            self._executables[entry] = executable
        return executable

    def step(self, inputs: StepInputs) -> tuple[SampleOutput, jax.Array]:
        """Run one bucketed step: (sampled tokens, hidden states [B, T, D]), left on the device (dispatch is
        asynchronous). The host arrays in `inputs` may be read after this returns: never write them again."""
        if self.mirror is not None:
            self.mirror("step", (inputs,))
        shape = (inputs.tokens.shape[0], inputs.tokens.shape[1], inputs.page_table.shape[1])
        executable = self._executables.get(("step", shape)) or self._executable(("step", shape))
        self.cache, self._last_tokens, out, hidden = executable(self._params, self.cache, self._last_tokens, inputs,
                                                                self._images)
        self._ran.add(shape)
        if self.following:
            self._last_hidden = hidden
        return out, hidden

    def fetch(self, tree: Any) -> Any:
        """Host copies of the arrays of `tree` (step results, replicated): on several processes, each array's shard
        on this process, since the whole array is not addressable from one."""
        if jax.process_count() == 1:  # every array is addressable: no per-leaf pass on the step's path
            return jax.device_get(tree)
        return jax.device_get(jax.tree.map(lambda x: x if x.is_fully_addressable else x.addressable_data(0), tree))

    def encode_images(self, pixels: Sequence[np.ndarray], slots: Sequence[int]) -> None:
        """Run the vision encoder on `pixels` (each [C, H, W]) and write their soft tokens to the image table at
        `slots`, in buckets of images (padding images go to the scratch slot). Dispatched, not waited for: the
        prefill step that reads them runs after it."""
        assert self._images is not None, "this model takes no images"
        if self.mirror is not None:
            self.mirror("encode_images", (list(pixels), list(slots)))
        for at in range(0, len(pixels), self.image_buckets[-1]):
            part = pixels[at : at + self.image_buckets[-1]]
            n = next(b for b in self.image_buckets if b >= len(part))
            batch_pixels = np.zeros((n, *self.pixel_shape), np.float32)
            batch_pixels[: len(part)] = np.stack(part)
            batch_slots = np.full(n, self.image_slots, np.int32)
            batch_slots[: len(part)] = slots[at : at + len(part)]
            executable = self._executables.get(("vision", n)) or self._executable(("vision", n))
            self._images = executable(self._params, self._images, batch_pixels, batch_slots)

    def has_run(self, shape: tuple[int, int, int]) -> bool:
        return shape in self._ran

    def first_run(self, shape: tuple[int, int, int]) -> None:
        """Run one bucket's executable once on a batch of padding, and wait for it.

        An executable's first run costs 0.3-0.5 s more than the next ones on XLA:CPU (the matmul library builds
        its runtime objects then): a serving engine does this in idle time, so requests never pay it. Every row
        has one cached token on page 0, so attention visits one block; all writes go to page 0, the scratch page.
        """
        rows, tokens, pages = shape
        inputs = batch.padding(rows, tokens, pages, self.vocab_size)
        inputs = inputs._replace(past_len=np.ones(rows, np.int32))
        jax.block_until_ready(self.step(inputs))

    def score(self, hidden: jax.Array | None, targets: np.ndarray) -> PromptScores:
        """Prompt logprobs for one prefill chunk (`echo` with `logprobs`); compiled per chunk bucket."""
        if self.mirror is not None:
            self.mirror("score", (None, targets))
        if hidden is None:  # a follower: its own last step's
            hidden = self._last_hidden
        assert hidden is not None, "score follows a step"
        width = hidden.shape[1]
        executable = self._executables.get(("score", width)) or self._executable(("score", width))
        return executable(self._params, hidden, targets)
