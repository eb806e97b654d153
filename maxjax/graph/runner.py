"""The device side of a step: one pure jitted core, `(params, kv pages, batch arrays, sampling arrays) -> (kv
pages, sampled tokens, logprobs)`, compiled once per bucket of the grid, and a thin `ModelRunner` around it.

The runner never names a model: it sees a Flax NNX module with the call signature of
`LlamaForCausalLM.__call__` and splits it once (`nnx.split`); the flat state is what the jitted core receives,
as an argument (closing over the weights as constants triples compile time). The KV pools are donated to
every step, so XLA updates them in place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxjax.graph.buckets import BucketGrid
from maxjax.graph.sampling import Arr, SampleOutput, SamplingArrays, sample
from maxjax.models.layers import KVCache, write_kv

log = logging.getLogger(__name__)


class StepInputs(NamedTuple):
    """One step's batch, padded to a bucket. Rows past the live ones are padding (n_new = 0)."""

    tokens: Arr
    """[B, T] int32"""
    past_len: Arr
    """[B] int32: tokens already cached for the row."""
    slots: Arr
    """[B, T] int32: where each new token's K/V goes (page * page_size + offset); padding -> page 0."""
    page_table: Arr
    """[B, P] int32: the row's pages covering its past (page 0 beyond them)."""
    logit_index: Arr
    """[B, 1] int32: which new token's logits to sample from (the row's last)."""
    sampling: SamplingArrays
    """Per-row sampling arrays (numpy)."""


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

    def allocate(self, device: jax.Device | None = None) -> KVCache:
        shape_k = (self.num_layers, self.num_pages, self.num_kv_heads, self.head_dim, self.page_size)
        shape_v = (self.num_layers, self.num_pages, self.num_kv_heads, self.page_size, self.head_dim)
        with jax.default_device(device or jax.devices()[0]):
            return KVCache(jnp.zeros(shape_k, self.dtype), jnp.zeros(shape_v, self.dtype))


def _step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, inputs: StepInputs) -> tuple[KVCache, SampleOutput]:
    model = nnx.merge(graphdef, state)
    logits, new_k, new_v = model(inputs.tokens, cache, inputs.page_table, inputs.past_len, inputs.logit_index)
    # The last layer's reads of the pool feed only the logits. Unless the write visibly depends on them, XLA
    # cannot prove that every read comes before it and copies the whole donated pool (twice) every step.
    # An optimization barrier does not count as a dependency there; arithmetic does (nothing exceeds +inf,
    # so this adds exactly 0).
    after_reads = (logits[0, 0, 0] > jnp.inf).astype(new_k.dtype)
    new_k, new_v = new_k + after_reads, new_v + after_reads
    cache = write_kv(cache, new_k, new_v, inputs.slots)
    return cache, sample(logits[:, -1], inputs.sampling)


def abstract_inputs(rows: int, tokens: int, pages: int) -> StepInputs:
    """Shape-only inputs of one bucket, for ahead-of-time lowering (no device memory is touched)."""
    i32, f32 = jnp.int32, jnp.float32

    def s(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    return StepInputs(
        tokens=s((rows, tokens), i32),
        past_len=s((rows,), i32),
        slots=s((rows, tokens), i32),
        page_table=s((rows, pages), i32),
        logit_index=s((rows, 1), i32),
        sampling=SamplingArrays(
            temperature=s((rows,), f32), top_p=s((rows,), f32), top_k=s((rows,), i32),
            min_p=s((rows,), f32), seed=s((rows,), jnp.uint32), position=s((rows,), i32),
        ),
    )


class ModelRunner:
    """Holds the split model, the KV pools and one compiled executable per bucket."""

    def __init__(self, model: nnx.Module, cache_spec: CacheSpec, grid: BucketGrid, device: jax.Device | None = None):
        self.device = device or jax.devices()[0]
        self.grid = grid
        self.cache_spec = cache_spec
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        self.state = jax.device_put(state, self.device)
        self.cache = cache_spec.allocate(self.device)
        self._jitted = jax.jit(_step, static_argnums=0, donate_argnums=2)
        self._compiled: dict[tuple[int, int, int], Any] = {}

    def compile(self, shape: tuple[int, int, int]) -> Any:
        """Lower and compile one bucket with abstract inputs (idempotent)."""
        if shape not in self._compiled:
            lowered = self._jitted.lower(self.graphdef, self.state, self.cache, abstract_inputs(*shape))
            self._compiled[shape] = lowered.compile()
        return self._compiled[shape]

    def warm_up(self, shapes: list[tuple[int, int, int]] | None = None, progress: Any = None) -> float:
        """Compile every bucket of the grid (or `shapes`); returns the seconds it took."""
        start = time.perf_counter()
        for shape in shapes if shapes is not None else self.grid.all_shapes():
            self.compile(shape)
            if progress is not None:
                progress(shape)
        return time.perf_counter() - start

    def step(self, inputs: StepInputs) -> SampleOutput:
        """Run one bucketed step; the returned arrays live on the device (dispatch is asynchronous)."""
        shape = (inputs.tokens.shape[0], inputs.tokens.shape[1], inputs.page_table.shape[1])
        executable = self._compiled.get(shape)
        if executable is None:
            log.warning("compiling bucket %s outside warm-up", shape)
            executable = self.compile(shape)
        self.cache, out = executable(self.state, self.cache, inputs)
        return out
