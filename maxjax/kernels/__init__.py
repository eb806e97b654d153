"""CPU kernels XLA lacks, as XLA FFI custom calls: `maxjax_project` (project.cc), the projection of a step's
rows against float32 weights packed into panels, `maxjax_paged_attention` (attention.cc), a step's attention
over the cached past read straight from the paged KV pool and over its new tokens, `maxjax_paged_past`, the
past's part only (continuing the graph's softmax), `maxjax_reserve` (attention.cc), a pool allocated but
not zero-filled, and `maxjax_qproject` (qproject.cc), the projection against GGUF's quantized blocks repacked
into panels (`kernels.quant`).

The C++ sources are built at first use with the machine's C++ compiler (`c++`, or `$CXX`) against the XLA FFI
headers jaxlib ships, for this CPU (`-march=native`), into the maxjax cache under a name that hashes the source,
jaxlib's version, the compiler and the CPU; later processes load that file. Where no compiler is found or the
build fails, `load()` says why once and returns None, and the models keep XLA's own forms
(`models.layers.project`): the kernel is a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maxjax.paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("project.cc", "attention.cc", "qproject.cc"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel.h", "panel.h"))
TARGET = "maxjax_project"
ATTENTION_TARGET = "maxjax_paged_attention"
PAST_TARGET = "maxjax_paged_past"
RESERVE_TARGET = "maxjax_reserve"
QUANT_TARGET = "maxjax_qproject"
"""The custom-call names the graphs use (registered for the CPU platform)."""
KEEP_BUILDS = 4
"""Libraries kept in the cache directory, most recently loaded first (one per source, jaxlib and compiler version
in use on the machine); loading one deletes the older rest."""


@dataclass(frozen=True)
class Kernels:
    """The loaded library: what the graphs and the packer need to know of it."""

    path: Path
    panel: int
    """Output columns per packed panel (16 for AVX2, 32 for AVX-512)."""
    int8: bool
    """Whether `maxjax_qproject` can multiply Q4_* blocks with int8 activations (AVX2 and AVX-512 builds)."""
    digest: str
    """Hash of what the build depends on (sources, jaxlib, compiler, CPU): the library's file name."""


_lock = threading.Lock()
_loaded: dict[Path, Kernels | None] = {}


def load() -> Kernels | None:
    """The CPU kernels, built if needed and registered with JAX; None (with one warning) where they cannot be."""
    directory = cache_dir() / "kernels"
    with _lock:
        if directory not in _loaded:
            try:
                _loaded[directory] = _build_and_register(directory)
            except _Unavailable as e:
                log.warning("maxjax: CPU kernels unavailable (%s); using XLA's own forms", e)
                _loaded[directory] = None
        return _loaded[directory]


class _Unavailable(Exception):
    pass


_registered: Kernels | None = None


def _build_and_register(directory: Path) -> Kernels:
    global _registered
    import jax
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise _Unavailable("no C++ compiler on PATH")
    identity = hashlib.sha256()
    parts = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    parts += [part.encode() for part in (jaxlib.__version__, _compiler_version(compiler), host_cpu())]
    for part in parts:
        identity.update(part + b"\0")
    digest = identity.hexdigest()[:20]
    library = directory / f"maxjax-kernels-{digest}.so"
    if not library.exists():
        try:
            _build(compiler, library, Path(jax.ffi.include_dir()))
        except OSError as e:  # an unwritable cache, a full disk
            raise _Unavailable(f"cannot build into {library.parent}: {e}") from e
    try:
        lib = ctypes.CDLL(str(library))
        panel = int(lib.maxjax_panel_width())
        int8 = bool(lib.maxjax_int8_activations())
    except (OSError, AttributeError) as e:
        raise _Unavailable(f"cannot load {library}: {e}") from e
    kernels = Kernels(library, panel, int8, digest)
    _mark_used_and_prune(library)
    if _registered is None:
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MaxjaxProject), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.MaxjaxPagedAttention), platform="cpu")
        jax.ffi.register_ffi_target(PAST_TARGET, jax.ffi.pycapsule(lib.MaxjaxPagedPast), platform="cpu")
        jax.ffi.register_ffi_target(RESERVE_TARGET, jax.ffi.pycapsule(lib.MaxjaxReserve), platform="cpu")
        jax.ffi.register_ffi_target(QUANT_TARGET, jax.ffi.pycapsule(lib.MaxjaxQProject), platform="cpu")
        _registered = kernels
    elif _registered.digest != digest:  # one name, one handler a process: a second build cannot replace it
        raise _Unavailable(f"another build of {TARGET} and {ATTENTION_TARGET} is already registered")
    return kernels


