"""The device side of a step: one pure jitted core, `(params, kv pages, batch arrays, sampling arrays) -> (kv
pages, sampled tokens, logprobs)`, compiled once per bucket of the grid, and a thin `ModelRunner` around it.

The runner never names a model: it sees a Flax NNX module with the call signature of
`LlamaForCausalLM.__call__` and splits it once (`nnx.split`); the flat state is what the jitted core receives,
as an argument (closing over the weights as constants triples compile time). The KV pools are donated to
every step, so XLA updates them in place.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxjax.graph.buckets import BucketGrid
from maxjax.graph.sampling import (
    ADJUST_SLOTS,
    LOGPROB_FLOOR,
    TOP_LOGPROBS,
    Arr,
    LogitAdjustments,
    SampleOutput,
    SamplingArrays,
    adjust_logits,
    sample,
)
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
    adjust: LogitAdjustments
    """Per-row penalties, biases and banned tokens."""


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


def _step(
    graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, inputs: StepInputs
) -> tuple[KVCache, SampleOutput, jax.Array]:
    model: Any = nnx.merge(graphdef, state)
    hidden, new_k, new_v = model.forward(inputs.tokens, cache, inputs.page_table, inputs.past_len)
    raw = model.logits(jnp.take_along_axis(hidden, inputs.logit_index[:, :, None], axis=1)[:, -1])
    # The last layer's reads of the pool feed only the logits. Unless the write visibly depends on them, XLA
    # cannot prove that every read comes before it and copies the whole donated pool (twice) every step.
    # An optimization barrier does not count as a dependency there; arithmetic does (nothing exceeds +inf,
    # so this adds exactly 0).
    after_reads = (raw[0, 0] > jnp.inf).astype(new_k.dtype)
    cache = write_kv(cache, new_k + after_reads, new_v + after_reads, inputs.slots)
    return cache, sample(adjust_logits(raw, inputs.adjust), inputs.sampling, raw), hidden


def _score(graphdef: nnx.GraphDef, state: nnx.State, hidden: jax.Array, targets: jax.Array) -> PromptScores:
    """Logprobs of `targets` [1, T] (each position's next prompt token) from a prefill's hidden states."""
    model: Any = nnx.merge(graphdef, state)
    logits = model.logits(hidden)  # [1, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    top, top_ids = jax.lax.top_k(logits, TOP_LOGPROBS)
    return PromptScores(
        logprobs=jnp.maximum(chosen, LOGPROB_FLOOR),
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=jnp.maximum(top - log_z[..., None], LOGPROB_FLOOR),
    )


class PromptScores(NamedTuple):
    logprobs: jax.Array
    """[1, T]"""
    top_ids: jax.Array
    """[1, T, TOP_LOGPROBS]"""
    top_logprobs: jax.Array


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
        adjust=LogitAdjustments(
            ids=s((rows, ADJUST_SLOTS), i32), count=s((rows, ADJUST_SLOTS), f32),
            seen=s((rows, ADJUST_SLOTS), jnp.bool_), bias=s((rows, ADJUST_SLOTS), f32),
            presence=s((rows,), f32), frequency=s((rows,), f32), repetition=s((rows,), f32),
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
        self.vocab_size, self.hidden_size = (int(d) for d in model.embed.shape)  # type: ignore[attr-defined]
        self._jitted = jax.jit(_step, static_argnums=0, donate_argnums=2)
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self._score = jax.jit(_score, static_argnums=0)
        self._compiled_score: dict[int, Any] = {}

    def _lower(self, shape: tuple[int, int, int]) -> Any:
        return self._jitted.lower(self.graphdef, self.state, self.cache, abstract_inputs(*shape))

    def compile(self, shape: tuple[int, int, int]) -> Any:
        """Lower and compile one bucket with abstract inputs (idempotent)."""
        if shape not in self._compiled:
            self._compiled[shape] = self._lower(shape).compile()
        return self._compiled[shape]

    def warm_up(self, shapes: list[tuple[int, int, int]] | None = None, progress: Any = None) -> float:
        """Compile every bucket of the grid (or `shapes`); returns the seconds it took.

        Lowering (tracing, which holds the GIL) runs here while XLA compiles earlier buckets on a thread per
        core: on 2 cores that is 1.7x faster than one after the other.
        """
        start = time.perf_counter()
        todo = [s for s in (shapes if shapes is not None else self.grid.all_shapes()) if s not in self._compiled]
        widths = sorted({t for _, t, _ in todo if t > 1} - set(self._compiled_score))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = {pool.submit(lowered.compile): shape for shape, lowered in
                       ((shape, self._lower(shape)) for shape in todo)}
            scores = {pool.submit(self._lower_score(w).compile): w for w in widths}
            for future in as_completed(futures):
                shape = futures[future]
                self._compiled[shape] = future.result()
                if progress is not None:
                    progress(shape)
            for future in as_completed(scores):
                self._compiled_score[scores[future]] = future.result()
        return time.perf_counter() - start

    def step(self, inputs: StepInputs) -> tuple[SampleOutput, jax.Array]:
        """Run one bucketed step: (sampled tokens, hidden states [B, T, D]), left on the device (dispatch is
        asynchronous)."""
        shape = (inputs.tokens.shape[0], inputs.tokens.shape[1], inputs.page_table.shape[1])
        executable = self._compiled.get(shape)
        if executable is None:
            log.warning("compiling bucket %s outside warm-up", shape)
            executable = self.compile(shape)
        self.cache, out, hidden = executable(self.state, self.cache, inputs)
        return out, hidden

    def _lower_score(self, width: int) -> Any:
        hidden = jax.ShapeDtypeStruct((1, width, self.hidden_size), self.cache_spec.dtype)
        return self._score.lower(self.graphdef, self.state, hidden, jax.ShapeDtypeStruct((1, width), jnp.int32))

    def score(self, hidden: jax.Array, targets: np.ndarray) -> PromptScores:
        """Prompt logprobs for one prefill chunk (`echo` with `logprobs`); compiled per chunk bucket."""
        width = hidden.shape[1]
        if width not in self._compiled_score:
            log.warning("compiling the prompt-logprob graph for %d tokens outside warm-up", width)
            self._compiled_score[width] = self._lower_score(width).compile()
        return self._compiled_score[width](self.state, hidden, targets)
