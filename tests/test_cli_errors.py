"""`max generate` on bad input: exit status 2 and exactly one line on stderr, `error: ...` naming the problem.

Each case runs the installed `max` command in a subprocess, as a user would, on a broken copy of a tiny valid
model (tests/tiny_llama.py): nothing here loads the real model, and every error comes before any compilation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from tests.tiny_llama import random_weights, write_hf_checkpoint, write_llama_gguf

MAX = Path(sys.executable).parent / "max"
Q4_1 = gguf.GGMLQuantizationType.Q4_1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid tiny Q4_1 GGUF (`tiny.gguf`) and float32 checkpoint (`hf/`) to break copies of."""
    folder = tmp_path_factory.mktemp("tiny-models")
    weights = random_weights(seed=1)
    write_llama_gguf(folder / "tiny.gguf", weights, Q4_1)
    write_hf_checkpoint(folder / "hf", weights)
    return folder


def _gguf_prefix(n_bytes: int) -> Callable[[Path, Path], Path]:
    def make(models: Path, tmp: Path) -> Path:
        data = (models / "tiny.gguf").read_bytes()
        size = n_bytes if n_bytes > 0 else len(data) + n_bytes
        assert 0 < size < len(data)
        (tmp / "model.gguf").write_bytes(data[:size])
        return tmp / "model.gguf"

    return make


def _wrong_magic(models: Path, tmp: Path) -> Path:
    data = (models / "tiny.gguf").read_bytes()
    (tmp / "model.gguf").write_bytes(b"GGML" + data[4:])
    return tmp / "model.gguf"


def _checkpoint(edit: Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    def make(models: Path, tmp: Path) -> Path:
        folder = Path(shutil.copytree(models / "hf", tmp / "checkpoint"))
        edit(folder)
        return folder

    return make


def _bad_safetensors_header(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    (folder / "model.safetensors").write_bytes(
        data[:8] + b"\x00not json" + b"!" * (header_len - 9) + data[8 + header_len :]
    )


def _truncated_safetensors(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])


def _architecture(name: str | None) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = [name] if name else None
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _gguf_with(**kwargs: Any) -> Callable[[Path, Path], Path]:
    def make(models: Path, tmp: Path) -> Path:
        return write_llama_gguf(tmp / "model.gguf", random_weights(seed=1), Q4_1, **kwargs)

    return make


def _gguf_in_directory(models: Path, tmp: Path) -> Path:
    (tmp / "ggufs").mkdir()
    shutil.copy(models / "tiny.gguf", tmp / "ggufs" / "tiny-q4_0.gguf")  # the name lies; the header decides
    return tmp / "ggufs"


CASES = [
    pytest.param(
        lambda models, tmp: tmp / "nowhere" / "model.gguf", [], "no such file or directory", id="missing"
    ),
    pytest.param(lambda models, tmp: tmp, [], "holds no model", id="directory-without-model"),
    pytest.param(_wrong_magic, [], "is not a GGUF file", id="gguf-wrong-magic"),
    pytest.param(_gguf_prefix(12), [], "truncated", id="gguf-shorter-than-header"),
    pytest.param(_gguf_prefix(300), [], "truncated", id="gguf-cut-in-metadata"),
    pytest.param(_gguf_prefix(-100), [], "truncated: tensor", id="gguf-tensor-past-end"),
    pytest.param(
        _gguf_with(arch="mamba"), [], "GGUF architecture 'mamba' is not supported", id="gguf-unsupported-arch"
    ),
    pytest.param(
        _checkpoint(_bad_safetensors_header), [], "not a valid safetensors file", id="safetensors-bad-header"
    ),
    pytest.param(_checkpoint(_truncated_safetensors), [], "(truncated)", id="safetensors-truncated"),
    pytest.param(
        _checkpoint(_architecture("FooForCausalLM")),
        [],
        "FooForCausalLM is not supported",
        id="unsupported-architecture",
    ),
    pytest.param(_checkpoint(_architecture(None)), [], "names no architectures", id="no-architecture"),
    pytest.param(
        lambda models, tmp: models / "tiny.gguf",
        ["--quantization-encoding", "q4_0"],
        "holds q4_1",
        id="encoding-the-file-lacks",
    ),
    pytest.param(
        _gguf_in_directory, ["--quantization-encoding", "q4_0"], "holds q4_1", id="encoding-no-file-holds"
    ),
    pytest.param(
        _gguf_with(omit_keys=["llama.attention.head_count"]),
        [],
        "llama.attention.head_count",
        id="gguf-without-required-key",
        marks=pytest.mark.needs_model_module,
    ),
]


WITHOUT_JAX = "import sys; sys.modules['jax'] = None; from maxjax.cli import main; main(sys.argv[1:])"
"""`max` in a process where `import jax` fails: an error found this way was found before JAX was imported."""


def _run_max(args: list[str], cwd: Path, *, cpu_only: bool = True,
             without_jax: bool = False) -> subprocess.CompletedProcess[str]:
    """`max ARGS`, offline. cpu_only sets JAX_PLATFORMS=cpu: JAX then probes no other backend, and so logs
    nothing about the ones it cannot find (see the last test)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"HF_HUB_OFFLINE": "1"}
    if cpu_only:
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-c", WITHOUT_JAX] if without_jax else [str(MAX)]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("make", "flags", "says"), CASES)
def test_bad_input_is_one_error_line(
    make: Callable[[Path, Path], Path], flags: list[str], says: str, models: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Each error is found from the files alone, before JAX is imported (so it comes at once), except where the
    model module must read the config."""
    model = make(models, tmp_path)
    without_jax = request.node.get_closest_marker("needs_model_module") is None
    result = _run_max(["generate", "--model", str(model), "--prompt", "hi", *flags], cwd=tmp_path,
                      without_jax=without_jax)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[0]
    assert result.stdout == ""


def test_error_line_is_alone_without_jax_platforms(tmp_path: Path) -> None:
    result = _run_max(
        ["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi"], tmp_path, cpu_only=False
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
