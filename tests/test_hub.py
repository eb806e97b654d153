"""Resolving --model: local files and directories, GGUF choice by encoding, and a hand-made offline hub cache."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest

from maxjax.errors import UserError
from maxjax.hub import choose_downloads, resolve_model

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open an internet socket in these tests fails loudly instead of reaching the hub."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access in a test: {args}")

    original_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _matrix() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)


@pytest.fixture
def gguf_of(make_gguf: Callable[..., Path]) -> Callable[[Path, Q, int | None], Path]:
    """A tiny GGUF whose matrix is stored as `qtype`, declaring `file_type` (None: no general.file_type)."""

    def make(path: Path, qtype: Q, file_type: int | None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return make_gguf(
            path, {"blk.0.w": (_matrix(), qtype), "norm": (_matrix()[0], Q.F32)}, file_type=file_type
        )

    return make


_CONFIG = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}


def _checkpoint(folder: Path, make_checkpoint: Callable[..., Path], **kwargs: Any) -> Path:
    tensors = {"w": _matrix().astype(ml_dtypes.bfloat16), "n": np.ones(4, dtype=ml_dtypes.bfloat16)}
    return make_checkpoint(folder, tensors, **{"config": _CONFIG, **kwargs})


# --- local files and directories ------------------------------------------------------------------------------


def test_local_gguf_file(tmp_path: Path, gguf_of: Callable[..., Path]) -> None:
    path = gguf_of(tmp_path / "tiny-Q8_0.gguf", Q.Q4_0, FT.MOSTLY_Q4_0)  # the name lies; the header decides
    model = resolve_model(str(path))
    assert model.kind == "gguf" and model.path == path
    assert model.encoding == model.stored_encoding == "q4_0"
    assert model.config_dir is None and model.name == "tiny-Q8_0"
    assert not model.needs_conversion
    as_f32 = resolve_model(str(path), quantization_encoding="f32")
    assert as_f32.encoding == "float32" and as_f32.stored_encoding == "q4_0" and as_f32.needs_conversion
    with pytest.raises(UserError, match=r"--quantization-encoding q8_0: .*tiny-Q8_0.gguf holds q4_0"):
        resolve_model(str(path), quantization_encoding="q8_0")


def test_gguf_directory_choice(tmp_path: Path, gguf_of: Callable[..., Path]) -> None:
    gguf_of(tmp_path / "b-model.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    gguf_of(tmp_path / "a-model.gguf", Q.Q4_1, FT.MOSTLY_Q4_1)
    gguf_of(tmp_path / "c-model.gguf", Q.F16, FT.MOSTLY_F16)
    gguf_of(tmp_path / "d-model.gguf", Q.Q5_0, None)  # no general.file_type: inferred from its tensors

    first = resolve_model(str(tmp_path))
    assert first.path.name == "a-model.gguf" and first.encoding == "q4_1"  # first by file name
    assert first.available_encodings == ("q4_1", "q8_0", "float16", "q5_0")
    assert first.name == str(tmp_path)
    assert resolve_model(str(tmp_path), quantization_encoding="Q8_0").path.name == "b-model.gguf"
    assert resolve_model(str(tmp_path), quantization_encoding="q5_0").path.name == "d-model.gguf"
    # a float type one file holds picks that file; one no file holds dequantizes the first
    f16 = resolve_model(str(tmp_path), quantization_encoding="fp16")
    assert f16.path.name == "c-model.gguf" and not f16.needs_conversion
    bf16 = resolve_model(str(tmp_path), quantization_encoding="bfloat16")
    assert bf16.path.name == "a-model.gguf" and bf16.encoding == "bfloat16" and bf16.stored_encoding == "q4_1"
    with pytest.raises(UserError, match=r"--quantization-encoding q6_k: .* holds q4_1, q8_0, float16, q5_0"):
        resolve_model(str(tmp_path), quantization_encoding="q6_k")


def test_gguf_beside_a_tokenizer_gets_a_config_dir(tmp_path: Path, gguf_of: Callable[..., Path]) -> None:
    path = gguf_of(tmp_path / "m.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_model(str(path)).config_dir == tmp_path


def test_split_gguf_is_refused_with_the_fix(tmp_path: Path, gguf_of: Callable[..., Path]) -> None:
    path = gguf_of(tmp_path / "m-00001-of-00002.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    with pytest.raises(UserError, match="llama-gguf-split --merge"):
        resolve_model(str(path))


def test_checkpoint_directory(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    folder = _checkpoint(tmp_path / "ckpt", make_checkpoint)
    model = resolve_model(str(folder))
    assert model.kind == "hf" and model.path == folder and model.config_dir == folder
    assert model.encoding == "bfloat16" and model.available_encodings == ("bfloat16",)
    cast = resolve_model(str(folder), quantization_encoding="float32")
    assert cast.encoding == "float32" and cast.stored_encoding == "bfloat16"
    with pytest.raises(
        UserError, match=r"holds bfloat16 safetensors weights, which can be served as bfloat16, float32"
    ):
        resolve_model(str(folder), quantization_encoding="q4_k")


def test_sharded_checkpoint_and_dtype_from_the_tensors(
    tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    folder = _checkpoint(tmp_path / "ckpt", make_checkpoint, shards=2, config={"architectures": ["X"]})
    model = resolve_model(str(folder))
    assert model.kind == "hf" and model.encoding == "bfloat16"  # config.json is silent; the BF16 tensors say


def test_directory_with_both_kinds(
    tmp_path: Path, make_checkpoint: Callable[..., Path], gguf_of: Callable[..., Path]
) -> None:
    folder = _checkpoint(tmp_path / "both", make_checkpoint)
    gguf_of(folder / "m.gguf", Q.Q4_0, FT.MOSTLY_Q4_0)
    assert resolve_model(str(folder)).kind == "hf"
    assert resolve_model(str(folder), quantization_encoding="float16").kind == "hf"
    quantized = resolve_model(str(folder), quantization_encoding="q4_0")
    assert quantized.kind == "gguf" and quantized.config_dir == folder


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", r"--model .*nope: no such file or directory, and not a Hugging Face id"),
        ("empty", r"holds no model: expected config.json with \*.safetensors files, or .gguf files"),
        ("config-only", r"has config.json but no \*.safetensors or .gguf weights"),
        ("not-gguf", r"is a file but not a .gguf file"),
        ("bad-config", r"cannot read .*config.json"),
        ("corrupt-gguf", r"not a GGUF file"),
    ],
)
def test_local_errors(tmp_path: Path, make_checkpoint: Callable[..., Path], setup: str, match: str) -> None:
    spec = tmp_path / "nope"
    if setup == "empty":
        spec.mkdir()
    elif setup == "config-only":
        spec.mkdir()
        (spec / "config.json").write_text("{}")
        (spec / "pytorch_model.bin").write_bytes(b"")
    elif setup == "not-gguf":
        spec = tmp_path / "weights.bin"
        spec.write_bytes(b"x")
    elif setup == "bad-config":
        spec = _checkpoint(tmp_path / "ckpt", make_checkpoint)
        (spec / "config.json").write_text("{oops")
    elif setup == "corrupt-gguf":
        spec = tmp_path / "m.gguf"
        spec.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(UserError, match=match) as info:
        resolve_model(str(spec))
    assert "\n" not in str(info.value)


def test_revision_is_only_for_hub_ids(tmp_path: Path, gguf_of: Callable[..., Path]) -> None:
    path = gguf_of(tmp_path / "m.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    with pytest.raises(UserError, match="--revision v2 applies to Hugging Face ids"):
        resolve_model(str(path), revision="v2")


def test_default_model(smollm2_gguf: Path) -> None:
    model = resolve_model(None)
    assert model.kind == "gguf" and model.path == smollm2_gguf
    assert model.encoding == "q4_1" and model.config_dir is None
    assert model.name == "SmolLM2-135M-Instruct.Q4_1"
    assert resolve_model(None, quantization_encoding="float32").encoding == "float32"
    with pytest.raises(UserError, match="holds q4_1"):
        resolve_model(None, quantization_encoding="q4_k")


# --- Hugging Face ids, from a hand-made offline cache ----------------------------------------------------------

MAIN = "1" * 40
V1 = "2" * 40


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache in offline mode; returns the cache root (HF_HUB_CACHE)."""
    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _snapshot(hub: Path, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/<ref> (a commit hash), snapshots/<commit>/}."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_hub_checkpoint_from_cache(hub_cache: Path, make_checkpoint: Callable[..., Path]) -> None:
    snapshot = _checkpoint(_snapshot(hub_cache, "org/tiny", MAIN), make_checkpoint)
    (snapshot / "tokenizer.json").write_text("{}")
    model = resolve_model("org/tiny")
    assert model.kind == "hf" and model.path == snapshot and model.config_dir == snapshot
    assert model.repo_id == "org/tiny" and model.revision == MAIN and model.name == "org/tiny"
    assert model.encoding == "bfloat16"


