"""The compile cache: `max warm-cache` fills it, a second start compiles nothing, a damaged entry costs exactly
its own recompile, and a different dtype or KV page size never loads the old executables.

End to end on the tiny Llama fixture (2 layers) with a 6-executable grid, each command a real process whose
compilations are read from JAX's own log (JAX_LOG_COMPILES: 'Compiling jit(step)' is a model graph traced and
compiled; JAX_EXPLAIN_CACHE_MISSES: 'PERSISTENT COMPILATION CACHE MISS' is any XLA compilation at all). The store
itself (checksums, damaged files, pruning, the pending loads) is tested in-process with a tiny jitted function.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from maxjax.cli import main
from maxjax.graph.compile_cache import ExecutableStore, PendingLoads, model_signature
from tests.serve_helpers import MAX, max_serve

LLAMA = Path(__file__).parent / "fixtures" / "arch" / "llama"
# batch 2, 2 pages of 16 per row: decode (1,1,2) (2,1,2), prefill (1,16,2), one score graph
FLAGS = ["--model", str(LLAMA), "--max-batch-size", "2", "--max-length", "32", "--prefill-chunk-size", "16",
         "--kv-cache-pages", "8"]
TOTAL = 4


@dataclass
class Run:
    log: str

    @property
    def model_compiles(self) -> list[str]:
        """Model graphs JAX traced and compiled (the step and prompt-logprob graphs)."""
        return [line for line in self.log.splitlines() if re.search(r"Compiling jit\((step|score|encode)\)", line)]

    @property
    def xla_compiles(self) -> list[str]:
        """Every XLA compilation, small helpers included (each is a persistent-cache miss)."""
        return [line for line in self.log.splitlines() if "PERSISTENT COMPILATION CACHE MISS" in line]

    @property
    def counts(self) -> tuple[int, int]:
        """(compiled, found in the cache) as the warm-up log line reports them."""
        match = re.search(r"executables ready in [\d.]+ s: (\d+) compiled, (\d+) found", self.log)
        assert match, self.log[-3000:]
        return int(match.group(1)), int(match.group(2))


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")


def warm_cache(cache: Path, *extra: str) -> Run:
    proc = subprocess.run([MAX, "warm-cache", *FLAGS, *extra, "--compile-cache-dir", str(cache)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(proc.stderr + proc.stdout)


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "executables").glob("*.jaxexec"))


RUN_EVERY_ENTRY = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp
from maxjax.graph.compile_cache import ExecutableStore
store = ExecutableStore(Path(sys.argv[1]), jax.devices()[0])
for path in sorted(store.directory.glob("*.jaxexec")):
    compiled = store.load(path.stem)
    assert compiled is not None, path
    args, kwargs = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), compiled.args_info,
                                is_leaf=lambda x: isinstance(x, jax.stages.ArgInfo))
    jax.block_until_ready(compiled(*args, **kwargs))
"""