def _mark_used_and_prune(library: Path) -> None:
    """Touch `library` (most recently used) and delete all but the `KEEP_BUILDS` most recently used builds beside
    it. A process that has a deleted one loaded keeps its mapping; one that wants it again rebuilds it."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    try:
        os.utime(library)
        builds = sorted(library.parent.glob("maxjax-kernels-*.so"), key=used, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            old.unlink(missing_ok=True)
    except OSError as e:  # a read-only cache still serves the library it has
        log.debug("maxjax: cannot prune old kernel builds in %s: %s", library.parent, e)


def _build(compiler: str, library: Path, include: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    log.info("maxjax: building the CPU kernels (once per machine) into %s", library)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{include}", *(str(source) for source in SOURCES), "-o", str(partial)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _Unavailable(f"{compiler} failed: {e}") from e
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise _Unavailable(f"{compiler} exited {result.returncode}: {last}")
        os.replace(partial, library)  # atomic: a process building beside this one loads a whole file


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _Unavailable(f"{compiler} --version failed: {e}") from e


def host_cpu() -> str:
    """The CPU's model and feature flags (what `-march=native` and XLA's own code generation depend on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    keep = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line.strip() for line in info.splitlines() if line.split(":")[0].strip() in keep}))


def pack(w: np.ndarray, panel: int) -> np.ndarray:
    """[out, in] -> [ceil(out / panel), in, panel]: w_packed[p, i, j] = w[p * panel + j, i], zero-padded."""
    out, d_in = w.shape
    panels = -(-out // panel)
    padded = np.zeros((panels * panel, d_in), w.dtype)
    padded[:out] = w
    return np.ascontiguousarray(padded.reshape(panels, panel, d_in).transpose(0, 2, 1))


def project(x: Any, w: Any, out: int) -> Any:
    """x [..., in] times a packed w [panels, in, P] -> [..., out], as the custom call (traced into the graph)."""
    import jax

    result = jax.ShapeDtypeStruct((*x.shape[:-1], out), x.dtype)
    return jax.ffi.ffi_call(TARGET, result)(x, w)


def reserve(shape: tuple[int, ...], dtype: Any) -> Any:
    """An array of `shape` whose contents are whatever the fresh memory holds (zeros, from the OS): call inside
    `jax.jit`. Only for buffers every element of which is written before it is read (the KV pool)."""
    import jax

    return jax.ffi.ffi_call(RESERVE_TARGET, jax.ShapeDtypeStruct(shape, dtype))()


def paged_past(q: Any, k_pool: Any, v_pool: Any, page_table: Any, past_len: Any, query_pos: Any,
               run_max: Any, run_sum: Any, out: Any, *, layer: int, window: int | None,
               softcap: float | None) -> tuple[Any, Any, Any]:
    """Continue an online softmax over each row's cached past, read from the pool in place (attention.cc has
    the layouts): q [B, K, M, E] scaled queries; run_max, run_sum [B, K, M]; out [B, K, M, E]."""
    import jax
    import numpy as np

    shapes = [jax.ShapeDtypeStruct(a.shape, np.float32) for a in (run_max, run_sum, out)]
    call = jax.ffi.ffi_call(PAST_TARGET, shapes)
    result = call(q, k_pool, v_pool, page_table, past_len, query_pos, run_max, run_sum, out,
                  layer=np.int64(layer), window=np.int64(window or 0), softcap=np.float32(softcap or 0.0))
    return result[0], result[1], result[2]


WHOLE_VECTORS = 16
"""`paged_attention` needs the page size and head width to be multiples of this (whole vectors on every build)."""


def paged_attention(q: Any, k_new: Any, v_new: Any, k_pool: Any, v_pool: Any, page_table: Any, past_len: Any,
                    query_pos: Any, *, layer: int, window: int | None, softcap: float | None) -> Any:
    """A step's attention, normalized: q [B, K, M, E] scaled queries over each row's cached past (read from the
    pool in place) and the step's new keys and values k_new, v_new [B, T, K, E], causally -> [B, K, M, E]."""
    import jax

    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, np.float32))
    return call(q, k_new.transpose(0, 2, 3, 1), v_new.transpose(0, 2, 1, 3), k_pool, v_pool, page_table, past_len,
                query_pos,
                layer=np.int64(layer), window=np.int64(window or 0), softcap=np.float32(softcap or 0.0))