def test_hub_revisions(
    hub_cache: Path, make_checkpoint: Callable[..., Path], gguf_of: Callable[..., Path]
) -> None:
    _checkpoint(_snapshot(hub_cache, "org/tiny", MAIN), make_checkpoint)
    old = _snapshot(hub_cache, "org/tiny", V1, refs=("v1",))
    gguf_of(old / "old.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    assert resolve_model("org/tiny").kind == "hf"
    by_tag = resolve_model("org/tiny", revision="v1")
    assert by_tag.kind == "gguf" and by_tag.path == old / "old.gguf" and by_tag.revision == V1
    assert resolve_model("org/tiny", revision=V1).path == old / "old.gguf"  # a commit hash needs no ref
    with pytest.raises(
        UserError, match="org/tiny at revision v9 is not in the Hugging Face cache .* HF_HUB_OFFLINE"
    ):
        resolve_model("org/tiny", revision="v9")


def test_hub_gguf_repo_follows_the_gguf_rules(hub_cache: Path, gguf_of: Callable[..., Path]) -> None:
    snapshot = _snapshot(hub_cache, "org/tiny-GGUF", MAIN)
    gguf_of(snapshot / "tiny-Q8_0.gguf", Q.Q8_0, FT.MOSTLY_Q8_0)
    gguf_of(snapshot / "Q4_1" / "tiny-Q4_1.gguf", Q.Q4_1, FT.MOSTLY_Q4_1)  # hub repos nest files in folders
    default = resolve_model("org/tiny-GGUF")
    assert default.path.name == "tiny-Q4_1.gguf"  # "Q4_1/..." sorts before "tiny-..."
    assert default.config_dir is None
    assert resolve_model("org/tiny-GGUF", quantization_encoding="q8_0").path.name == "tiny-Q8_0.gguf"
    with pytest.raises(UserError, match=r"org/tiny-GGUF holds q4_1, q8_0"):
        resolve_model("org/tiny-GGUF", quantization_encoding="q5_1")


def test_hub_unknown_id_offline(hub_cache: Path) -> None:
    with pytest.raises(
        UserError, match=r"org/absent is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"
    ) as e:
        resolve_model("org/absent")
    assert "\n" not in str(e.value)


def test_hub_snapshot_with_no_model(hub_cache: Path) -> None:
    snapshot = _snapshot(hub_cache, "org/readme-only", MAIN)
    (snapshot / "README.md").write_text("hi")
    with pytest.raises(UserError, match=r"org/readme-only \(snapshot .*\) holds no model"):
        resolve_model("org/readme-only")


# --- which hub files to download (pure: the listing is given) ----------------------------------------------------

CHECKPOINT_REPO = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "onnx/model.onnx",
]
GGUF_REPO = [
    "README.md",
    "tiny-F16.gguf",
    "tiny-BF16.gguf",
    "tiny-Q4_K_M.gguf",
    "tiny-Q4_K_S.gguf",
    "tiny-Q8_0.gguf",
]