def run_every_entry(cache: Path) -> None:
    """Load every stored executable in a new process and run it on zeros. (An executable serialized after it was
    itself deserialized loads, then fails here: XLA:CPU drops its kernels.)"""
    proc = subprocess.run([sys.executable, "-c", RUN_EVERY_ENTRY, str(cache)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """A cache filled by one cold `max warm-cache`, and that run. Tests that damage it work on a copy."""
    cache = tmp_path_factory.mktemp("compile-cache")
    return cache, warm_cache(cache)


@pytest.fixture
def copy(filled: tuple[Path, Run], tmp_path: Path) -> Path:
    shutil.copytree(filled[0], tmp_path / "cache")
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------- end to end


def test_cold_warm_cache_compiles_and_stores_every_executable(filled: tuple[Path, Run]) -> None:
    cache, run = filled
    assert run.counts == (TOTAL, 0)
    assert len(run.model_compiles) == TOTAL
    assert len(entries(cache)) == TOTAL
    xla = [p.name for p in (cache / "xla").iterdir()]
    assert xla, "JAX's persistent cache holds the small helpers"
    assert not [name for name in xla if name.startswith(("jit_step", "jit_score", "jit_encode"))], "the store holds those"


def test_second_warm_cache_compiles_nothing(filled: tuple[Path, Run], copy: Path) -> None:
    run = warm_cache(copy)
    assert run.counts == (0, TOTAL)
    assert run.model_compiles == [] and run.xla_compiles == []


@pytest.fixture
def warm_server(copy: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    log = tmp_path / "serve.log"
    with max_serve([*FLAGS, "--compile-cache-dir", str(copy)], log, env=_env(), timeout=120) as url:
        yield url, log


def test_a_warm_server_start_compiles_nothing_and_serves(warm_server: tuple[str, Path]) -> None:
    url, log = warm_server
    body = json.dumps({"prompt": "hello", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert answer["usage"]["completion_tokens"] == 4
    deadline = time.time() + 60
    while "cached executables loaded" not in log.read_text():  # the background loader, too, compiles nothing
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    run = Run(log.read_text())
    assert run.counts == (0, TOTAL)
    assert run.model_compiles == [] and run.xla_compiles == [], run.model_compiles + run.xla_compiles


def test_a_damaged_or_missing_entry_costs_exactly_its_own_recompile(copy: Path) -> None:
    damaged, truncated, deleted = entries(copy)[:3]
    raw = bytearray(damaged.read_bytes())
    raw[-100] ^= 0xFF  # one flipped bit in the payload: the checksum catches it
    damaged.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    deleted.unlink()
    run = warm_cache(copy)
    assert run.counts == (3, TOTAL - 3)
    assert len(run.model_compiles) == 3
    assert "is unusable" in run.log
    assert {p.name for p in entries(copy)} >= {damaged.name, truncated.name, deleted.name}
    assert warm_cache(copy).counts == (0, TOTAL)
    run_every_entry(copy)


@pytest.mark.parametrize("change", [["--quantization-encoding", "bfloat16"], ["--kv-cache-page-size", "8"],
                                    ["--max-batch-size", "1"]], ids=["dtype", "page-size", "batch-grid"])
def test_another_dtype_or_grid_loads_none_of_the_old_executables(copy: Path, change: list[str]) -> None:
    before = {p.name for p in entries(copy)}
    run = warm_cache(copy, *change)
    compiled, found = run.counts
    assert found == 0 and compiled == len(run.model_compiles) > 0
    after = {p.name for p in entries(copy)}
    assert before < after and len(after - before) == compiled


def test_warm_cache_refuses_no_compile_cache() -> None:
    result = CliRunner().invoke(main, ["warm-cache", *FLAGS, "--no-compile-cache"])
    assert result.exit_code == 2 and "drop --no-compile-cache" in result.output


# --------------------------------------------------------------------------------------------- the store


def _compiled(scale: float = 2.0) -> Any:
    return jax.jit(lambda x: x * scale).lower(jax.ShapeDtypeStruct((4,), jnp.float32)).compile()


@pytest.fixture
def store(tmp_path: Path) -> ExecutableStore:
    return ExecutableStore(tmp_path, jax.devices()[0])


def test_store_round_trip(store: ExecutableStore) -> None:
    assert store.load("missing") is None and not store.verify("missing")
    assert store.save("k", {"what": "double"}, _compiled())
    assert store.verify("k")
    loaded = store.load("k")
    np.testing.assert_array_equal(loaded(jnp.arange(4.0)), [0.0, 2.0, 4.0, 6.0])


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "renamed", "undeserializable"])
def test_a_damaged_entry_is_a_logged_miss_and_is_deleted(
    store: ExecutableStore, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("k", {}, _compiled())
    path = store.path("k")
    raw = path.read_bytes()
    if damage == "flip":
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "foreign":
        path.write_bytes(b"\x00" * 64)
    elif damage == "renamed":  # a valid entry under another key's name
        store.save("other", {}, _compiled())
        shutil.copy(store.path("other"), path)
    else:  # right checksum, but the payload is not an executable: only loading it can tell
        import hashlib
        import pickle

        payload = pickle.dumps((b"not an executable", None, None))
        header = json.dumps({"key": "k", "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path.write_bytes(b"maxjax-executable\n" + len(header).to_bytes(4, "little") + header + payload)
        assert store.verify("k")
    with caplog.at_level(logging.WARNING):
        assert store.load("k") is None
    assert not path.exists()
    assert "unusable" in caplog.text


def test_prune_removes_least_recently_used(store: ExecutableStore) -> None:
    for i, key in enumerate(["old", "mid", "new"]):
        store.save(key, {}, _compiled(float(i)))
        os.utime(store.path(key), (1000.0 + i, 1000.0 + i))
    size = store.path("new").stat().st_size
    assert store.prune(max_bytes=2 * size + size // 2) == 1
    assert not store.path("old").exists() and store.path("mid").exists() and store.path("new").exists()


def test_pending_loads_deserialize_each_entry_once(store: ExecutableStore) -> None:
    for key in ("a", "b", "c"):
        store.save(key, {}, _compiled())
    calls: list[str] = []
    load = store.load

    def counting_load(key: str) -> Any:
        calls.append(key)
        return load(key)

    store.load = counting_load  # type: ignore[method-assign]
    pending = PendingLoads(store, {("step", i): key for i, key in enumerate("abc")})
    got: dict[Any, Any] = {}
    workers = pending.start([("step", 0), ("step", 1), ("step", 2)], got.__setitem__, threads=2)
    takers = [threading.Thread(target=pending.take, args=(("step", i),)) for i in (2, 1, 2)]
    for t in takers:
        t.start()
    for t in takers + workers:
        t.join()
    assert sorted(calls) == ["a", "b", "c"]
    assert len(got) == 3 and pending.take(("step", 9)) is None


def test_model_signature_tells_dtypes_apart_but_not_weight_values() -> None:
    from flax import nnx

    from maxjax.hub import resolve_model
    from maxjax.pipeline import load_model

    f32 = load_model(resolve_model(str(LLAMA)), platform="cpu").model
    bf16 = load_model(resolve_model(str(LLAMA), quantization_encoding="bfloat16"), platform="cpu").model
    _, state = nnx.split(f32)
    _, state16 = nnx.split(bf16)
    scaled = jax.tree.map(lambda x: x * 2, state)
    assert model_signature(f32, state) == model_signature(f32, scaled)
    assert model_signature(f32, state) != model_signature(bf16, state16)


def test_model_signature_tells_backends_apart() -> None:
    """A model's backend (weight layouts, attention over the past) is part of its structure, so of every key: each
    change of it changes the signature, even one that leaves every weight's shape as it is; the same backend gives
    the same signature whether the model was built on it or moved onto it."""
    import dataclasses

    from flax import nnx

    from maxjax.hub import resolve_model
    from maxjax.models.backend import Backend, CpuPanels, XlaCpuForms
    from maxjax.models.layers import use_backend
    from maxjax.pipeline import load_model

    def signature(model: nnx.Module) -> str:
        return model_signature(model, nnx.split(model)[1])

    loaded = load_model(resolve_model(str(LLAMA)), platform="cpu")
    model = loaded.model
    backends = [Backend(), Backend(XlaCpuForms()), Backend(XlaCpuForms(), past_kernel=True),
                Backend(CpuPanels(16), past_kernel=True), Backend(CpuPanels(32), past_kernel=True)]
    signatures = []
    for backend in backends:
        moved = nnx.clone(model)
        use_backend(moved, backend)
        built = nnx.eval_shape(lambda backend=backend: type(model)(loaded.config, loaded.dtype, backend))
        assert signature(moved) == signature(built), backend
        signatures.append(signature(moved))
    assert len(set(signatures)) == len(backends)
    assert dataclasses.replace(backends[3]) == backends[3] and hash(backends[3]) == hash(Backend(CpuPanels(16), True))


def test_a_memory_bound_pool_rounds_to_whole_sequences_so_warm_starts_still_hit() -> None:
    from maxjax.graph.memory import plan_kv_pages

    def pages(budget: int) -> int:
        return plan_kv_pages(bytes_per_page=1 << 20, page_size=16, max_batch_size=32, max_length=8192,
                             budget_bytes=budget)

    assert pages(64 << 30) == 32 * 512 + 1  # everything fits: exactly what 32 full sequences need
    assert pages(5000 << 20) == 9 * 512 + 1  # 4999 affordable pages: 9 whole sequences
    assert {pages((5000 << 20) + jitter) for jitter in range(-100 << 20, 100 << 20, 7 << 20)} == {9 * 512 + 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_background_loads_run_at_the_lowest_priority(store: ExecutableStore) -> None:
    """What a ready server loads after /health is 200 (`load_cached(nice=19)`) yields the cores to serving."""
    store.save("a", {}, _compiled())
    priorities: list[int] = []

    def on_loaded(name: Any, executable: Any) -> None:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    for worker in PendingLoads(store, {("step", 0): "a"}).start([("step", 0)], on_loaded, nice=19):
        worker.join()
    assert priorities == [19]
