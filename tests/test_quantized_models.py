"""GGUF models served in their own encoding: each projection and embedding table the device multiplies in its
blocks stays in them (`pipeline.build_model`, `models/backend.py`'s `GGUFBlocks` and `CpuQuantPanels`), and the
logits equal those of the same file dequantized at load.

The tiny Llama checkpoint (tests/fixtures/arch/) is written as Q8_0, Q4_0 and Q4_1, every other GGUF family's as
Q4_1 (their adapters move rows differently: fused tensors split, norms shifted), and each file runs through
the paged cache as it would be served: dequantized at load to float32 (`--quantization-encoding float32`, the
reference), in the CPU kernel's repacked panels (the default on CPU), and, for each encoding, in XLA's
dequantize-beside-the-matmul form (what GPU and TPU run, here on the CPU backend). Q8_0 against transformers' own
GGUF loader, for every family, is in test_architectures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from maxjax import kernels
from maxjax.hub import resolve_model
from maxjax.models.backend import Backend, CpuPanels, CpuQuantPanels, GGUFBlocks, backend_for
from maxjax.models.layers import Embedding, Linear
from maxjax.pipeline import LoadedModel, load_model
from maxjax.weights.quantized import QuantizedRows
from tests.gguf_writer import Q, write_gguf
from tests.test_architectures import FIXTURES, GGUF_FAMILIES, TOLERANCE, paged_logits, reference

KINDS = ("Q8_0", "Q4_0", "Q4_1")
CASES = [("llama", kind) for kind in KINDS] + [(family, "Q4_1") for family in GGUF_FAMILIES if family != "llama"]


def holders(loaded: LoadedModel) -> list[Linear | Embedding]:
    from flax import nnx

    return [node for _, node in nnx.iter_graph(loaded.model) if isinstance(node, Linear | Embedding)]


def logits(path: Path, backend: Backend | None, encoding: str | None = None) -> tuple[np.ndarray, LoadedModel]:
    loaded = load_model(resolve_model(str(path), quantization_encoding=encoding), platform="cpu")
    record, arrays = reference(_family(path))
    return paged_logits(loaded, arrays["tokens"], record["prefill_chunks"], backend), loaded


def _family(path: Path) -> str:
    """`written`'s file names: {family}-{kind}.gguf."""
    return path.stem.rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    files = {}
    for family, kind in CASES:
        config = json.loads((FIXTURES / family / "config.json").read_text())
        weights = safetensors.numpy.load_file(str(FIXTURES / family / "model.safetensors"))
        path = tmp_path_factory.mktemp(kind) / f"{family}-{kind}.gguf"
        write_gguf(path, reference(family)[0]["gguf"]["architecture"], config, weights, Q[kind], name=f"tiny-{family}")
        files[(family, kind)] = path
    return files


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_quantized_kernel_and_xla_forms_match_dequantized_at_load(
    written: dict[tuple[str, str], Path], family: str, kind: str
) -> None:
    built = kernels.load()
    assert built is not None, "the test machine has a C++ compiler: the kernels must build"
    path = written[(family, kind)]
    want, dense = logits(path, None, "float32")
    assert not any(isinstance(h.layout, GGUFBlocks | CpuQuantPanels) for h in holders(dense))

    got, quantized = logits(path, None)
    layouts = {h.layout for h in holders(quantized)}
    assert layouts == {CpuQuantPanels(kind.lower(), built.panel)}, layouts  # every matrix, the table too
    err = np.abs(got - want).max()
    print(f"{family} {kind}: kernel {err:.2e} from dequantized at load")
    assert err <= TOLERANCE
    if family == "llama":
        xla, in_blocks = logits(path, Backend())
        assert {h.layout for h in holders(in_blocks)} == {GGUFBlocks(kind.lower())}
        xla_err = np.abs(xla - want).max()
        print(f"{family} {kind}: XLA form {xla_err:.2e} from dequantized at load")
        assert xla_err <= TOLERANCE
    # and the encoding matters: the reference checkpoint's float32 logits are far from these
    assert np.abs(want - reference(family)[1]["logits"]).max() > 10 * TOLERANCE


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_int8_activations_stay_near_float_ones(written: dict[tuple[str, str], Path], kind: str) -> None:
    """`MAXJAX_INT8_ACTIVATIONS=1` (`CpuPanels.int8`): each product is exact to x rounded to int8 per block
    (test_qkernels.py); through the whole model the logits move by a few percent of their spread (measured: 6%
    on this checkpoint, 3-6% on Qwen3's and Gemma 3's), while a wrong layout moves them by all of it. Bound: 10%
    of the spread, and the same argmax at every position."""
    built = kernels.load()
    assert built is not None
    if not built.int8:
        pytest.skip("this build has no int8 path (AVX2 or AVX-512 only)")
    path = written[("llama", kind)]
    want, _ = logits(path, Backend(CpuPanels(built.panel), past_kernel=True))
    got, loaded = logits(path, Backend(CpuPanels(built.panel, int8=True), past_kernel=True))
    assert {h.layout for h in holders(loaded)} == {CpuQuantPanels(kind.lower(), built.panel, int8=True)}
    err = np.abs(got - want).max()
    print(f"llama {kind}: int8 activations move the logits by {err:.3f} (spread {want.std():.2f})")
    assert 0 < err <= 0.1 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_float_checkpoint_quantized_at_load_equals_the_gguf(written: dict[tuple[str, str], Path], kind: str) -> None:
    """`--quantization-encoding q8_0` on a float checkpoint: the blocks llama.cpp's quantizer writes into a GGUF
    of the same weights, served the same way."""
    record, arrays = reference("llama")
    loaded = load_model(resolve_model(str(FIXTURES / "llama"), quantization_encoding=kind.lower()), platform="cpu")
    assert {h.layout for h in holders(loaded)} == {GGUFBlocks(kind.lower())}
    got = paged_logits(loaded, arrays["tokens"], record["prefill_chunks"])
    want, _ = logits(written[("llama", kind)], None)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got - arrays["logits"]).max() > 10 * TOLERANCE  # quantized: not the float checkpoint's logits