def test_choose_downloads_for_a_checkpoint() -> None:
    assert choose_downloads(CHECKPOINT_REPO, None) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    assert choose_downloads(CHECKPOINT_REPO, "bfloat16") == choose_downloads(CHECKPOINT_REPO, None)


def test_choose_downloads_for_gguf_files() -> None:
    assert choose_downloads(GGUF_REPO, None) == ["tiny-BF16.gguf"]  # first by name
    assert choose_downloads(GGUF_REPO, "q4_k") == ["tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf"]
    assert choose_downloads(GGUF_REPO, "float16") == ["tiny-F16.gguf"]  # not tiny-BF16
    # nothing is named float32: the first is downloaded and dequantized
    assert choose_downloads(GGUF_REPO, "float32") == ["tiny-BF16.gguf"]
    with pytest.raises(UserError, match="no GGUF file in the repository is named for it"):
        choose_downloads(GGUF_REPO, "q6_k")
    with pytest.raises(UserError, match="holds no \\*.safetensors checkpoint and no .gguf file"):
        choose_downloads(["README.md", "config.json", "pytorch_model.bin"], None)


def test_checkpoint_config_written_by_transformers_5(
    tmp_path: Path, make_checkpoint: Callable[..., Path]
) -> None:
    folder = _checkpoint(tmp_path / "ckpt", make_checkpoint, config={"dtype": "float16"})
    assert json.loads((folder / "config.json").read_text()) == {"dtype": "float16"}
    assert resolve_model(str(folder)).encoding == "float16"
