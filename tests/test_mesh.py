"""The device mesh (`graph/mesh.py`): every weight and the KV pool name their axes, one rules table shards them,
the fused Q/K/V and gate/up layouts split into whole heads and matching MLP columns, and the compile-cache key
follows the mesh's shape, not which device it is.

Several devices are CPU devices XLA is told to make (`--xla_force_host_platform_device_count`), in a process of
their own: the flag must be set before JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxjax.graph import mesh as meshes
from maxjax.hub import resolve_model
from maxjax.models.backend import Backend, CpuPanels, XlaCpuForms
from maxjax.models.layers import fuse_gate_up, fuse_qkv, split_qkv, use_backend
from maxjax.pipeline import load_model

ARCH = Path(__file__).parent / "fixtures" / "arch"


def test_fused_qkv_groups_each_kv_head_with_its_query_heads() -> None:
    h, k, e = 4, 2, 1
    q = np.arange(h * e)[:, None] + 100.0  # q heads 100..103
    kk = np.arange(k * e)[:, None] + 200.0
    v = np.arange(k * e)[:, None] + 300.0
    fused = fuse_qkv([q, kk, v], k)[:, 0]
    assert fused.tolist() == [100, 101, 200, 300, 102, 103, 201, 301]
    # The projection's output splits back into the heads as the checkpoint had them.
    qs, ks, vs = split_qkv(jax.numpy.asarray(fused), h, k, e)
    assert np.asarray(qs)[:, 0].tolist() == [100, 101, 102, 103]
    assert np.asarray(ks)[:, 0].tolist() == [200, 201] and np.asarray(vs)[:, 0].tolist() == [300, 301]


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_an_even_split_of_gate_up_gives_each_part_matching_columns(parts: int) -> None:
    f = 64
    gate, up = np.arange(f)[:, None] * 1.0, np.arange(f)[:, None] + 1000.0
    for part in np.split(fuse_gate_up(gate, up)[:, 0], parts):
        gates, ups = part[part < 1000], part[part >= 1000] - 1000
        assert len(gates) == len(ups) == f // parts and sorted(gates) == sorted(ups)


def _specs(backend: Backend) -> dict[str, P]:
    loaded = load_model(resolve_model(str(ARCH / "llama")), platform="cpu")
    use_backend(loaded.model, backend)
    state = nnx.split(loaded.model)[1]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    mesh = meshes.make_mesh(jax.devices()[:1])
    return {path: s.spec for path, s in zip(paths, meshes.param_shardings(state, mesh), strict=True)}


@pytest.mark.parametrize("backend", [Backend(XlaCpuForms()), Backend(CpuPanels(16), past_kernel=True)],
                         ids=["out-in", "panels"])
def test_every_weight_is_named_and_heads_and_mlp_columns_go_to_model(backend: Backend) -> None:
    specs = _specs(backend)

    def spec(suffix: str) -> P:
        (found,) = {s for path, s in specs.items() if path.endswith(suffix) and "layers'][0]" in path} or {
            s for path, s in specs.items() if path.endswith(suffix)}
        return found

    assert spec("['qkv']['kernel'].value") == P("model")  # the output axis (panels in the packed form)
    assert spec("['o']['kernel'].value") == P(None, "model")
    assert spec("['gate_up']['kernel'].value") == P("model")
    assert spec("['down']['kernel'].value") == P(None, "model")
    assert spec("['embed']['weight'].value") == P()
    assert spec("['lm_head']['kernel'].value") == P()
    assert spec("['input_norm']['weight'].value") == P()


def test_the_kv_pool_splits_by_kv_head() -> None:
    from maxjax.graph.runner import CacheSpec

    mesh = meshes.make_mesh(jax.devices()[:1])
    k, v = CacheSpec(2, 4, 16, 2, 8).shardings(mesh)
    assert k.spec == P(None, None, "model") and v.spec == P(None, None, "model")


class _MeshShape:
    """What `partition_spec` reads of a mesh: its axis sizes (a 2-device mesh without 2 devices)."""

    shape = {"data": 1, "model": 2}


def test_an_axis_that_does_not_split_evenly_is_a_clear_error() -> None:
    mesh: Any = _MeshShape()
    assert meshes.partition_spec(("heads", "embed"), (4, 3), mesh) == P("model")
    with pytest.raises(ValueError, match="'heads' axis \\(3\\) does not split evenly"):
        meshes.partition_spec(("heads", "embed"), (3, 4), mesh, what="w")


SEVERAL_DEVICES = r"""
import jax, numpy as np, jax.numpy as jnp
from flax import nnx
from maxjax.graph import mesh as meshes
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.hub import resolve_model
from maxjax.models.backend import Backend, XlaCpuForms
from maxjax.pipeline import load_model

d = jax.devices()
assert len(d) == 4, d
loaded = load_model(resolve_model(ARCH), platform="cpu")
cfg = loaded.config
grid = BucketGrid(max_batch_size=2, prefill_chunk=16, max_pages=2, page_size=16)
spec = CacheSpec(cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim, loaded.dtype)
backend = Backend(XlaCpuForms())

def runner(mesh):
    return ModelRunner(nnx.clone(loaded.model), spec, grid, backend=backend, mesh=mesh)

def key(mesh):
    return runner(mesh)._key(("step", (1, 1, 2)))[0]

one, other = meshes.make_mesh(d[:1]), meshes.make_mesh(d[1:2])
tp, dp = meshes.make_mesh(d[:2]), meshes.make_mesh(d[:2], (2, 1))
assert key(one) == key(other), "the key must not depend on which device"
assert len({key(one), key(tp), key(dp)}) == 3, "the key must change with the mesh's shape"

# Tensor parallel over 2 devices computes what one device does: each device holds whole KV heads and matching
# gate/up columns.
def forward(mesh):
    r = runner(mesh)
    model = nnx.merge(r.graphdef, r.state)
    qkv = model.layers[0].qkv.kernel[...]
    rows = {s.data.shape[0] for s in qkv.addressable_shards}
    assert rows == {qkv.shape[0] // mesh.shape["model"]}, rows
    tokens = jnp.asarray([[5, 17, 42, 99, 3, 250, 7, 1]], jnp.int32)
    f = jax.jit(lambda m, c: m.forward(tokens, c, jnp.zeros((1, 0), jnp.int32), jnp.zeros((1,), jnp.int32)))
    hidden, k, v = f(model, r.cache)
    return np.asarray(hidden), np.asarray(k), np.asarray(v), qkv.sharding.spec

h1, k1, v1, _ = forward(one)
h2, k2, v2, qkv_spec = forward(tp)
assert str(qkv_spec) == str(jax.sharding.PartitionSpec("model")), qkv_spec
np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(k2, k1, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_on_several_devices_the_key_follows_the_mesh_shape_and_tensor_parallel_agrees() -> None:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"),
               JAX_PLATFORMS="cpu")
    code = SEVERAL_DEVICES.replace("ARCH", repr(str(ARCH / "llama")))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
