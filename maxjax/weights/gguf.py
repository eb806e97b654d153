"""GGUF files: metadata, tensors and their encodings.

A GGUF file is a header (magic, version, key-value metadata, one info record per tensor) followed by the tensor
data, each tensor at an aligned offset. The file is memory-mapped and its header parsed here, with `struct` for
scalars, one `np.frombuffer` per numeric array and a tight loop per string array, so opening SmolLM2 (49k
tokens and 49k merges in its metadata) takes tens of milliseconds; a tensor's bytes are touched only when it is
asked for. `peek_metadata` walks the same header but stops as soon as it has the keys it was asked for.

Orientation: GGUF lists a tensor's dimensions fastest-varying first (ggml's `ne[0]` is the row length); we
reverse them, so a matrix comes back `[out_features, in_features]` exactly as in the Hugging Face checkpoint the
file was converted from. Names are llama.cpp's (`blk.0.attn_q.weight`); mapping them to a model's own names, and
undoing llama.cpp's permutation of Q/K rows, belongs to the model file, not here.

The header is not trusted: every read is bounds-checked and every count is checked against the bytes left
before it is looped over, so a truncated, corrupt or big-endian file becomes one UserError naming the file and
the fix, at once, never a traceback or a long loop over a bogus length.

Dequantization is `ggml_blocks.dequantize`: the common block types a whole tensor at a time with NumPy, the rest
through gguf-py.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import gguf
import numpy as np
import numpy.typing as npt

from maxjax.errors import UserError
from maxjax.weights import encodings
from maxjax.weights.ggml_blocks import dequantize

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 (u32 lengths, 2023) is refused by llama.cpp and gguf-py too
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: the struct format of each scalar type (NumPy reads the same codes, for arrays);
# 8 is a string, 9 an array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

_Q = gguf.GGMLQuantizationType
# GGML types stored as plain arrays; every other type is blocks of packed values. BF16 is plain too, but its
# dtype comes from ml_dtypes, which takes about a second to import: see `_plain_dtype`.
_PLAIN_DTYPES: dict[int, np.dtype[Any]] = {
    _Q.F32: np.dtype("<f4"),
    _Q.F16: np.dtype("<f2"),
    _Q.F64: np.dtype("<f8"),
    _Q.I8: np.dtype("i1"),
    _Q.I16: np.dtype("<i2"),
    _Q.I32: np.dtype("<i4"),
    _Q.I64: np.dtype("<i8"),
}


def _plain_dtype(ggml_type: int) -> np.dtype[Any] | None:
    """The NumPy dtype of a type stored as a plain array; None for a block-quantized type."""
    if ggml_type == _Q.BF16:
        import ml_dtypes  # only for files that hold bfloat16: the CLI peeks at GGUF files without it

        return np.dtype(ml_dtypes.bfloat16)
    return _PLAIN_DTYPES.get(ggml_type)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    """llama.cpp's name, e.g. `blk.0.attn_q.weight`."""
    ggml_type: int
    """gguf-py's `GGMLQuantizationType` value: how the bytes are laid out."""
    encoding: str
    """The storage type as an encoding name (`q4_1`, `float32`, ...); one file may mix several."""
    shape: tuple[int, ...]
    """The logical shape in NumPy / Hugging Face order (GGUF's dimensions reversed)."""
    n_bytes: int
    """Bytes the tensor occupies in the file."""
    offset: int
    """Absolute byte offset of the tensor's data in the file."""


