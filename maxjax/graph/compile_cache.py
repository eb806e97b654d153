"""The compile cache: every executable of the bucket grid is compiled once per machine, model and code version,
and every later start loads it from disk instead of tracing and compiling it again.

Two layers, both under one directory (`compile/` in `maxjax.paths.cache_dir()` unless `--compile-cache-dir`):

- `executables/`: our store of serialized executables (`jax.experimental.serialize_executable`), one file per
  bucket. A hit skips tracing as well as compiling. Each file is named by a hash of everything the executable
  depends on (`ExecutableStore.fingerprint`, the device mesh's axes and sizes, the KV pool, the bucket grid, the
  entry's kind and shape), so a new JAX, another kind of device or CPU, another mesh, another model or dtype,
  another pool or grid, a different `XLA_FLAGS`, or an edit to the graph or model code gets new names and never
  loads an old executable (which device of a kind is not in the key). Files carry a checksum; a corrupt
  or unloadable one is deleted and compiled again, and nothing else is.
- `xla/`: JAX's own persistent compilation cache, keyed by JAX on the HLO, compile options, JAX version and
  device, for every other executable whatever its compile time (the small jitted helpers: KV pool allocation,
  dtype conversions). The model graphs stay out of it (`compile_for_store` says why).

Deserializing one step executable costs about 0.3 s of CPU here (XLA rebuilds its HLO module and thunks), and two
threads do not load faster than one, so a warm start does not load the whole grid before it is ready: warm-up
checks every entry's checksum (which catches corruption while compiling is still allowed), and `PendingLoads`
deserializes the executables on first use or from a background thread, whichever comes first. Nothing compiles
after warm-up either way.

Loading an executable runs code from the cache directory (as JAX's own cache does): the directory must be as
trusted as the Python environment itself. (A line past 400: the store, its keys and the load queue belong together.)
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, TypeVar

import jax
import jaxlib
from flax import nnx

from maxjax import paths
from maxjax.config import CompileCacheConfig
from maxjax.errors import UserError

log = logging.getLogger(__name__)

Name = TypeVar("Name", bound=Hashable)

FORMAT = 1
"""Bumped when the file layout or the fingerprint's meaning changes; part of every key."""
_MAGIC = b"maxjax-executable\n"
MAX_STORE_BYTES = 8 << 30
"""The store keeps at most this much, least recently used entries removed first (a grid of the default model
is about 200 MB; every code change during development adds one)."""


def default_dir() -> Path:
    """`compile/` under the maxjax cache (read at every call, so tests can move the cache)."""
    return paths.cache_dir() / "compile"


def configure_jax_cache(directory: Path | None, platform: str = "cpu") -> None:
    """Turn JAX's persistent compilation cache on in `directory/xla` for every executable, or off (None).

    JAX decides once per process, at its first compile, whether the cache is used: call this before anything is
    compiled. JAX by default skips executables that compiled in under a second or are small; ours compile in
    1-3 s each, and the small helpers are worth keeping too. JAX also points XLA's GPU autotuning cache into the
    directory, and that path enters every key (a moved or copied cache would miss): off where there is no GPU.
    """
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if platform != "gpu":
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")


def open_store(config: CompileCacheConfig, device: jax.Device,
               devices: Sequence[jax.Device] | None = None) -> ExecutableStore | None:
    """Set up both layers as `config` says, for executables that run on `device` (or on the mesh of `devices`,
    `device` the first); None when the cache is off.

    Call before anything is compiled in the process. A default directory that cannot be created turns the cache
    off with a warning (a start never fails for want of a cache); a directory named on the command line that
    cannot be created is an error.
    """
    if not config.enabled:
        configure_jax_cache(None)
        return None
    directory = config.directory or default_dir()
    try:
        store = ExecutableStore(directory, device, devices)
    except OSError as e:
        if config.directory is not None:
            raise UserError(f"--compile-cache-dir {directory}: {e.strerror or e}") from None
        log.warning("compile cache off: cannot create %s (%s)", directory, e)
        configure_jax_cache(None)
        return None
    configure_jax_cache(directory, device.platform)
    return store


def compile_for_store(lowered: Any) -> Any:
    """Compile a lowered model graph for the store, neither from nor into JAX's persistent cache.

    Two reasons. XLA:CPU cannot serialize again an executable it deserialized: the copy lacks the kernels, and
    the process that loads it fails with 'Function ... not found' at the first run; so an executable JAX's cache
    hands back must never reach the store. And writing each model graph to JAX's cache as well would only
    duplicate the store at 0.1-0.2 s of CPU per executable. The compile option named here is XLA's default (the
    program is unchanged); naming it changes JAX's key, so an entry JAX wrote for this graph earlier is never
    found, and the thread-local minimum compile time keeps JAX from writing one.
    """
    from jax._src import config as jax_config  # thread-local config overrides have no public API

    with jax_config.persistent_cache_min_compile_time_secs(float("inf")):
        return lowered.compile(compiler_options={"xla_embed_ir_in_executable": False})


