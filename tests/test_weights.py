"""Weight readers: encodings, GGUF (every type gguf-py writes, corrupt files, the real SmolLM2) and safetensors."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from maxjax.errors import UserError
from maxjax.weights import encodings
from maxjax.weights.ggml_blocks import dequantize
from maxjax.weights.gguf import GGUFFile, file_encoding, peek_metadata, read_metadata
from maxjax.weights.safetensors import SafetensorsWeights

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

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


# --- GGUF: our header parser and block decoders against gguf-py's ------------------------------------------------

SCALAR_VALUES: dict[str, tuple[gguf.GGUFValueType, list[object]]] = {  # a value of every type, some at the edges
    "u8": (V.UINT8, [0, 255, 7]),
    "i8": (V.INT8, [-128, 127, -1]),
    "u16": (V.UINT16, [65535, 0, 300]),
    "i16": (V.INT16, [-32768, 32767, 5]),
    "u32": (V.UINT32, [4_000_000_000, 1, 0]),
    "i32": (V.INT32, [-2_000_000_000, 3, 0]),
    "f32": (V.FLOAT32, [0.1, -2.5e-7, 3.0e38]),
    "bool": (V.BOOL, [True, False, True]),
    "u64": (V.UINT64, [2**64 - 1, 0, 12]),
    "i64": (V.INT64, [-(2**63), 2**63 - 1, 0]),
    "f64": (V.FLOAT64, [0.1, -1e300, 5e-324]),
    "str": (V.STRING, ["", "héllo wörld", "日本語 🙂"]),
}


def test_gguf_header_matches_gguf_py(tmp_path: Path) -> None:
    """Every metadata value type, scalar and array, a non-default alignment and tensors whose sizes need padding
    read exactly as gguf-py's own reader reads them."""
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    for name, (vtype, values) in SCALAR_VALUES.items():
        writer.add_key_value(f"scalar.{name}", values[0], vtype)
        writer.add_key_value(f"array.{name}", values, V.ARRAY, sub_type=vtype)
    writer.add_tensor("odd", np.arange(15, dtype=np.float32).reshape(3, 5))
    writer.add_tensor("q", gguf.quants.quantize(_source()[:2], Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("half", np.linspace(-1, 1, 7, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(path)
    expected = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    f = GGUFFile(path)
    assert list(f.metadata) == list(expected) and f.metadata == expected
    for name, value in expected.items():  # same Python types too: 1 == 1.0 == True would hide a wrong one
        got = f.metadata[name]
        assert type(got) is type(value), name
        if isinstance(value, list):
            assert [type(v) for v in got] == [type(v) for v in value], name
    assert f.metadata["general.alignment"] == 64
    assert f.tensor_names == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensor_info(t.name)
        assert (info.offset, info.n_bytes, info.ggml_type) == (t.data_offset, t.n_bytes, int(t.tensor_type))
        assert info.offset % 64 == 0
        assert f.raw(t.name).shape == t.data.shape and f.raw(t.name).tobytes() == t.data.tobytes()
    assert peek_metadata(path, ["array.str", "scalar.f64", "absent"]) == {
        "array.str": SCALAR_VALUES["str"][1],
        "scalar.f64": 0.1,
    }


def test_gguf_raw_is_typed_read_only_views(all_types_gguf: tuple[Path, np.ndarray]) -> None:
    path, x = all_types_gguf
    f = GGUFFile(path)
    assert f.raw("w.f32").dtype == np.float32 and f.raw("w.f16").dtype == np.float16
    assert f.raw("w.bf16").dtype == ml_dtypes.bfloat16 and f.raw("w.bf16").shape == (ROWS, COLS)
    assert f.raw("w.q8_0").shape == (ROWS, COLS // 32 * 34) and f.raw("w.q8_0").dtype == np.uint8
    for name in f.tensor_names:
        assert not f.raw(name).flags.writeable
    view = f.tensor("w.f32")  # float32 on disk, float32 asked: the mapped bytes themselves
    assert not view.flags.writeable and np.shares_memory(view, f.raw("w.f32"))


DECODED_HERE = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _bits(x: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns, every NaN made the same one (NaN payloads are the CPU's business)."""
    return np.where(np.isnan(x), np.float32(np.nan), x).astype(np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", DECODED_HERE, ids=lambda q: q.name)
def test_dequantize_is_bit_identical_to_gguf_py(qtype: Q) -> None:
    """Random bytes: every scale (negative, zero, subnormal, infinite, NaN) and every bit pattern of the values."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    packed = np.random.default_rng(int(qtype)).integers(0, 256, (2, 3, 5 * type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # an infinite scale times a zero
        ours, expected = dequantize(packed, qtype), gguf.quants.dequantize(packed, qtype)
    assert ours.shape == (2, 3, 5 * block_size) and ours.dtype == np.float32
    np.testing.assert_array_equal(_bits(ours), _bits(expected))


def test_dequantize_falls_back_to_gguf_py() -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q5_1]
    packed = np.random.default_rng(0).integers(0, 256, (4, 2 * type_size), dtype=np.uint8)
    np.testing.assert_array_equal(_bits(dequantize(packed, Q.Q5_1)), _bits(gguf.quants.dequantize(packed, Q.Q5_1)))


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


@pytest.fixture
def tokens_gguf(tmp_path: Path, make_gguf: Callable[..., Path]) -> Path:
    return make_gguf(
        tmp_path / "tokens.gguf",
        {"w": (_source(), Q.Q8_0)},
        metadata={"general.name": "small", "dup.a": "x", "dup.b": "y", "tokens": ["a", "bb", "ccc"]},
    )


def _after(data: bytes, key: bytes) -> int:
    """Where the value type of metadata key `key` is."""
    return data.index(key) + len(key)


# (where, bytes written there, what the error says, whether the metadata (all peek_metadata reads) is broken)
HEADER_EDITS: dict[str, tuple[Callable[[bytes], int], bytes, str, bool]] = {
    "version-1": (lambda d: 4, struct.pack("<I", 1), "GGUF version 1, which maxjax cannot read", True),
    "version-9": (lambda d: 4, struct.pack("<I", 9), "GGUF version 9", True),
    "tensor-count": (lambda d: 8, struct.pack("<Q", 1 << 60), "truncated", False),
    "kv-count": (lambda d: 16, struct.pack("<Q", 1 << 60), "truncated", True),
    "value-type": (lambda d: _after(d, b"general.name"), struct.pack("<I", 99), "unknown value type 99", True),
    "string-length": (lambda d: _after(d, b"general.name") + 4, struct.pack("<Q", 1 << 60), "truncated", True),
    "strings-count": (lambda d: _after(d, b"tokens") + 8, struct.pack("<Q", 1 << 60), "truncated", True),
    "string-in-array": (lambda d: _after(d, b"tokens") + 16, struct.pack("<Q", 1 << 60), "truncated", True),
    "array-type": (lambda d: _after(d, b"tokens") + 4, struct.pack("<I", 42), "array of unknown value type", True),
    "duplicate-key": (lambda d: d.index(b"dup.b"), b"dup.a", "metadata key 'dup.a' appears twice", True),
    "dims": (lambda d: d.index(b"\x01" + bytes(7) + b"w") + 13, struct.pack("<Q", 100), "rows of 100 values", False),
}


@pytest.mark.parametrize("edit", HEADER_EDITS.values(), ids=list(HEADER_EDITS))
def test_gguf_corrupt_header(tokens_gguf: Path, edit: tuple[Callable[[bytes], int], bytes, str, bool]) -> None:
    where, patch, says, in_metadata = edit
    data = bytearray(tokens_gguf.read_bytes())
    at = where(bytes(data))
    data[at : at + len(patch)] = patch
    tokens_gguf.write_bytes(bytes(data))
    _expect_user_error(tokens_gguf, says)
    if in_metadata:
        with pytest.raises(UserError, match=says):
            peek_metadata(tokens_gguf, ["nothing-matches-so-it-reads-everything"])


def test_gguf_bad_alignment(tmp_path: Path, make_gguf: Callable[..., Path]) -> None:
    path = make_gguf(tmp_path / "align.gguf", {"w": (_source(), Q.F32)}, metadata={"general.alignment": 48})
    _expect_user_error(path, "general.alignment is 48, not a power of two")


def test_gguf_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("w", np.ones((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _expect_user_error(path, "is a big-endian GGUF file")
    with pytest.raises(UserError, match="big-endian"):
        file_encoding(path)


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


def test_smollm2_gguf_opens_in_a_blink(smollm2_gguf: Path) -> None:
    """49k tokens and 48.9k merges: gguf-py's reader took ~5 s over them, ours ~0.05 s (20x margin here)."""
    start = time.perf_counter()
    f = GGUFFile(smollm2_gguf)
    metadata = f.metadata
    elapsed = time.perf_counter() - start
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and len(metadata["tokenizer.ggml.merges"]) == 48900
    assert len(metadata["tokenizer.ggml.token_type"]) == 49152
    assert elapsed < 1.0, f"opening took {elapsed:.2f} s"


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"])
def test_smollm2_dequantization_is_bit_identical_to_gguf_py(smollm2_gguf: Path, name: str) -> None:
    f = GGUFFile(smollm2_gguf)
    info = f.tensor_info(name)
    assert info.encoding in ("q8_0", "q4_1")
    expected = gguf.quants.dequantize(f.raw(name), Q(info.ggml_type))
    np.testing.assert_array_equal(_bits(f.tensor(name)), _bits(expected))


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
