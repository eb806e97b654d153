"""Weight readers: encodings, GGUF (every type gguf-py writes, corrupt files, the real SmolLM2) and safetensors."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from maxjax.errors import UserError
from maxjax.weights import encodings
from maxjax.weights.gguf import GGUFFile, file_encoding, peek_metadata, read_metadata
from maxjax.weights.safetensors import SafetensorsWeights

Q = gguf.GGMLQuantizationType

# --- encodings -----------------------------------------------------------------------------------------------


def test_gguf_file_types_use_max_names_where_max_has_them() -> None:
    assert encodings.from_gguf_file_type(0) == "float32"
    assert encodings.from_gguf_file_type(1) == "float16"
    assert encodings.from_gguf_file_type(32) == "bfloat16"
    assert encodings.from_gguf_file_type(2) == "q4_0"
    assert encodings.from_gguf_file_type(3) == "q4_1"
    assert encodings.from_gguf_file_type(7) == "q8_0"
    assert encodings.from_gguf_file_type(8) == "q5_0"
    assert encodings.from_gguf_file_type(9) == "q5_1"
    assert encodings.from_gguf_file_type(14) == encodings.from_gguf_file_type(15) == "q4_k"
    assert encodings.from_gguf_file_type(16) == encodings.from_gguf_file_type(17) == "q5_k"
    assert encodings.from_gguf_file_type(18) == "q6_k"
    assert encodings.from_gguf_file_type(1024 | 15) == "q4_k"  # llama.cpp's "guessed" flag
    assert encodings.from_gguf_file_type(999) is None


def test_file_type_table_matches_gguf_py() -> None:
    """The hard-coded numbers agree with gguf-py's enums (the table exists so the CLI need not import gguf)."""
    ft = gguf.LlamaFileType
    assert encodings.from_gguf_file_type(ft.MOSTLY_Q4_K_M) == "q4_k"
    assert encodings.from_gguf_file_type(ft.MOSTLY_Q6_K) == "q6_k"
    assert encodings.from_gguf_file_type(ft.MOSTLY_BF16) == "bfloat16"
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        expected = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
            qtype.name, qtype.name.lower()
        )
        assert encodings.from_ggml_type(qtype) == expected


def test_normalize_accepts_aliases_and_rejects_unknown_names() -> None:
    assert encodings.normalize("Q4_K_M") == "q4_k"
    assert encodings.normalize("bf16") == "bfloat16"
    assert encodings.normalize("FP16") == "float16"
    assert encodings.normalize("q8_0") == "q8_0"
    with pytest.raises(UserError, match=r"unknown quantization encoding 'q9_9'.*q4_k"):
        encodings.normalize("q9_9")


def test_infer_encoding_counts_quantized_matrices_only() -> None:
    # SmolLM2's mix: many Q4_1 matrices, one Q8_0 embedding, F32 norms (1-D) -> q4_1.
    tensors = [(Q.Q4_1, 2)] * 5 + [(Q.Q8_0, 2)] + [(Q.F32, 1)] * 20
    assert encodings.infer_gguf_encoding(tensors) == "q4_1"
    assert (
        encodings.infer_gguf_encoding([(Q.F16, 2), (Q.F16, 2), (Q.F32, 1), (Q.F32, 1), (Q.F32, 1)])
        == "float16"
    )
    assert encodings.infer_gguf_encoding([(Q.F32, 1)]) == "float32"


def test_encoding_from_hf_config() -> None:
    assert encodings.from_hf_config({"torch_dtype": "bfloat16"}) == "bfloat16"
    assert encodings.from_hf_config({"dtype": "float16", "torch_dtype": "float32"}) == "float16"
    assert encodings.from_hf_config({"text_config": {"torch_dtype": "torch.bfloat16"}}) == "bfloat16"
    assert (
        encodings.from_hf_config({"quantization_config": {"quant_method": "gptq"}, "dtype": "float16"})
        == "gptq"
    )
    assert encodings.from_hf_config({"dtype": "auto"}) is None
    assert encodings.from_hf_config({}) is None
    assert encodings.from_safetensors_dtypes(["BF16", "BF16", "F32", "I64"]) == "bfloat16"