class GGUFFile:
    """One GGUF file, opened once and memory-mapped; tensors are read (and dequantized) one at a time.

    Raises UserError when the file is missing, is not GGUF, or its header or tensor table does not fit the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = _map_file(self.path)
        header = _HeaderReader(self.path, self._map)
        n_tensors, n_kv = header.counts()
        self._metadata = header.metadata(n_kv)
        self._tensors = header.tensors(n_tensors, self._metadata.get("general.alignment", _DEFAULT_ALIGNMENT))

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key-value field as plain Python values (str, int, float, bool, lists of them)."""
        return self._metadata

    @cached_property
    def architecture(self) -> str:
        """`general.architecture`, llama.cpp's name for the model family (`llama`, `qwen2`, ...)."""
        arch = self._metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UserError(f"{self.path} has no general.architecture key: re-convert it with llama.cpp")
        return arch

    @cached_property
    def file_type(self) -> int | None:
        """`general.file_type` (a llama.cpp `llama_ftype`), or None when the file does not say."""
        value = self._metadata.get("general.file_type")
        return int(value) if isinstance(value, int) else None

    @cached_property
    def encoding(self) -> str:
        """The file's encoding, from `general.file_type`; from its matrices' storage types when that is absent.

        The file's name is never consulted: names lie (`model-q4.gguf` may well hold Q8_0).
        """
        if self.file_type is not None:
            named = encodings.from_gguf_file_type(self.file_type)
            if named is not None:
                return named
        return encodings.infer_gguf_encoding((t.ggml_type, len(t.shape)) for t in self._tensors.values())

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """How `name` is stored. Raises KeyError for a name the file does not hold."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored, a read-only view of the mapped file.

        Quantized types come as uint8 `[*shape[:-1], bytes_per_row]` (whole blocks per row), for kernels that
        keep weights packed and dequantize inside the matmul; unquantized types come as their NumPy dtype
        (BF16 as `ml_dtypes.bfloat16`).
        """
        info = self.tensor_info(name)
        dtype = _plain_dtype(info.ggml_type)
        shape = info.shape
        if dtype is None:
            block_size, type_size = gguf.GGML_QUANT_SIZES[_Q(info.ggml_type)]
            dtype = np.dtype(np.uint8)
            shape = (*shape[:-1], shape[-1] // block_size * type_size)
        return np.frombuffer(self._map, dtype, info.n_bytes // dtype.itemsize, info.offset).reshape(shape)

    def tensor(self, name: str, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """The tensor as floats in NumPy / HF orientation, dequantized whole; `dtype=None` keeps float
        storage types (F32, F16, BF16) as they are.

        Float tensors already in `dtype` come back as read-only views of the mapped file, without a copy.
        """
        info = self.tensor_info(name)
        values = self.raw(name)
        if values.dtype == np.uint8:  # packed blocks: no plain GGML type is uint8 (I8 is int8)
            try:
                values = dequantize(values, info.ggml_type)
            except NotImplementedError:
                raise UserError(
                    f"{self.path}: tensor {name!r} is stored as {info.encoding}, which gguf-py cannot dequantize; "
                    "use a GGUF file with another encoding"
                ) from None
        assert values.shape == info.shape, (name, values.shape, info.shape)
        return values if dtype is None else values.astype(dtype, copy=False)


def _map_file(path: Path) -> mmap.mmap:
    """The file memory-mapped read-only, once its first four bytes say it is GGUF."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic == GGUF_MAGIC:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot open GGUF file {path}: {e.strerror or e}; check the path") from None
    raise UserError(
        f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): pass a .gguf model file"
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _HeaderReader:
    """Reads a GGUF header front to back from the mapped file: `counts`, then `metadata`, then `tensors`.

    Every failure is a UserError naming the file: a read past the end (truncated, or a bogus length), a value
    that cannot be what it claims (corrupt), a tensor whose data lies beyond the end of the file.
    """

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def _truncated(self, end: int) -> NoReturn:
        raise UserError(
            f"{self.path} is truncated or corrupt: its GGUF header needs byte {end} but the file has {self.size}; "
            "if the download was cut short, fetch the file again"
        )

    def _corrupt(self, what: str) -> NoReturn:
        raise UserError(f"{self.path} has an unreadable GGUF header ({what}); fetch the file again")

    def _unreadable(self, what: str, error: Exception) -> NoReturn:
        raise UserError(f"{self.path}: {what} is unreadable ({_one_line(error)}); the file is corrupt, fetch it again")

    def _need(self, n_bytes: int) -> None:
        """Fail unless `n_bytes` remain: checked before looping over a count, so a bogus one fails at once."""
        if self.pos + n_bytes > self.size:
            self._truncated(self.pos + n_bytes)

    def _take(self, n_bytes: int) -> int:
        """Step over `n_bytes`; returns where they start."""
        self._need(n_bytes)
        self.pos += n_bytes
        return self.pos - n_bytes

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def _string(self, what: str) -> str:
        start = self._take(self._scalar("<Q"))
        try:
            return self.buf[start : self.pos].decode()
        except UnicodeDecodeError as e:
            self._unreadable(what, e)

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings in one tight loop: a tokenizer's arrays hold ~50k each."""
        buf, size, pos = self.buf, self.size, self.pos
        self._need(8 * count)
        out: list[str] = []
        append, unpack_length = out.append, _U64.unpack_from
        try:
            for _ in range(count):
                start = pos + 8
                if start > size:
                    self._truncated(start)
                pos = start + unpack_length(buf, pos)[0]
                if pos > size:
                    self._truncated(pos)
                append(buf[start:pos].decode())
        except UnicodeDecodeError as e:
            self._unreadable(what, e)
        self.pos = pos
        return out

    def _value(self, value_type: int, what: str) -> Any:
        if value_type in _SCALARS:
            return self._scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self._string(what)
        if value_type != _ARRAY:
            self._corrupt(f"{what} has unknown value type {value_type}")
        item_type, count = self._scalar("<I"), self._scalar("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            start = self._take(count * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if item_type == _STRING:
            return self._strings(count, what)
        if item_type != _ARRAY:
            self._corrupt(f"{what} is an array of unknown value type {item_type}")
        self._need(12 * count)  # each nested array at least an item type and a count
        return [self._value(item_type, what) for _ in range(count)]

    def counts(self) -> tuple[int, int]:
        """Check the version; returns (tensor count, metadata count)."""
        self._take(len(GGUF_MAGIC))  # checked when the file was mapped
        version = self._scalar("<I")
        if version & 0xFFFF == 0 and version != 0:  # a small number written the other way round
            raise UserError(
                f"{self.path} is a big-endian GGUF file: convert it to little-endian with llama.cpp's gguf tools"
            )
        if version not in _VERSIONS:
            raise UserError(
                f"{self.path} is GGUF version {version}, which maxjax cannot read (it reads versions "
                f"{' and '.join(map(str, _VERSIONS))}): convert the model again with a current llama.cpp"
            )
        return self._scalar("<Q"), self._scalar("<Q")

    def metadata(self, count: int, until_found: Iterable[str] = ()) -> dict[str, Any]:
        """The `count` key-value pairs; with `until_found`, only those up to the last of those keys."""
        wanted = set(until_found)
        self._need(13 * count)  # each pair at least a key length, a value type and a one-byte value
        out: dict[str, Any] = {}
        for _ in range(count):
            if wanted and wanted <= out.keys():
                break
            key = self._string("a metadata key")
            if key in out:
                self._corrupt(f"metadata key {key!r} appears twice")
            out[key] = self._value(self._scalar("<I"), f"metadata key {key!r}")
        return out

    def tensors(self, count: int, alignment: Any) -> dict[str, GGUFTensorInfo]:
        """The `count` tensor info records, in file order, with absolute data offsets."""
        self._need(24 * count)  # each at least a name length, a dimension count, a type and an offset
        records = []
        for _ in range(count):
            name = self._string("a tensor name")
            n_dims = self._scalar("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self._take(8 * n_dims))
            records.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            self._corrupt(f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-self.pos // alignment) * alignment

        out: dict[str, GGUFTensorInfo] = {}
        for name, dims, raw_type, offset in records:
            try:
                ggml_type = _Q(raw_type)
            except ValueError:
                raise UserError(
                    f"{self.path}: tensor {name!r} has GGML type {raw_type}, which the installed gguf-py does not "
                    "know: convert the model with a llama.cpp release that matches, or upgrade gguf"
                ) from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            row = dims[0] if dims else 1
            if row % block_size:
                self._corrupt(f"tensor {name!r} has rows of {row} values, not whole {ggml_type.name} blocks")
            if name in out:
                self._corrupt(f"tensor {name!r} appears twice")
            n_bytes = math.prod(dims) // block_size * type_size
            end = data_start + offset + n_bytes
            if end > self.size:
                raise UserError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {end} but the file has {self.size}; "
                    "the download is incomplete, fetch the file again"
                )
            shape = tuple(reversed(dims))
            encoding = encodings.from_ggml_type(ggml_type)
            out[name] = GGUFTensorInfo(name, int(ggml_type), encoding, shape, n_bytes, data_start + offset)
        return out


def peek_metadata(path: str | Path, keys: Iterable[str]) -> dict[str, Any]:
    """The values of `keys` (those present), read straight from the header.

    For choosing among several GGUF files: this stops reading as soon as every key is found, which in llama.cpp's
    files is before the tokenizer arrays, and never reads the tensor table.
    """
    path = Path(path)
    wanted = set(keys)
    with _map_file(path) as buf:
        header = _HeaderReader(path, buf)
        _, n_kv = header.counts()
        found = header.metadata(n_kv, until_found=wanted)
    return {key: value for key, value in found.items() if key in wanted}


def file_encoding(path: str | Path) -> str:
    """A GGUF file's encoding from `general.file_type` in its header, falling back to opening it fully (to
    look at its tensor types) only when the key is absent or unknown."""
    file_type = peek_metadata(path, ["general.file_type"]).get("general.file_type")
    if isinstance(file_type, int):
        named = encodings.from_gguf_file_type(file_type)
        if named is not None:
            return named
    return GGUFFile(path).encoding


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key-value field of a GGUF file as plain Python values (str, int, float, bool, lists of them)."""
    return GGUFFile(path).metadata