class ExecutableStore:
    """Serialized executables in `directory/executables`, one file per key, written atomically.

    File layout: magic line, 4-byte header length, JSON header (the key material and the payload's SHA-256),
    payload (`pickle` of what `serialize_executable.serialize` returns). Reading never raises: a missing entry
    is a miss, a damaged one is logged, deleted and a miss.
    """

    def __init__(self, directory: Path, device: jax.Device, devices: Sequence[jax.Device] | None = None):
        self.directory = directory / "executables"
        self.device = device
        self.devices = list(devices or [device])
        """What the executables run on: the mesh's devices, in its order."""
        self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------- keys

    def fingerprint(self, graphdef: nnx.GraphDef, state: nnx.State) -> dict[str, Any]:
        """What every executable of one model on this device depends on, besides its own kind and shape."""
        device = self.device
        model = nnx.merge(graphdef, state)
        return {
            "format": FORMAT,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": _flax_version(),
            "platform": device.platform,
            "device_kind": device.device_kind,
            "platform_version": device.client.platform_version,
            "host": _host_cpu() if device.platform == "cpu" else "",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_config": {name: str(getattr(jax.config, name)) for name in
                           ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion")},
            "model": model_signature(model, state),
            "code": code_digest(model),
        }

    @staticmethod
    def key(material: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.jaxexec"

    # ------------------------------------------------------------------------------------- read

    def _payload(self, key: str) -> bytes | None:
        """The verified payload of an entry; None when there is none or it is damaged (then it is deleted)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("compile cache: cannot read %s (%s); compiling it again", path.name, e)
            return None
        try:
            if not raw.startswith(_MAGIC):
                raise ValueError("not a maxjax executable")
            start = len(_MAGIC) + 4
            (size,) = struct.unpack("<I", raw[len(_MAGIC) : start])
            header = json.loads(raw[start : start + size])
            payload = raw[start + size :]
            if header.get("key") != key or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
                raise ValueError("checksum mismatch")
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            self._discard(path, e)
            return None
        return payload

    def verify(self, key: str) -> bool:
        """Whether a loadable-looking entry exists (checksum included); a damaged one is deleted."""
        return self._payload(key) is not None

    def load(self, key: str) -> Any | None:
        """The executable stored under `key`, loaded onto the device; None when missing or unloadable."""
        payload = self._payload(key)
        if payload is None:
            return None
        from jax.experimental.serialize_executable import deserialize_and_load

        if self.device.platform == "cpu":
            from maxjax import kernels

            kernels.load()  # an executable that calls maxjax's CPU kernels needs them registered before it loads
        try:
            serialized, in_tree, out_tree = pickle.loads(payload)
            compiled = deserialize_and_load(serialized, in_tree, out_tree, backend=self.device.client,
                                            execution_devices=self.devices)
        except Exception as e:  # any failure to load is a miss: the caller compiles instead
            self._discard(self.path(key), e)
            return None
        with contextlib.suppress(OSError):
            os.utime(self.path(key))  # recently used, for pruning
        return compiled

    def _discard(self, path: Path, reason: BaseException) -> None:
        log.warning("compile cache: %s is unusable (%s: %s); deleting it and compiling again",
                    path.name, type(reason).__name__, reason)
        path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------- write

    def save(self, key: str, material: dict[str, Any], compiled: Any) -> bool:
        """Serialize and write one executable (atomically: a reader sees the old file or the whole new one).
        Returns False, with a warning, when the backend cannot serialize or the disk refuses."""
        from jax.experimental.serialize_executable import serialize

        try:
            payload = pickle.dumps(serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            log.warning("compile cache: cannot serialize an executable on %s (%s); not cached",
                        self.device.platform, e)
            return False
        header = json.dumps({"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "material": material})
        body = io.BytesIO()
        body.write(_MAGIC)
        body.write(struct.pack("<I", len(header.encode())))
        body.write(header.encode())
        body.write(payload)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(body.getvalue())
            os.replace(tmp, self.path(key))
        except OSError as e:
            log.warning("compile cache: cannot write %s (%s); not cached", self.path(key), e)
            Path(tmp).unlink(missing_ok=True)
            return False
        return True

    def prune(self, max_bytes: int = MAX_STORE_BYTES) -> int:
        """Delete least recently used entries until the store holds at most `max_bytes`; returns how many."""
        entries = []
        for path in self.directory.glob("*.jaxexec"):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


class PendingLoads(Generic[Name]):
    """Entries verified at warm-up and not loaded yet. `take(name)` loads one now, or waits for the background
    loader if it is already loading that one; each entry is deserialized once."""

    def __init__(self, store: ExecutableStore, keys: Mapping[Name, str]):
        self._store = store
        self._keys = dict(keys)
        self._lock = threading.Lock()
        self._futures: dict[Name, Future[Any]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def take(self, name: Name) -> Any | None:
        """The loaded executable, or None when `name` is not pending or its entry no longer loads."""
        with self._lock:
            future = self._futures.get(name)
            mine = future is None and name in self._keys
            if mine:
                future = self._futures[name] = Future()
        if future is None:
            return None
        if mine:
            try:
                future.set_result(self._store.load(self._keys[name]))
            except BaseException as e:  # reported to every waiter
                future.set_exception(e)
        return future.result()

    def start(self, order: Iterable[Name], on_loaded: Callable[[Name, Any], None], *,
              threads: int = 1, nice: int = 0) -> list[threading.Thread]:
        """Load every pending entry in `order` on `threads` daemon threads (XLA deserializes with the GIL
        released: two threads load 1.4x faster than one on 2 cores), handing each to `on_loaded`. `nice`: the
        threads' scheduling priority (Linux: per thread), e.g. 19 to load in the background without slowing
        the steps that serve."""
        todo = iter(list(order))
        lock = threading.Lock()
        remaining = [threads]

        def run() -> None:
            if nice:  # not Linux: the thread loads at the process's priority
                with contextlib.suppress(OSError, AttributeError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            while True:
                with lock:
                    name = next(todo, None)
                if name is None:
                    break
                if name in self._keys:
                    executable = self.take(name)
                    if executable is not None:
                        on_loaded(name, executable)
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and all(name in self._futures for name in self._keys):
                log.info("compile cache: all %d cached executables loaded", len(self._keys))

        workers = [threading.Thread(target=run, name=f"maxjax-load-executables-{i}", daemon=True)
                   for i in range(threads)]
        for worker in workers:
            worker.start()
        return workers


# ----------------------------------------------------------------------------------------- fingerprint parts

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def model_signature(model: nnx.Module, state: nnx.State) -> str:
    """A digest of what the traced graph depends on in the model: every module's type and static attributes
    (config values, epsilons, activation names) and every weight's path, shape, dtype and logical axes (which,
    with the mesh, decide its sharding). The weights' values are arguments of the executables, not constants, so
    two checkpoints of one architecture share executables."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = leaf.get_metadata("out_sharding", None) if isinstance(leaf, nnx.Variable) else None
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(value.shape)}:{value.dtype}:{axes}\n".encode())
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) or not isinstance(node, nnx.Pytree):
            continue
        statics = {name: _ADDRESS.sub("", repr(value)) for name, value in vars(node).items()
                   if not name.startswith("_pytree__") and not isinstance(value, nnx.Variable | nnx.Pytree | jax.Array)}
        h.update(f"{path}:{type(node).__module__}.{type(node).__qualname__}:{sorted(statics.items())}\n".encode())
    return h.hexdigest()


def code_digest(model: nnx.Module) -> str:
    """A digest of the code that traces the graph: `maxjax/graph/*.py`, `maxjax/models/*.py`, the CPU kernels
    (`maxjax/kernels/`, sources included) and the source file of every module class in the model (an
    architecture defined outside maxjax included)."""
    import maxjax.graph
    import maxjax.kernels
    import maxjax.models

    kernels = Path(maxjax.kernels.__file__).parent
    files = {*Path(maxjax.graph.__file__).parent.glob("*.py"), *Path(maxjax.models.__file__).parent.glob("*.py"),
             *kernels.glob("*.py"), *kernels.glob("*.cc"), *kernels.glob("*.h")}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Pytree) and not isinstance(node, nnx.Variable):
            source = inspect.getsourcefile(type(node))
            if source:
                files.add(Path(source))
    h = hashlib.sha256()
    for file in sorted(files, key=lambda f: (f.name, str(f))):
        h.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def _flax_version() -> str:
    import flax

    return str(flax.__version__)


def _host_cpu() -> str:
    """The CPU model and feature flags: an executable compiled for one CPU's instruction set may crash another."""
    from maxjax.kernels import host_cpu

    return hashlib.sha256(host_cpu().encode()).hexdigest()[:16]