# --- GGUF: every type gguf-py can write reads back within its quantization error -----------------------------

ROWS, COLS = 6, 256  # non-square so a transposed read cannot pass; 256 = 8 blocks of 32 per row


def _source(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    # rows at different scales, so that a bound that is not per block fails
    x *= np.logspace(-2, 1, ROWS, dtype=np.float32)[:, None]
    x[0, :32] = 0.0  # an all-zero block
    x[1, 32:64] = 3.0  # a constant block
    return x


def _block_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error each element may have after a round trip through `qtype`, from the type's definition."""
    f16 = 2.0**-10  # f16 scales/mins: round-to-nearest relative error (2^-11) with margin
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return np.abs(x) * 2.0**-11
    if qtype == Q.BF16:
        return np.abs(x) * 2.0**-8
    blocks = x.reshape(ROWS, COLS // 32, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    if qtype == Q.Q8_0:  # d = amax/127, round to nearest: half a step, plus the f16 scale's error
        bound = amax / 127 * 0.5 + amax * f16
    elif qtype == Q.Q4_0:  # d = max/-8 over 16 levels: the far end may clip by one whole step
        bound = amax / 8 * (1 + f16)
    elif qtype == Q.Q5_0:  # d = max/-16 over 32 levels: likewise
        bound = amax / 16 * (1 + f16)
    elif qtype in (Q.Q4_1, Q.Q5_1):  # d = (max-min)/(levels-1), offset min: half a step
        levels = 15 if qtype == Q.Q4_1 else 31
        bound = (hi - lo) / levels * 0.5 + (np.abs(lo) + (hi - lo)) * f16
    else:
        raise AssertionError(qtype)
    return np.broadcast_to(bound, blocks.shape).reshape(ROWS, COLS)


WRITABLE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.fixture(scope="module")
def all_types_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from tests.conftest import write_gguf

    x = _source()
    tensors = {f"w.{q.name.lower()}": (x, q) for q in WRITABLE_TYPES}
    tensors["norm.weight"] = (np.linspace(-1, 1, COLS, dtype=np.float32), Q.F32)
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    write_gguf(path, tensors, file_type=gguf.LlamaFileType.MOSTLY_Q4_1, metadata={"general.name": "tiny"})
    return path, x


@pytest.mark.parametrize("qtype", WRITABLE_TYPES, ids=lambda q: q.name)
def test_gguf_round_trip_within_quantization_error(all_types_gguf: tuple[Path, np.ndarray], qtype: Q) -> None:
    path, x = all_types_gguf
    f = GGUFFile(path)
    name = f"w.{qtype.name.lower()}"
    y = f.tensor(name)
    assert y.shape == (ROWS, COLS) and y.dtype == np.float32
    error = np.abs(y - x)
    bound = _block_bound(x, qtype)
    worst = np.unravel_index(np.argmax(error - bound), x.shape)
    assert np.all(error <= bound + 1e-7), (qtype.name, worst, error[worst], bound[worst])
    assert np.all(y[0, :32] == 0.0)  # zero block stays exactly zero
    if qtype != Q.F32:
        assert error.max() > 0  # really quantized, not stored as float32 behind our back
    info = f.tensor_info(name)
    assert info.shape == (ROWS, COLS)
    assert info.ggml_type == qtype
    assert info.encoding == encodings.from_ggml_type(qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert info.n_bytes == ROWS * COLS // block * size


def test_gguf_orientation_is_numpy_order(all_types_gguf: tuple[Path, np.ndarray]) -> None:
    """GGUF stores dims fastest-first ([COLS, ROWS]); we hand back [ROWS, COLS], like the HF checkpoint."""
    path, x = all_types_gguf
    raw = gguf.GGUFReader(path)
    stored = {t.name: t for t in raw.tensors}["w.f32"]
    assert stored.shape.tolist() == [COLS, ROWS]
    np.testing.assert_array_equal(GGUFFile(path).tensor("w.f32"), x)


def test_gguf_metadata_names_and_dtypes(all_types_gguf: tuple[Path, np.ndarray]) -> None:
    path, x = all_types_gguf
    f = GGUFFile(path)
    assert f.architecture == "llama"
    assert f.file_type == gguf.LlamaFileType.MOSTLY_Q4_1 and f.encoding == "q4_1"
    assert f.metadata["general.name"] == "tiny"
    assert f.metadata == read_metadata(path)
    assert not any(k.startswith("GGUF.") for k in f.metadata)
    assert f.tensor_names == [*(f"w.{q.name.lower()}" for q in WRITABLE_TYPES), "norm.weight"]
    assert f.tensor("norm.weight").shape == (COLS,)
    # dtype=None keeps float storage as it is; other dtypes convert.
    assert f.tensor("w.f16", dtype=None).dtype == np.float16
    assert f.tensor("w.bf16", dtype=None).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(f.tensor("w.bf16", dtype=None).astype(np.float32), f.tensor("w.bf16"))
    assert f.tensor("w.q4_0", dtype=ml_dtypes.bfloat16).dtype == ml_dtypes.bfloat16
    # packed bytes for in-graph dequantization: whole 18-byte Q4_0 blocks per row
    assert f.raw("w.q4_0").shape == (ROWS, COLS // 32 * 18) and f.raw("w.q4_0").dtype == np.uint8
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        f.tensor("missing")
    assert peek_metadata(path, ["general.file_type", "general.name", "absent"]) == {
        "general.file_type": 3,
        "general.name": "tiny",
    }


def test_gguf_encoding_comes_from_the_file_not_its_name(
    tmp_path: Path, make_gguf: Callable[..., Path]
) -> None:
    x = _source()
    path = make_gguf(
        tmp_path / "model-Q8_0.gguf", {"w": (x, Q.Q4_0)}, file_type=gguf.LlamaFileType.MOSTLY_Q4_0
    )
    assert GGUFFile(path).encoding == "q4_0" == file_encoding(path)


def test_gguf_without_file_type_infers_from_tensor_types(
    tmp_path: Path, make_gguf: Callable[..., Path]
) -> None:
    x = _source()
    tensors = {
        "a": (x, Q.Q5_1),
        "b": (x, Q.Q5_1),
        "embed": (x, Q.Q8_0),
        "n1": (x[0], Q.F32),
        "n2": (x[1], Q.F32),
        "n3": (x[2], Q.F32),
    }
    path = make_gguf(tmp_path / "nofiletype.gguf", tensors)
    f = GGUFFile(path)
    assert f.file_type is None
    assert f.encoding == "q5_1" == file_encoding(path)


# --- GGUF: K-quants (gguf-py reads but cannot write them): hand-packed blocks against the format's definition ---

QK_K = 256


def _k_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random K-quant blocks as bytes, and the values they encode, decoded here from the layout in ggml
    (every sub-block gets scale 2 and min 4, with d = 0.5 and dmin = 0.25, so a value is q - 1 for Q4_K/Q5_K)."""
    half = np.float16
    if qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] (int8) d (f16); value = d * scale * (6-bit q - 32)
        ql = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
        qh = rng.integers(0, 256, (n_blocks, 64), dtype=np.uint8)
        scales = rng.integers(-8, 8, (n_blocks, 16)).astype(np.int8)
        d = np.full((n_blocks, 1), 0.5, half)
        raw = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8)], axis=1)
        values = np.empty((n_blocks, QK_K), np.float32)
        for h in range(2):  # two halves of 128 values
            lq, hq = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
            quads = [
                (lq[:, :32] & 0xF) | ((hq >> 0) & 3) << 4,
                (lq[:, 32:] & 0xF) | ((hq >> 2) & 3) << 4,
                (lq[:, :32] >> 4) | ((hq >> 4) & 3) << 4,
                (lq[:, 32:] >> 4) | ((hq >> 6) & 3) << 4,
            ]
            for k, q in enumerate(quads):
                for half_of_32 in range(2):  # a scale per 16 values
                    cols = slice(16 * half_of_32, 16 * half_of_32 + 16)
                    scale = scales[:, 8 * h + 2 * k + half_of_32 : 8 * h + 2 * k + half_of_32 + 1].astype(
                        np.float32
                    )
                    out = slice(128 * h + 32 * k + 16 * half_of_32, 128 * h + 32 * k + 16 * half_of_32 + 16)
                    values[:, out] = 0.5 * scale * (q[:, cols].astype(np.float32) - 32)
        return raw, values
    # Q4_K / Q5_K: d, dmin (f16), 12 bytes of 6-bit scales and mins, [qh[32] for Q5_K], qs[128]
    d = np.full((n_blocks, 1), 0.5, half).view(np.uint8)
    dmin = np.full((n_blocks, 1), 0.25, half).view(np.uint8)
    packed = np.array([2] * 4 + [4] * 4 + [2 | 4 << 4] * 4, np.uint8)  # scale 2, min 4 for all 8 sub-blocks
    scales = np.broadcast_to(packed, (n_blocks, 12))
    qs = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
    qh = (
        rng.integers(0, 256, (n_blocks, 32), dtype=np.uint8)
        if qtype == Q.Q5_K
        else np.zeros((n_blocks, 32), np.uint8)
    )
    values = np.empty((n_blocks, QK_K), np.float32)
    for c in range(4):  # 64 values per 32 bytes of qs: low nibbles first, then high nibbles
        chunk = qs[:, 32 * c : 32 * c + 32]
        low = (chunk & 0xF) + ((qh >> (2 * c)) & 1) * 16
        high = (chunk >> 4) + ((qh >> (2 * c + 1)) & 1) * 16
        values[:, 64 * c : 64 * c + 32] = 0.5 * 2 * low - 0.25 * 4
        values[:, 64 * c + 32 : 64 * c + 64] = 0.5 * 2 * high - 0.25 * 4
    parts: list[np.ndarray] = [d, dmin, scales, *([qh] if qtype == Q.Q5_K else []), qs]
    return np.concatenate(parts, axis=1), values


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_decode_by_the_format(tmp_path: Path, qtype: Q) -> None:
    rows, cols = 3, 2 * QK_K
    raw, values = _k_blocks(qtype, rows * cols // QK_K, np.random.default_rng(7))
    assert raw.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("w", raw.reshape(rows, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(tmp_path / "k.gguf")
    assert f.tensor_info("w").shape == (rows, cols)
    assert f.encoding == encodings.from_ggml_type(qtype)  # no file type: inferred from the one matrix
    np.testing.assert_array_equal(f.tensor("w"), values.reshape(rows, cols))


# --- GGUF: corrupt files fail with one clear line --------------------------------------------------------------


@pytest.fixture
def small_gguf(tmp_path: Path, make_gguf: Callable[..., Path]) -> Path:
    x = _source()
    return make_gguf(
        tmp_path / "small.gguf",
        {"a": (x, Q.Q8_0), "b": (x, Q.F16)},
        file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
        metadata={"general.name": "small"},
    )


def _expect_user_error(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        GGUFFile(path).metadata  # noqa: B018 -- metadata conversion is part of reading the file
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_gguf_bad_magic(small_gguf: Path) -> None:
    data = bytearray(small_gguf.read_bytes())
    data[:4] = b"GGML"
    small_gguf.write_bytes(bytes(data))
    _expect_user_error(small_gguf, "not a GGUF file")
    with pytest.raises(UserError, match="not a GGUF file"):
        file_encoding(small_gguf)


def test_gguf_empty_and_tiny_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_user_error(empty, "not a GGUF file")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF\x03\x00")
    _expect_user_error(tiny, "truncated")


@pytest.mark.parametrize("keep", [30, 100, 300])
def test_gguf_truncated_header(small_gguf: Path, keep: int) -> None:
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data[:keep])
    _expect_user_error(small_gguf, "truncated")
    if keep < data.index(b"general.name") + 20:  # cut inside the metadata, which is all peek_metadata reads
        with pytest.raises(UserError, match="truncated or corrupt"):
            peek_metadata(small_gguf, ["nothing-matches-so-it-reads-everything"])


def test_gguf_truncated_tensor_data(small_gguf: Path) -> None:
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data[:-100])
    message = _expect_user_error(small_gguf, "tensor 'b' ends at byte")
    assert "fetch the file again" in message


def test_gguf_tensor_offset_past_end(small_gguf: Path) -> None:
    raw = gguf.GGUFReader(small_gguf)
    field = raw.tensors[0].field  # tensor info: name, n_dims, dims, type, then the u64 data offset
    offset_at = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
    del raw
    data = bytearray(small_gguf.read_bytes())
    data[offset_at : offset_at + 8] = struct.pack("<Q", 1 << 40)
    small_gguf.write_bytes(bytes(data))
    _expect_user_error(small_gguf, "tensor 'a' ends at byte")


def test_gguf_bogus_array_length_is_truncation_not_a_hang(
    tmp_path: Path, make_gguf: Callable[..., Path]
) -> None:
    path = make_gguf(tmp_path / "arr.gguf", {"w": (_source(), Q.F32)}, metadata={"tokens": [1, 2, 3]})
    data = bytearray(path.read_bytes())
    at = data.index(b"tokens") + len(b"tokens") + 4 + 4  # key, value type (array), item type, then the count
    assert struct.unpack_from("<Q", data, at)[0] == 3
    data[at : at + 8] = struct.pack("<Q", 1 << 60)
    path.write_bytes(bytes(data))
    _expect_user_error(path, "truncated")


def test_gguf_unreadable_metadata(small_gguf: Path) -> None:
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data.replace(b"small", b"\xff\xfe\xfd\xfc\xfb", 1))
    _expect_user_error(small_gguf, "metadata key 'general.name' is unreadable")


# --- GGUF: the real default model -------------------------------------------------------------------------------


def _dequantize_q4_1_by_hand(raw: np.ndarray) -> np.ndarray:
    """Q4_1 from its definition in ggml: per 32 values, f16 scale d, f16 min m, then 16 bytes whose low nibbles
    are values 0..15 and high nibbles values 16..31; value = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 4:]
    nibbles = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
    return (d * nibbles + m).reshape(raw.shape[0], -1)


def test_smollm2_gguf(smollm2_gguf: Path) -> None:
    f = GGUFFile(smollm2_gguf)
    assert f.architecture == "llama"
    assert f.encoding == "q4_1" == file_encoding(smollm2_gguf)
    types = {f.tensor_info(n).encoding for n in f.tensor_names}
    assert types == {"q4_1", "q8_0", "float32"}  # a q4_1 file still holds other types
    assert f.metadata["llama.embedding_length"] == 576
    assert len(f.tensor_names) == 272

    embed = f.tensor("token_embd.weight")
    assert embed.shape == (49152, 576)  # [vocab, hidden] like HF's embed_tokens
    assert np.isfinite(embed).all()
    down = f.tensor("blk.0.ffn_down.weight")
    assert down.shape == (576, 1536)  # HF down_proj: [hidden, intermediate]
    assert f.tensor_info("blk.0.ffn_down.weight").encoding == "q4_1"
    np.testing.assert_array_equal(down, _dequantize_q4_1_by_hand(f.raw("blk.0.ffn_down.weight")))
    norm = f.tensor("blk.0.attn_norm.weight")
    assert norm.shape == (576,) and norm.dtype == np.float32


# --- safetensors --------------------------------------------------------------------------------------------------


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "embed.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "layers.0.q.weight": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16),
        "layers.0.norm.weight": np.ones(4, dtype=np.float16),
        "position_ids": np.arange(7, dtype=np.int64),
    }


def _check_all(weights: SafetensorsWeights, tensors: dict[str, np.ndarray]) -> None:
    assert sorted(weights.names) == sorted(tensors)
    for name, expected in tensors.items():
        got = weights.get(name, dtype=None)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))
        as_f32 = weights.get(name)
        assert as_f32.dtype == np.float32
        np.testing.assert_array_equal(as_f32, expected.astype(np.float32))


