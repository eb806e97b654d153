"""How a model runs on its device, decided once: each projection's weight layout and the attention over the past.

A `Backend` is chosen by whoever knows the device (`backend_for`: the platform, the serving dtype, and whether
maxjax's CPU kernels built) and handed to the model's constructor, or to `use_backend` for a model built in the
checkpoint's layout (what `pipeline.build_model` builds). Every `Linear` and `Embedding` holds its
`WeightLayout` and every attention block the backend as static attributes, so the choice is part of the model's
structure: of the traced graph, of `nnx.GraphDef` equality (jit's trace cache) and of the compile-cache key
(`graph/compile_cache.model_signature`). Nothing is read from the context while tracing.

A layout owns the weight's form on the device: `shape` (what the module's parameter holds), `pack` (from the
checkpoint's [out, in] array, on the host), `apply` (x -> x @ w.T in that form), `rows` (an embedding lookup) and
`axes` (the logical axis names of the stored form, from which `graph/mesh.py` shards it).

On a mesh of several devices XLA partitions its own forms itself, but not a custom call: the backend then
carries the mesh (`Shards`), and the CPU kernels run under `jax.shard_map`, each device on its shard of the
heads or columns (`layers.project_per_shard`, `layers.paged_attention`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from maxjax import kernels
from maxjax.kernels import quant

REDUCE_MAX_ROWS = 16
"""Up to this many rows, a projection in XLA's CPU forms is a multiply-and-sum (see `XlaCpuForms`)."""


