"""GGUF files: metadata, tensors and their encodings, read with gguf-py.

A GGUF file is a header (magic, version, key-value metadata, one info record per tensor) followed by the tensor
data, each tensor at an aligned offset. gguf-py memory-maps the whole file, so opening one reads only the header
and a tensor's bytes are touched when it is asked for. The header is not free, though: gguf-py builds Python
objects for every element of the tokenizer arrays, about 1.6 s for SmolLM2's 49k-token vocabulary, so open a
file once (`GGUFFile`) and use `peek_metadata` / `file_encoding` when a few keys are all you need.

Orientation: GGUF lists a tensor's dimensions fastest-varying first (ggml's `ne[0]` is the row length); gguf-py
reverses them, so a matrix comes back `[out_features, in_features]` exactly as in the Hugging Face checkpoint the
file was converted from. Names are llama.cpp's (`blk.0.attn_q.weight`); mapping them to a model's own names, and
undoing llama.cpp's permutation of Q/K rows, belongs to the model file, not here.

gguf-py trusts the file: a truncated or corrupt header surfaces as an IndexError, an assert, or a numpy reshape
error deep inside it, and a huge bogus length can make it loop for a long time. `_CheckedReader` bounds-checks
every read so that each of those becomes one UserError naming the file and the fix.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import numpy.typing as npt

from maxjax.errors import UserError
from maxjax.weights import encodings

GGUF_MAGIC = b"GGUF"
_HEADER_MIN_BYTES = 24  # magic, version, tensor count, metadata count


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


class _ShortRead(Exception):
    """The header asked for bytes beyond the end of the file."""

    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"needs byte {end}, file has {size}")
        self.end = end
        self.size = size


class _TensorPastEnd(Exception):
    def __init__(self, name: str, end: int, size: int) -> None:
        super().__init__(name)
        self.name = name
        self.end = end
        self.size = size


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that refuses to read past the end of the file instead of silently reading short arrays.

    This overrides two of gguf-py's internal helpers (`_get`, every header read; `_build_tensors`, which maps
    tensor data). They have kept these signatures since gguf-py 0.6; if that ever changes, the overrides stop
    being called and corrupt files still fail, only with gguf-py's own (wrapped) message.
    """

    def _get(
        self, offset: int, dtype: npt.DTypeLike, count: int = 1, override_order: Any = None
    ) -> npt.NDArray[Any]:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _ShortRead(end, len(self.data))
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_type, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = gguf.GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise UserError(
                    f"tensor {name!r} has GGML type {int(raw_type[0])}, which the installed gguf-py does not "
                    "know: convert the model with a llama.cpp release that matches, or upgrade gguf"
                ) from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block_size
            end = int(start_offs) + int(offset[0]) + n_bytes
            if end > len(self.data):
                raise _TensorPastEnd(name, end, len(self.data))
        super()._build_tensors(start_offs, fields)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class GGUFFile:
    """One GGUF file, opened once and memory-mapped; tensors are read (and dequantized) one at a time.

    Raises UserError when the file is missing, is not GGUF, or its header or tensor table does not fit the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = self._open(self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}

    @staticmethod
    def _open(path: Path) -> gguf.GGUFReader:
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UserError(f"cannot open GGUF file {path}: {e.strerror or e}; check the path") from None
        if magic != GGUF_MAGIC:
            raise UserError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): pass a .gguf model file"
            )
        if size < _HEADER_MIN_BYTES:
            raise UserError(
                f"{path} is truncated ({size} bytes, no room for a GGUF header): download it again"
            )
        try:
            reader = _CheckedReader(path)
        except UserError:
            raise
        except _ShortRead as e:
            raise UserError(
                f"{path} is truncated: its GGUF header {e}; the download is incomplete, fetch the file again"
            ) from None
        except _TensorPastEnd as e:
            raise UserError(
                f"{path} is truncated: tensor {e.name!r} ends at byte {e.end} but the file has {e.size}; "
                "the download is incomplete, fetch the file again"
            ) from None
        except Exception as e:  # gguf-py signals corrupt headers with assorted exceptions and asserts
            raise UserError(
                f"{path} has an unreadable GGUF header ({_one_line(e)}); fetch the file again"
            ) from None
        if reader.byte_order != "I":
            raise UserError(
                f"{path} is a big-endian GGUF file: convert it to little-endian with llama.cpp's gguf tools"
            )
        return reader

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key-value field as plain Python values (str, int, float, bool, lists of them).

        gguf-py's own bookkeeping fields (`GGUF.version`, counts) are left out: they describe the container.
        """
        out: dict[str, Any] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                out[name] = field.contents()
            except Exception as e:
                raise UserError(
                    f"{self.path}: metadata key {name!r} is unreadable ({_one_line(e)}); the file is corrupt, "
                    "fetch it again"
                ) from None
        return out

    def _field(self, key: str) -> Any:
        """One metadata value without converting the whole table (the tokenizer arrays are large)."""
        field = self._reader.get_field(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception as e:
            raise UserError(
                f"{self.path}: metadata key {key!r} is unreadable ({_one_line(e)}); fetch it again"
            ) from None

    @cached_property
    def architecture(self) -> str:
        """`general.architecture`, llama.cpp's name for the model family (`llama`, `qwen2`, ...)."""
        arch = self._field("general.architecture")
        if not isinstance(arch, str):
            raise UserError(f"{self.path} has no general.architecture key: re-convert it with llama.cpp")
        return arch

    @cached_property
    def file_type(self) -> int | None:
        """`general.file_type` (a llama.cpp `llama_ftype`), or None when the file does not say."""
        value = self._field("general.file_type")
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
        return encodings.infer_gguf_encoding((int(t.tensor_type), len(t.shape)) for t in self._reader.tensors)

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def _reader_tensor(self, name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """How `name` is stored. Raises KeyError for a name the file does not hold."""
        t = self._reader_tensor(name)
        return GGUFTensorInfo(
            name=name,
            ggml_type=int(t.tensor_type),
            encoding=encodings.from_ggml_type(int(t.tensor_type)),
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            n_bytes=int(t.n_bytes),
            offset=int(t.data_offset),
        )

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored, a read-only view of the mapped file.

        Quantized types come as uint8 `[*shape[:-1], bytes_per_row]` (whole blocks per row), for kernels that
        keep weights packed and dequantize inside the matmul; unquantized types come as their NumPy dtype.
        """
        return np.asarray(self._reader_tensor(name).data)

    def tensor(self, name: str, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """The tensor as floats in NumPy / HF orientation, dequantized with gguf-py; `dtype=None` keeps float
        storage types (F32, F16, BF16) as they are.

        Float tensors already in `dtype` come back as read-only views of the mapped file, without a copy.
        """
        t = self._reader_tensor(name)
        info = self.tensor_info(name)
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            values = data.view(ml_dtypes.bfloat16)
        elif data.dtype != np.uint8:  # gguf-py maps F32, F16, F64 and integer tensors to their own dtype
            values = data
        else:
            try:
                values = gguf.quants.dequantize(data, t.tensor_type)
            except NotImplementedError:
                raise UserError(
                    f"{self.path}: tensor {name!r} is stored as {info.encoding}, which gguf-py cannot dequantize; "
                    "use a GGUF file with another encoding"
                ) from None
        assert values.shape == info.shape, (name, values.shape, info.shape)
        return values if dtype is None else values.astype(dtype, copy=False)


# GGUF metadata value types: struct format of each scalar type; 8 is a string, 9 an array.
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


def peek_metadata(path: str | Path, keys: Iterable[str]) -> dict[str, Any]:
    """The scalar and string values of `keys` (those present), read straight from the header.

    For choosing among several GGUF files: opening one with gguf-py builds Python objects for every element of
    the tokenizer arrays (1.6 s for SmolLM2's 49k-token vocabulary), while this skips over them and stops as soon
    as every key is found, which in llama.cpp's files is before the tokenizer. Arrays are skipped, not returned.
    """
    path = Path(path)
    wanted = set(keys)
    found: dict[str, Any] = {}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = 0

            def take(fmt: str) -> Any:
                nonlocal pos
                (value,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                return value

            def take_str() -> bytes:
                nonlocal pos
                n = take("<Q")
                if pos + n > len(buf):
                    raise struct.error("string runs past the end of the file")
                pos += n
                return buf[pos - n : pos]

            def skip(value_type: int) -> None:
                nonlocal pos
                if value_type == _STRING:
                    take_str()
                elif value_type == _ARRAY:
                    item_type, count = take("<I"), take("<Q")
                    if item_type in _SCALARS:
                        pos += struct.calcsize(_SCALARS[item_type]) * count
                    else:
                        for _ in range(count):
                            skip(item_type)
                            if pos > len(buf):
                                break
                elif value_type in _SCALARS:
                    pos += struct.calcsize(_SCALARS[value_type])
                else:
                    raise ValueError(f"unknown metadata value type {value_type}")
                if pos > len(buf):
                    raise struct.error("a metadata value runs past the end of the file")

            if buf[:4] != GGUF_MAGIC:
                raise UserError(
                    f"{path} is not a GGUF file (it starts with {bytes(buf[:4])!r}): pass a .gguf model file"
                )
            pos = 4
            version = take("<I")
            count_fmt = "<I" if version == 1 else "<Q"
            take(count_fmt)  # tensor count
            for _ in range(take(count_fmt)):
                if not wanted - found.keys():
                    break
                key = take_str().decode("utf-8", errors="replace")
                value_type = take("<I")
                if key in wanted and value_type in _SCALARS:
                    found[key] = take(_SCALARS[value_type])
                elif key in wanted and value_type == _STRING:
                    found[key] = take_str().decode("utf-8", errors="replace")
                else:
                    skip(value_type)
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot open GGUF file {path}: {e.strerror or e}; check the path") from None
    except (struct.error, ValueError, OverflowError) as e:
        raise UserError(
            f"{path} has a truncated or corrupt GGUF header ({_one_line(e)}); fetch the file again"
        ) from None
    return found


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