def test_safetensors_single_file(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    tensors = _tensors()
    folder = make_checkpoint(tmp_path / "ckpt", tensors)
    weights = SafetensorsWeights(folder)
    _check_all(weights, tensors)
    info = weights.info("layers.0.q.weight")
    assert info.dtype == "BF16" and info.shape == (4, 4) and info.n_bytes == 32
    view = weights.get("embed.weight")  # float32 on disk, float32 asked: a read-only view, no copy
    assert not view.flags.writeable
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        weights.get("nope")


def test_safetensors_sharded_with_index(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    tensors = _tensors()
    folder = make_checkpoint(tmp_path / "ckpt", tensors, shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    weights = SafetensorsWeights(folder)
    assert weights.names == list(tensors)  # the index's order
    _check_all(weights, tensors)
    assert weights.info("position_ids").file.name == "model-00002-of-00003.safetensors"


def test_safetensors_shards_without_index(tmp_path: Path) -> None:
    from tests.conftest import write_safetensors

    tensors = _tensors()
    names = list(tensors)
    write_safetensors(tmp_path / "a.safetensors", {n: tensors[n] for n in names[:2]})
    write_safetensors(tmp_path / "b.safetensors", {n: tensors[n] for n in names[2:]})
    _check_all(SafetensorsWeights(tmp_path), tensors)


def test_safetensors_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    weights = SafetensorsWeights(tmp_path)
    _check_all(weights, tensors)
    assert weights.metadata == {"format": "pt"}


def test_safetensors_unaligned_header(tmp_path: Path) -> None:
    """Our writer pads the header to 8 bytes as the library does; data at an odd offset must still read."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * ((1 - len(header)) % 4)
    assert (8 + len(header)) % 4 == 1
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + x.tobytes())
    np.testing.assert_array_equal(SafetensorsWeights(tmp_path).get("x"), x)


def _corrupt(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    return tmp_path


def _header(entries: dict[str, object]) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x02", "too short for a header length"),
        (struct.pack("<Q", 10**9) + b"{}", "header length 1000000000 is larger than the file"),
        (struct.pack("<Q", 8) + b"not json", "header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (_header({"x": {"dtype": "F32", "shape": [2]}}), "lacks a dtype, shape or"),
        (_header({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}), "unknown dtype 'Q4'"),
        (_header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), r"\(12 bytes\) but spans 8"),
        (
            _header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
            r"ends at byte .*\(truncated\)",
        ),
        (
            _header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [1 << 40, (1 << 40) + 8]}})
            + bytes(8),
            "ends at byte",
        ),
    ],
    ids=[
        "tiny",
        "header-length",
        "garbage",
        "not-object",
        "missing-keys",
        "dtype",
        "span",
        "truncated",
        "offset",
    ],
)
def test_safetensors_corrupt_files(tmp_path: Path, payload: bytes, match: str) -> None:
    folder = _corrupt(tmp_path, payload)
    with pytest.raises(UserError, match=match) as info:
        SafetensorsWeights(folder)
    assert "\n" not in str(info.value) and "model.safetensors" in str(info.value)


def test_safetensors_truncated_real_file(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    folder = make_checkpoint(tmp_path / "ckpt", _tensors())
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(UserError, match=r"'position_ids' ends at byte .*\(truncated\)"):
        SafetensorsWeights(folder)


def test_safetensors_directory_and_index_errors(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="holds no model.safetensors"):
        SafetensorsWeights(tmp_path)
    folder = make_checkpoint(tmp_path / "ckpt", _tensors(), shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (folder / "model-00002-of-00002.safetensors").rename(folder / "elsewhere.bin")
    with pytest.raises(UserError, match="lists shard 'model-00002-of-00002.safetensors', which is missing"):
        SafetensorsWeights(folder)
    (folder / "elsewhere.bin").rename(folder / "model-00002-of-00002.safetensors")
    index["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="puts tensor 'embed.weight' in model-00002-of-00002.safetensors"):
        SafetensorsWeights(folder)
    index_path.write_text("{not json")
    with pytest.raises(UserError, match="not a valid shard index"):
        SafetensorsWeights(folder)


def test_safetensors_duplicate_names_across_unindexed_files(tmp_path: Path) -> None:
    from tests.conftest import write_safetensors

    x = np.zeros(2, dtype=np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"w": x})
    write_safetensors(tmp_path / "b.safetensors", {"w": x})
    with pytest.raises(UserError, match="'w' is in both a.safetensors and b.safetensors"):
        SafetensorsWeights(tmp_path)