@dataclass(frozen=True)
class XlaMatmul:
    """Float [out, in] as checkpoints ship it, multiplied in XLA's generic forms (GPU, TPU; also what a model
    built without a backend uses): one row as `w @ x`, the matrix-vector product, more as `x @ w.T`."""

    packed: ClassVar[bool] = False
    """Whether the stored form differs from the checkpoint's [out, in] (then `pack` is not the identity and the
    weight cannot be handed to another layout)."""
    custom_call: ClassVar[bool] = False
    """Whether `apply` is a custom call, which XLA cannot partition: on a mesh it runs per shard
    (`layers.project_per_shard`)."""

    def shape(self, d_out: int, d_in: int) -> tuple[int, ...]:
        return (d_out, d_in)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """The checkpoint's [out, in] array in this layout (host side, before the weights are placed)."""
        return w

    def axes(self, out_axis: str | None, in_axis: str | None) -> tuple[str | None, ...]:
        """The logical names of the stored array's axes (`graph/mesh.py`), given the [out, in] ones."""
        return (out_axis, in_axis)

    def apply(self, x: jax.Array, w: jax.Array, d_out: int) -> jax.Array:
        """x [..., in] times the weight (this layout) -> [..., d_out]."""
        if math.prod(x.shape[:-1]) == 1:
            return (w @ x.reshape(-1, 1)).reshape(*x.shape[:-1], d_out)
        return x @ w.T

    def rows(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        """Rows `tokens` [...] of an embedding table stored in this layout -> [..., dim]."""
        return jnp.take(table, tokens, axis=0)

    def for_blocks(self, blocks: GGUFBlocks) -> WeightLayout:
        """The layout a tensor held in GGUF's `blocks` takes on a backend of this layout: its blocks in a form this
        device multiplies, or this float layout itself (dequantized at load) where it has none. XLA's generic
        forms dequantize in the graph."""
        return blocks if blocks.encoding in quant.KINDS else self


@dataclass(frozen=True)
class XlaCpuForms(XlaMatmul):
    """Float [out, in], in the forms XLA:CPU runs fastest (CPU without maxjax's kernels, or weights they do not
    take). 2 to `REDUCE_MAX_ROWS` rows are a broadcast multiply summed over `in`: XLA:CPU hands that to YNNPACK's
    fused reduction, which runs the decode batch's projections 15-20% faster than its matmul kernel does for so
    few rows (batch 8: 31 vs 36 ms for SmolLM2's 30 layers). The sums are float32 either way; only their order
    differs."""

    def apply(self, x: jax.Array, w: jax.Array, d_out: int) -> jax.Array:
        rows = math.prod(x.shape[:-1])
        if 1 < rows <= REDUCE_MAX_ROWS:
            flat = x.reshape(rows, 1, -1)
            return jnp.sum(w[None, :, :] * flat, axis=-1).reshape(*x.shape[:-1], d_out)
        return super().apply(x, w, d_out)

    def for_blocks(self, blocks: GGUFBlocks) -> WeightLayout:
        """Dequantized at load: XLA:CPU's float forms outrun its dequantize-in-the-graph ones."""
        return self


@dataclass(frozen=True)
class CpuPanels:
    """float32 panels [ceil(out / panel), in, panel] for maxjax's CPU projection kernel (`maxjax_project`,
    kernels/project.cc): w_packed[p, i, j] = w[p * panel + j, i], zero-padded. An embedding table in this layout
    is looked up in place (row v is column v % panel of panel v // panel), so a tied LM head runs through the
    kernel without a second copy of the table."""

    panel: int
    """Output columns per panel: the loaded kernel's `Kernels.panel` (16 with AVX2, 32 with AVX-512)."""
    int8: bool = False
    """Whether Q4_* blocks (`for_blocks`) are multiplied with int8 activations (`CpuQuantPanels.int8`)."""
    packed: ClassVar[bool] = True
    custom_call: ClassVar[bool] = True

    def shape(self, d_out: int, d_in: int) -> tuple[int, ...]:
        return (-(-d_out // self.panel), d_in, self.panel)

    def pack(self, w: np.ndarray) -> np.ndarray:
        assert w.dtype == np.float32, f"the CPU kernel takes float32 weights, not {w.dtype}"
        return kernels.pack(w, self.panel)

    def axes(self, out_axis: str | None, in_axis: str | None) -> tuple[str | None, ...]:
        """Panels are the output axis: splitting them splits the output columns (a whole number of panels each)."""
        return (out_axis, in_axis, None)

    def apply(self, x: jax.Array, w: jax.Array, d_out: int) -> jax.Array:
        return kernels.project(x, w, d_out)

    def rows(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        return table[tokens // self.panel, :, tokens % self.panel]

    def for_blocks(self, blocks: GGUFBlocks) -> WeightLayout:
        """The quantized kernel's panels, for the block types it multiplies."""
        if blocks.encoding not in quant.KINDS:
            return self
        return CpuQuantPanels(blocks.encoding, self.panel, self.int8 and quant.group(blocks.encoding, True) == 4)


@dataclass(frozen=True)
class GGUFBlocks:
    """GGUF's quantized blocks as the file holds them, uint8 [out, in / 32 * block bytes] (a row's blocks along
    `in`, scales inside), dequantized in the graph beside the matmul or lookup that uses them (XLA's forms,
    `kernels/quant.dequantize_xla`): how GPU and TPU hold a quantized GGUF, and what `build_model` gives each
    tensor the device multiplies in its blocks before `use_backend` moves it onto the device's own layout."""

    encoding: str
    """The block type (`kernels/quant.KINDS`: q8_0, q4_0, q4_1, q4_k, q5_k, q6_k)."""
    dtype: str = "float32"
    """What the blocks are dequantized to (the model's serving dtype)."""
    packed: ClassVar[bool] = True
    custom_call: ClassVar[bool] = False

    def shape(self, d_out: int, d_in: int) -> tuple[int, ...]:
        kind = quant.KINDS[self.encoding]
        return (d_out, d_in // kind.block_weights * kind.block_bytes)

    def axes(self, out_axis: str | None, in_axis: str | None) -> tuple[str | None, ...]:
        """Rows split as the float weight's do; a row's bytes are never split (XLA gathers them where the input
        axis is split)."""
        return (out_axis, None)

    def apply(self, x: jax.Array, w: jax.Array, d_out: int) -> jax.Array:
        return CHECKPOINT_LAYOUT.apply(x, quant.dequantize_xla(self.encoding, w, x.dtype), d_out)

    def rows(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        return quant.dequantize_xla(self.encoding, jnp.take(table, tokens, axis=0), self.dtype)

    def for_blocks(self, blocks: GGUFBlocks) -> WeightLayout:
        return blocks


@dataclass(frozen=True)
class CpuQuantPanels:
    """GGUF's blocks repacked into panels for maxjax's quantized CPU projection kernel (`maxjax_qproject`,
    kernels/qproject.cc; the layout in `kernels/quant.py`): uint8 [ceil(out / panel), in / 32, stride], the
    codes dequantized in registers, so a step reads the file's bytes, not float32's. An embedding table in this
    layout is looked up in place (`quant.panel_rows`), as `CpuPanels`' is."""

    encoding: str
    panel: int
    int8: bool = False
    """Q4_* only: x rounded to int8 per block of 32 inside the kernel (as llama.cpp does), its codes in the
    kernel's int8 order (`quant.repack(int8=True)`): 1.5-2x faster at 8-64 rows, and SmolLM2's logits move by up
    to 1.8 (see docs/design.md); off unless asked for (`backend_for`)."""
    packed: ClassVar[bool] = True
    custom_call: ClassVar[bool] = True

    def shape(self, d_out: int, d_in: int) -> tuple[int, ...]:
        return (-(-d_out // self.panel), d_in // quant.BLOCK, quant.KINDS[self.encoding].stride(self.panel))

    def axes(self, out_axis: str | None, in_axis: str | None) -> tuple[str | None, ...]:
        """Panels are the output axis, blocks the input axis: either splits into whole panels or blocks."""
        return (out_axis, in_axis, None)

    def apply(self, x: jax.Array, w: jax.Array, d_out: int) -> jax.Array:
        return quant.qproject(x, w, self.encoding, d_out, self.int8)

    def rows(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        return quant.panel_rows(self.encoding, table, tokens, self.panel, int8=self.int8)

    def for_blocks(self, blocks: GGUFBlocks) -> WeightLayout:
        return self


WeightLayout = XlaMatmul | CpuPanels | GGUFBlocks | CpuQuantPanels
"""Every layout a `Linear` or `Embedding` can hold (frozen and hashable: a static attribute of the module)."""
CHECKPOINT_LAYOUT = XlaMatmul()
"""[out, in] in XLA's generic forms: the layout modules are built with unless told otherwise."""


@dataclass(frozen=True)
class Shards:
    """The mesh of several devices the weights and the KV pool are sharded over, for the kernels that run per
    shard: its abstract form (axis names and sizes, not which devices: the compile-cache key holds it) and the
    rules the runner placed the arrays by (`graph/mesh.rules_for`: logical axis name -> mesh axis)."""

    mesh: AbstractMesh
    rules: tuple[tuple[str, str | None], ...]

    def axis(self, name: str | None) -> str | None:
        """The mesh axis the logical axis `name` is split over; None: replicated."""
        return dict(self.rules).get(name) if name is not None else None

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        return PartitionSpec(*(self.axis(name) for name in axes))


PastKernel = Literal[False, True, "pallas"]
"""`Backend.past_kernel`: XLA's blocks (False), maxjax's CPU kernel (True; the CPU backends' values, and so their
compile-cache keys, as before the GPU kernel came), or the Pallas GPU kernel ("pallas")."""


@dataclass(frozen=True)
class Backend:
    """What a model is built for: chosen once per device (`backend_for`) and handed to the model."""

    weights: WeightLayout = CHECKPOINT_LAYOUT
    """The layout of every projection kernel and of the embedding table."""
    past_kernel: PastKernel = False
    """Who reads each row's cached past straight from the pool, instead of XLA's gathered blocks (False): True,
    maxjax's CPU kernel (`maxjax_paged_past`, float32 only); "pallas", the Pallas GPU kernel
    (`kernels/pallas_past.py`). A pool only the CPU kernel reads may be reserved rather than zeroed
    (`CacheSpec.allocate`): it never reads a slot past a row's cached length; the Pallas kernel reads whole
    pages."""
    shards: Shards | None = None
    """The mesh, where it has several devices (`ModelRunner` sets it): the CPU kernels then run per shard."""

    def keeps(self, encoding: str) -> bool:
        """Whether a GGUF tensor of `encoding` stays in its blocks on this backend (`WeightLayout.for_blocks`);
        else it is dequantized at load."""
        return encoding in quant.KINDS and self.weights.for_blocks(GGUFBlocks(encoding)) != self.weights


INT8_ENV = "MAXJAX_INT8_ACTIVATIONS"
"""Set to 1: on CPU, Q4_* weights are multiplied with int8 activations where the kernels can (`CpuPanels.int8`)."""


def backend_for(platform: str, dtype: Any) -> Backend:
    """The fastest backend for models of `dtype` on `platform` ("cpu", "gpu", "tpu"): on CPU with maxjax's kernels
    built (`kernels.load()`, which warns once where they cannot be) and float32 weights, the kernels' panels and
    attention (Q4_* weights with int8 activations where `MAXJAX_INT8_ACTIVATIONS=1` and the build can); on CPU
    otherwise, XLA's CPU forms; on GPU, XLA's generic forms with attention over the past in the Pallas kernel; on
    TPU, XLA's generic forms."""
    if platform == "gpu":
        return Backend(past_kernel="pallas")
    if platform != "cpu":
        return Backend()
    built = kernels.load()
    if built is None or jnp.dtype(dtype) != jnp.float32:
        return Backend(XlaCpuForms())
    int8 = built.int8 and os.environ.get(INT8_ENV, "") == "1"
    return Backend(CpuPanels(built.panel, int8), past_kernel=True)


AS_LOADED = Backend()
"""The checkpoint's layout and XLA's attention: what a model is built with unless told otherwise (`use_backend`
moves it onto another backend in place)."""