def test_in_blocks_are_the_kernels_kinds() -> None:
    from maxjax.kernels import quant
    from maxjax.weights import encodings

    assert tuple(quant.KINDS) == encodings.IN_BLOCKS
    assert set(encodings.QUANTIZE_AT_LOAD) <= set(encodings.IN_BLOCKS)


def test_k_quants_run_in_their_blocks(tmp_path: Path) -> None:
    """A file mixed as Q4_K_M files are (a random Llama 256 wide, since K-quants take rows of whole 256-weight
    super-blocks: Q4_K, with V and the MLP's down projection in Q6_K) keeps each tensor in its own blocks, the
    embedding table too, in the kernel's panels and in XLA's form, and both give the logits of the file
    dequantized at load. Q/K/V, fused from Q4_K and Q6_K rows, is the one matrix of two encodings: it is
    dequantized at load."""
    built = kernels.load()
    assert built is not None
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=512, head_dim=64)
    rng = np.random.default_rng(4)
    shapes = {"model.embed_tokens.weight": (260, 256), "lm_head.weight": (260, 256), "model.norm.weight": (256,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (256,), p + "post_attention_layernorm.weight": (256,),
                   p + "self_attn.q_proj.weight": (256, 256), p + "self_attn.k_proj.weight": (128, 256),
                   p + "self_attn.v_proj.weight": (128, 256), p + "self_attn.o_proj.weight": (256, 256),
                   p + "mlp.gate_proj.weight": (512, 256), p + "mlp.up_proj.weight": (512, 256),
                   p + "mlp.down_proj.weight": (256, 512)}
    weights = {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
                      0.08 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    path = tmp_path / "llama-q4_k.gguf"
    write_gguf(path, "llama", config, weights, Q["Q4_K"], name="tiny-q4k", q6_k=("v_proj.weight", "down_proj.weight"))
    tokens = rng.integers(3, 260, 40)
    runs = {}
    for name, backend, encoding in [("dense", None, "float32"), ("kernel", None, None), ("xla", Backend(), None)]:
        loaded = load_model(resolve_model(str(path), quantization_encoding=encoding), platform="cpu")
        runs[name] = paged_logits(loaded, tokens, [17], backend)
        layouts = {h.layout for h in holders(loaded)}
        if name == "kernel":
            assert layouts == {CpuQuantPanels("q4_k", built.panel), CpuQuantPanels("q6_k", built.panel),
                               CpuPanels(built.panel)}, layouts
        elif name == "xla":
            assert GGUFBlocks("q4_k") in layouts and GGUFBlocks("q6_k") in layouts, layouts
    for name in ("kernel", "xla"):
        err = np.abs(runs[name] - runs["dense"]).max()
        print(f"Q4_K + Q6_K, {name}: {err:.2e} from dequantized at load (spread {runs['dense'].std():.2f})")
        assert err <= TOLERANCE


def test_rows_move_in_their_blocks() -> None:
    """The adapters' row moves (Q/K un-permute, Q/K/V and gate/up fusion, a fused tensor's split) keep the
    blocks; anything else sees the tensor dequantized, so it is never wrong."""
    from maxjax.models.layers import fuse_gate_up, fuse_qkv
    from maxjax.models.llama import unpermute_qk
    from tests.test_qkernels import random_blocks

    def rows(kind: str, out: int, seed: int) -> QuantizedRows:
        return QuantizedRows(int(Q[kind.upper()]), random_blocks(kind, out, 64, seed), 64)

    q, k, v = rows("q4_1", 64, 1), rows("q4_1", 32, 2), rows("q4_1", 32, 3)
    dense = [t.dequantized() for t in (q, k, v)]
    fused = fuse_qkv([unpermute_qk(q, 4), unpermute_qk(k, 2), v], 2)
    assert isinstance(fused, QuantizedRows) and fused.shape == (128, 64)
    np.testing.assert_array_equal(fused.dequantized(),
                                  fuse_qkv([unpermute_qk(dense[0], 4), unpermute_qk(dense[1], 2), dense[2]], 2))
    gate_up = fuse_gate_up(k, v)
    assert isinstance(gate_up, QuantizedRows)
    np.testing.assert_array_equal(gate_up.dequantized(), fuse_gate_up(dense[1], dense[2]))
    top, bottom = np.split(q, [16])
    assert isinstance(top, QuantizedRows) and top.shape == (16, 64) and bottom.shape == (48, 64)

    mixed = np.concatenate([k, rows("q8_0", 32, 4)])  # two encodings: float rows
    assert isinstance(mixed, np.ndarray) and mixed.shape == (64, 64)
    shifted = q - 1
    assert isinstance(shifted, np.ndarray)
    np.testing.assert_array_equal(shifted, dense[0] - 1)
    across = q.reshape(64, 2, 32)  # splits a row: no longer whole blocks
    assert isinstance(across, np.ndarray)
    np.testing.assert_array_equal(across, dense[0].reshape(64, 2, 32))


def test_smollm2_serves_in_its_own_encoding(smollm2_gguf: Path) -> None:
    """The default model on CPU: Q4_1 projections and the Q8_0 tied table stay in their blocks, about a fifth
    of the float32 bytes."""
    from maxjax.models.layers import use_backend

    built = kernels.load()
    assert built is not None
    loaded = load_model(resolve_model(str(smollm2_gguf)), platform="cpu")
    loaded_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded.model))
    use_backend(loaded.model, backend_for("cpu", loaded.dtype))
    layouts = {h.layout for h in holders(loaded)}
    assert layouts == {CpuQuantPanels("q4_1", built.panel), CpuQuantPanels("q8_0", built.panel)}
    served = sum(x.nbytes for x in jax.tree.leaves(loaded.model))
    print(f"SmolLM2 weights: {loaded_bytes / 2**20:.0f} MiB as loaded, {served / 2**20:.0f} MiB repacked")
    assert served < 130 * 2**20  # float32: 538 MB
