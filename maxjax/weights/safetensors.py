"""safetensors checkpoints, memory-mapped and read one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (`{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the end of the header), then the
tensor bytes. We parse the header ourselves and view tensor bytes with `np.frombuffer` over an mmap instead of
going through `safetensors.safe_open`: NumPy has no bfloat16, so the library cannot hand bf16 tensors to NumPy,
while `ml_dtypes.bfloat16` (a JAX dependency) can view the bytes as they are; and owning the parse lets every
kind of corruption become one UserError naming the file, the tensor and the fix.

A checkpoint is one `model.safetensors`, or shards listed by `model.safetensors.index.json` (`weight_map`:
tensor name -> shard file), or, failing both, every `*.safetensors` file in the directory.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from maxjax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger length means a corrupt file

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and how it is stored."""

    name: str
    dtype: str
    """The safetensors dtype name (`BF16`, `F32`, ...)."""
    shape: tuple[int, ...]
    file: Path
    offset: int
    """Absolute byte offset of the tensor's data in `file`."""
    n_bytes: int


class _File:
    """One safetensors file: its parsed, validated header, and a lazily opened read-only mmap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._map: mmap.mmap | None = None
        self._parse()

    def _fail(self, problem: str) -> UserError:
        return UserError(
            f"{self.path} is not a valid safetensors file: {problem}; download the checkpoint again"
        )

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._fail(f"it is {size} bytes, too short for a header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > size - 8:
                    raise self._fail(f"header length {header_len} is larger than the file ({size} bytes)")
                if header_len > _MAX_HEADER_BYTES:
                    raise self._fail(f"header length {header_len} is over the format's 100 MiB limit")
                raw = f.read(header_len)
        except OSError as e:
            raise UserError(
                f"cannot read {self.path}: {e.strerror or e}; check the path and permissions"
            ) from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object")
        data_start = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                if isinstance(entry, dict):
                    self.metadata = {str(k): str(v) for k, v in entry.items()}
                continue
            self.tensors[name] = self._check_entry(name, entry, data_start, size)

    def _check_entry(self, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise self._fail(f"tensor {name!r} lacks a dtype, shape or [begin, end] data_offsets") from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise self._fail(f"tensor {name!r} has unknown dtype {dtype_name!r}")
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise self._fail(f"tensor {name!r} has a negative dimension or offsets {begin}..{end}")
        n_bytes = math.prod(shape) * dtype.itemsize
        if end - begin != n_bytes:
            raise self._fail(
                f"tensor {name!r} is {dtype_name}{list(shape)} ({n_bytes} bytes) but spans {end - begin}"
            )
        if data_start + end > size:
            raise self._fail(
                f"tensor {name!r} ends at byte {data_start + end} but the file has only {size} bytes (truncated)"
            )
        return TensorInfo(name, dtype_name, shape, self.path, data_start + begin, n_bytes)

    def array(self, info: TensorInfo) -> np.ndarray:
        if self._map is None:
            with self.path.open("rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if len(self._map) < max((t.offset + t.n_bytes for t in self.tensors.values()), default=0):
                raise self._fail("the file shrank after it was opened")
        dtype = _DTYPES[info.dtype]
        count = info.n_bytes // dtype.itemsize
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=info.offset).reshape(info.shape)


class SafetensorsWeights:
    """The tensors of a Hugging Face checkpoint directory (single file or sharded), memory-mapped.

    Opening reads every shard's header (small) and validates it against the file size; tensor bytes are read
    only by `get`, one tensor at a time, so loading never holds a second copy of the checkpoint in memory.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._files: dict[Path, _File] = {}
        self._where: dict[str, _File] = {}
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            self._open_index(index)
        elif (self.model_dir / SINGLE_FILE).is_file():
            self._add_file(self.model_dir / SINGLE_FILE)
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
            if not shards:
                raise UserError(
                    f"{self.model_dir} holds no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file: "
                    "pass a Hugging Face checkpoint directory"
                )
            for shard in shards:
                self._add_file(shard)

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"{index} is not a valid shard index ({e}); download the checkpoint again"
            ) from None
        for shard_name in sorted(set(weight_map.values())):
            shard = self.model_dir / str(shard_name)
            if not shard.is_file():
                raise UserError(
                    f"{index} lists shard {shard_name!r}, which is missing: download the checkpoint again"
                )
            self._files[shard] = _File(shard)
        for name, shard_name in weight_map.items():
            file = self._files[self.model_dir / str(shard_name)]
            if name not in file.tensors:
                raise UserError(
                    f"{index} puts tensor {name!r} in {shard_name}, which does not hold it: download the checkpoint again"
                )
            self._where[name] = file

    def _add_file(self, path: Path) -> None:
        file = _File(path)
        self._files[path] = file
        for name in file.tensors:
            if name in self._where:
                raise UserError(
                    f"tensor {name!r} is in both {self._where[name].path.name} and {path.name}: "
                    f"remove the stray file or add {INDEX_FILE}"
                )
            self._where[name] = file

    @property
    def names(self) -> list[str]:
        """Every tensor name: in the shard index's order, else in file then header order."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def metadata(self) -> dict[str, str]:
        """The `__metadata__` strings of the first file (transformers writes `{"format": "pt"}`)."""
        return next(iter(self._files.values())).metadata if self._files else {}

    def info(self, name: str) -> TensorInfo:
        """How `name` is stored. Raises KeyError for a name the checkpoint does not hold."""
        try:
            return self._where[name].tensors[name]
        except KeyError:
            raise KeyError(f"{self.model_dir} has no tensor {name!r}") from None

    def get(self, name: str, dtype: npt.DTypeLike | None = np.float32) -> np.ndarray:
        """One tensor, converted to `dtype` (`None` keeps the stored dtype, bfloat16 as `ml_dtypes.bfloat16`).

        A tensor already in `dtype` is a read-only view of the mapped file, not a copy.
        """
        info = self.info(name)
        values = self._where[name].array(info)
        return values if dtype is None else values.astype(dtype, copy=False)
