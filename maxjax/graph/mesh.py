"""Where each array of a step lives: the device mesh, the logical axis names weights and the KV pool carry, and one
rules table from those names to the mesh's axes.

Every weight names its axes once, where it is born (`models/layers.py`: `Linear(..., axes=("heads", "embed"))`;
its `nnx.Param` holds them as `out_sharding` metadata, in the shape of its layout: a `CpuPanels` kernel
[ceil(out / P), in, P] splits on its panels). `RULES` maps those names onto the mesh: tensor parallel, so query
heads, KV heads and MLP columns go to "model" and everything else is replicated. The runner derives each array's
`NamedSharding` from the two (`sharding`), jits the step with them as its input and output shardings, and
creates the KV pool with its own. By default the mesh is one device ((1, 1)); `--devices cpu:0,1` or `gpu:0,1,2,3`
puts every device on "model" (`make_mesh`), and `rules_for` adapts the rules to the model: KV heads that do not
split evenly over the devices are replicated. The step's batch arrays are replicated.

The fused projections are laid out so that an even split of their output axis keeps whole heads and matching
MLP columns together (`models/layers.fuse_qkv`, `fuse_gate_up`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES = ("data", "model")
"""The mesh's axes: "data" (batch rows; unused while the batch is replicated) and "model" (tensor parallel)."""

Rules = tuple[tuple[str, str | None], ...]

RULES: Rules = (
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", None),
    ("embed", None),
    ("head_dim", None),
    ("layers", None),
    ("pages", None),
    ("page", None),
)
"""Logical axis name -> mesh axis (None: replicated). A name not listed here is replicated too."""

LogicalAxes = tuple[str | None, ...]


def rules_for(mesh: Mesh, num_kv_heads: int, rules: Rules = RULES) -> Rules:
    """`rules` for a model with `num_kv_heads` KV heads on `mesh`. Where they do not split evenly over the "model"
    axis (fewer KV heads than devices, or not a multiple of them), "kv_heads" is replicated: every device
    projects Q/K/V, attends over all heads and holds the whole KV pool; the output projection and the MLP still
    split (a device takes its slice of the replicated attention output)."""
    table = dict(rules)
    mesh_axis = table.get("kv_heads")
    if mesh_axis is None or num_kv_heads % mesh.shape[mesh_axis] == 0:
        return rules
    log.info("tensor parallel over %d devices: the model's %d KV heads do not split evenly over them, so Q/K/V, "
             "attention and the KV pool are replicated on every device; the output projection and the MLP split",
             mesh.shape[mesh_axis], num_kv_heads)
    return tuple((name, None if name == "kv_heads" else axis) for name, axis in rules)


def make_mesh(devices: Sequence[jax.Device], shape: tuple[int, int] | None = None) -> Mesh:
    """A mesh over `devices` with `AXES`; by default all of them on "model" (tensor parallel)."""
    shape = shape or (1, len(devices))
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"a mesh of shape {shape} needs {int(np.prod(shape))} devices, not {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def partition_spec(axes: LogicalAxes | None, shape: tuple[int, ...], mesh: Mesh,
                   rules: Rules = RULES, *, what: str = "an array") -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` whose axes are named `axes` (None: replicated)."""
    if axes is None:
        return PartitionSpec()
    assert len(axes) == len(shape), f"{what}: {len(axes)} axis names {axes} for shape {shape}"
    table = dict(rules)
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = table.get(name) if name is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            raise ValueError(f"{what}: its {name!r} axis ({size}) does not split evenly over the mesh's "
                             f"{mesh_axis!r} axis ({mesh.shape[mesh_axis]} devices): use a mesh whose "
                             f"{mesh_axis!r} size divides it")
        spec.append(mesh_axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def sharding(axes: LogicalAxes | None, shape: tuple[int, ...], mesh: Mesh, rules: Rules = RULES,
             *, what: str = "an array") -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules, what=what))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = RULES) -> list[NamedSharding]:
    """One sharding per leaf of `state`, in `jax.tree.leaves(state)` order, from each Variable's logical axes
    (`out_sharding` metadata; a weight without them is replicated)."""
    out = []
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = var.get_metadata("out_sharding", None) if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        out.append(sharding(axes, tuple(value.shape), mesh, rules, what=jax.tree_util.keystr(path)))
    return out


def describe(mesh: Mesh) -> dict[str, Any]:
    """What a compiled executable depends on in the mesh: its axes and their sizes (not which devices: an
    executable runs on any devices of the same kind in the same arrangement)."""
    return {"axes": list(mesh.axis_names), "shape": [int(mesh.shape[name]) for name in mesh.axis_names],
            "device_kind": mesh.devices.flat[0].device_kind}
