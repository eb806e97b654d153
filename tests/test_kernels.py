"""The CPU kernels (maxjax/kernels): built with the machine's compiler; packed projections with exact sums,
attention read from the pool as XLA's gathered blocks compute it, and XLA's forms when they cannot be built."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxjax import kernels
from maxjax.models.backend import CpuPanels
from maxjax.models.layers import AttentionBatch, Embedding, KVCache, Linear, paged_attention


@pytest.fixture(scope="module")
def built() -> kernels.Kernels:
    k = kernels.load()
    assert k is not None, "the test machine has a C++ compiler: the kernel must build"
    return k


def test_pack_layout() -> None:
    w = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # [out 7, in 3]
    packed = kernels.pack(w, 4)
    assert packed.shape == (2, 3, 4)
    for o in range(8):
        for i in range(3):
            assert packed[o // 4, i, o % 4] == (w[o, i] if o < 7 else 0.0)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 32, 70])
@pytest.mark.parametrize(("d_out", "d_in"), [(960, 576), (7, 13), (33, 1536)])
def test_projection_matches_float64(built: kernels.Kernels, rows: int, d_out: int, d_in: int) -> None:
    rng = np.random.default_rng(rows * 1000 + d_out)
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    y = np.asarray(jax.jit(kernels.project, static_argnums=2)(x, kernels.pack(w, built.panel), d_out))
    assert y.shape == (rows, d_out)
    # float32 sums of d_in products: error grows like sqrt(d_in) * eps * |terms|
    assert np.abs(y - expected).max() <= 1e-5 * np.sqrt(d_in) * np.abs(x).max() * np.abs(w).max() * 4


def test_leading_axes_and_linear(built: kernels.Kernels) -> None:
    """A [B, T, in] input (prefill) through a packed `Linear` with bias equals the unpacked one."""
    layer = Linear(24, 40, bias=True)
    rng = np.random.default_rng(0)
    layer.kernel.set_value(jnp.asarray(rng.standard_normal((40, 24)), jnp.float32))
    layer.bias.set_value(jnp.asarray(rng.standard_normal(40), jnp.float32))  # type: ignore[union-attr]
    x = jnp.asarray(rng.standard_normal((3, 5, 24)), jnp.float32)
    expected = np.asarray(layer(x))
    layer.use_layout(CpuPanels(built.panel))
    packed = layer.kernel[...]
    assert packed.shape == (-(-40 // built.panel), 24, built.panel)
    layer.use_layout(CpuPanels(built.panel))
    assert layer.kernel[...] is packed  # already packed: left alone
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)), expected, rtol=1e-5, atol=1e-5)


def test_packed_embedding_looks_up_and_attends_as_the_table(built: kernels.Kernels) -> None:
    """A packed `Embedding` (a vocabulary that is not a multiple of the panel) gives the same rows, the same tied
    head, and holds no second copy of the table."""
    vocab, dim = 3 * built.panel + 5, 24
    embed = Embedding(vocab, dim)
    rng = np.random.default_rng(1)
    embed.weight.set_value(jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32))
    tokens = jnp.asarray([[0, vocab - 1, built.panel], [7, built.panel - 1, 3 * built.panel]], jnp.int32)
    hidden = jnp.asarray(rng.standard_normal((2, 3, dim)), jnp.float32)
    rows, logits = np.asarray(embed(tokens)), np.asarray(embed.attend(hidden))
    embed.use_layout(CpuPanels(built.panel))
    assert embed.weight[...].shape == (4, dim, built.panel)
    packed_rows, packed_logits = nnx.jit(lambda m, t, h: (m(t), m.attend(h)))(embed, tokens, hidden)
    np.testing.assert_array_equal(np.asarray(packed_rows), rows)
    assert packed_logits.shape == (2, 3, vocab)
    np.testing.assert_allclose(np.asarray(packed_logits), logits, rtol=1e-5, atol=1e-5)


def test_graph_calls_the_kernel(built: kernels.Kernels) -> None:
    layer = Linear(16, 32, layout=CpuPanels(built.panel))
    text = nnx.jit(lambda m, x: m(x)).lower(layer, jnp.ones((8, 16))).as_text()
    assert kernels.TARGET in text


def test_no_compiler_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    """A failed build is one warning and None (the models keep XLA's forms), never an error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="maxjax.kernels"):
        assert kernels.load() is None
        assert kernels.load() is None  # decided once per cache directory
    warnings = [r for r in caplog.records if "kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "/bin/false" in warnings[0].getMessage()
    assert not list((tmp_path / "maxjax" / "kernels").glob("*.so"))


@pytest.mark.parametrize(("t", "window", "softcap", "page", "e"), [
    (1, None, None, 8, 16), (1, 20, None, 8, 16), (4, None, 30.0, 8, 16), (3, 7, None, 8, 16),
    (24, None, None, 16, 64), (17, 40, None, 16, 64), (1, None, None, 32, 64), (40, 100, 20.0, 16, 32),
    (5, None, None, 4, 16), (2, 9, None, 16, 12), (130, None, None, 16, 64), (150, 50, None, 32, 64),
])
def test_paged_attention_kernel_matches_xla(built: kernels.Kernels, t: int, window: int | None,
                                             softcap: float | None, page: int, e: int) -> None:
    """The CPU kernels give the attention XLA's gathered blocks give: GQA, rows with pasts of 0 to 300 tokens
    (several pages, a partial last one), windows and softcaps; several query tiles of a row (24 new tokens x 3
    heads: more than one on every instruction set) and several blocks of new keys (130, 150: not a whole
    number of vectors); `maxjax_paged_attention` where page size and head width are multiples of 16, else
    the graph's new-token part and `maxjax_paged_past` (its blocked form, or its scalar one where they are not
    whole vectors: page size 4, head width 12)."""
    rng = np.random.default_rng(t * 100 + (window or 0) + page)
    layers, k_heads, g = 2, 2, 3
    past = np.array([0, 5, 8, 131, 300], np.int32)
    pages = 1 + int(sum(-(-(n + t) // page) for n in past))
    b, width = len(past), -(-(300 + t) // page) + 2
    table = np.zeros((b, width), np.int32)
    free = iter(rng.permutation(np.arange(1, pages)))
    for row, n in enumerate(past):
        for j in range(-(-(n + t) // page)):
            table[row, j] = next(free)
    cache = KVCache(jnp.asarray(rng.standard_normal((layers, pages, k_heads, e, page)), jnp.float32),
                    jnp.asarray(rng.standard_normal((layers, pages, k_heads, page, e)), jnp.float32))
    q = jnp.asarray(rng.standard_normal((b, t, k_heads * g, e)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((b, t, k_heads, e)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((b, t, k_heads, e)), jnp.float32)
    zeros = jnp.zeros((b, t, e // 2), jnp.float32)
    batch = AttentionBatch(jnp.asarray(table), jnp.asarray(past), zeros, zeros)

    def attend(cpu_kernels: bool) -> np.ndarray:
        def f(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: KVCache, batch: AttentionBatch) -> jax.Array:
            return paged_attention(q, k_new, v_new, cache, 1, batch, scale=0.3, sliding_window=window,
                                   softcap=softcap, past_kernel=cpu_kernels)
        lowered = jax.jit(f).lower(q, k_new, v_new, cache, batch)
        whole = page % kernels.WHOLE_VECTORS == 0 and e % kernels.WHOLE_VECTORS == 0
        assert (kernels.ATTENTION_TARGET in lowered.as_text()) == (cpu_kernels and whole)
        assert (kernels.PAST_TARGET in lowered.as_text()) == (cpu_kernels and not whole)
        return np.asarray(lowered.compile()(q, k_new, v_new, cache, batch))

    np.testing.assert_allclose(attend(True), attend(False), rtol=2e-5, atol=2e-5)


def test_unwritable_cache_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "maxjax").write_text("a file where the cache directory should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.load() is None


def test_loading_keeps_the_newest_builds_and_deletes_older_ones(
    built: kernels.Kernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each source, jaxlib or compiler change leaves a build behind: loading keeps the `KEEP_BUILDS` most recently
    used (the loaded one first) and deletes the rest."""
    directory = tmp_path / "maxjax" / "kernels"
    directory.mkdir(parents=True)
    shutil.copy(built.path, directory / built.path.name)  # this build, already there: nothing compiles
    os.utime(directory / built.path.name, (1000, 1000))  # and the oldest file of all until it is loaded
    stale = [directory / f"maxjax-kernels-{i:020d}.so" for i in range(6)]
    for age, path in enumerate(stale):
        path.write_bytes(b"an old build")
        os.utime(path, (2000 + age, 2000 + age))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    loaded = kernels.load()
    assert loaded is not None and loaded.path == directory / built.path.name
    left = sorted(p.name for p in directory.glob("*.so"))
    assert left == sorted([built.path.name, *(p.name for p in stale[-(kernels.KEEP_BUILDS - 1):])])



def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_reserved_pool_costs_no_memory_until_written(built: kernels.Kernels) -> None:
    from maxjax.graph.runner import CacheSpec

    spec = CacheSpec(num_layers=4, num_pages=4097, page_size=16, num_kv_heads=4, head_dim=64)  # 2 x 256 MiB
    before = _rss_bytes()
    pool = spec.allocate(reserve=True)
    jax.block_until_ready(pool)
    assert pool.k.shape == (4, 4097, 4, 64, 16) and pool.v.shape == (4, 4097, 4, 16, 64)
    assert _rss_bytes() - before < 64 << 20, "a reserved pool must not be filled at allocation"
    write = jax.jit(lambda c: KVCache(c.k.at[1, 7].set(2.0), c.v.at[1, 7].set(3.0)), donate_argnums=0)
    pool = write(pool)
    assert float(pool.k[1, 7, 0, 0, 0]) == 2.0 and float(pool.v[1, 7, 3, 15, 63]) == 3.0
    assert _rss_bytes() - before < 128 << 20, "writing one page must not fill the pool"
