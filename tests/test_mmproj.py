"""Gemma 3's vision tower from llama.cpp's split mmproj GGUF file (`gemma3_mmproj`), against the safetensors one.

tests/gguf_writer.py's `write_mmproj` writes the tiny checkpoint in tests/fixtures/arch/gemma3_multimodal/ as
llama.cpp's converter does; the model read back must compute what the safetensors-loaded model computes, from
weights rounded the way the file stores them (the converter always stores the projection in F16).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from maxjax.errors import UserError
from maxjax.models import gemma3_mmproj
from maxjax.models.gemma3_mmproj import image_token_ids, load_mmproj, read_mmproj, tensor_table
from maxjax.models.gemma3_vision import (
    ImageProcessing,
    VisionConfig,
    build_vision_model,
    load_params,
    open_vision,
    vision_name_to_hf,
)
from maxjax.weights.gguf import GGUFFile
from maxjax.weights.mmproj import find_mmproj
from tests.gguf_writer import Q, mmproj_storage, write_mmproj
from tests.test_vision import FOLDER, reference, vision_model

TOLERANCE = 1e-5
TOKEN_IDS = {"image_token_id": 259, "boi_token_id": 257, "eoi_token_id": 258}
"""The tiny checkpoint's (config.json's image_token_index, ...); its byte-level vocabulary does not name them."""


def hf_config() -> dict[str, Any]:
    return json.loads((FOLDER / "config.json").read_text())


def preprocessor() -> dict[str, Any]:
    """preprocessor_config.json with the `image_seq_length` the Hub's Gemma 3 ones carry (256 there): llama.cpp's
    converter derives the pooling from it, not from config.json's mm_tokens_per_image."""
    return json.loads((FOLDER / "preprocessor_config.json").read_text()) | {
        "image_seq_length": hf_config()["mm_tokens_per_image"]}


@cache
def hf_weights() -> dict[str, np.ndarray]:
    """The checkpoint's vision tensors under `load_params`'s names."""
    return {hf: w for name, w in load_file(FOLDER / "model.safetensors").items()
            if (hf := vision_name_to_hf(name)) is not None}


def write(path: Path, qtype: gguf.GGMLQuantizationType = Q.F32, **kwargs: Any) -> Path:
    write_mmproj(path, hf_config(), preprocessor(), hf_weights(), qtype, **kwargs)
    return path


def as_stored(hf_name: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The safetensors weight rounded through the type the converter stores it in."""
    w = hf_weights()[hf_name]
    stored = mmproj_storage(tensor_table(VisionConfig.from_hf(hf_config()))[hf_name][0], w, qtype)
    return gguf.quants.dequantize(gguf.quants.quantize(w, stored), stored).reshape(w.shape)


def test_config_and_image_processing_equal_the_checkpoints(tmp_path: Path) -> None:
    cfg, proc = read_mmproj(write(tmp_path / "mmproj-tiny-f32.gguf"), TOKEN_IDS)
    hf_cfg = VisionConfig.from_hf(hf_config())
    assert cfg == hf_cfg
    pre = json.loads((FOLDER / "preprocessor_config.json").read_text())
    assert proc == ImageProcessing.from_hf(pre, hf_cfg)


def test_f32_file_matches_the_safetensors_model(tmp_path: Path) -> None:
    _, arrays = reference()
    pixels = jnp.asarray(arrays["pixel_values"])
    model, _ = load_mmproj(write(tmp_path / "mmproj.gguf"), TOKEN_IDS)
    hidden = np.asarray(model.encode(pixels))
    tower_err = float(np.abs(hidden - np.asarray(vision_model().encode(pixels))).max())
    # the projection is F16 in every file the converter writes: the reference rounds it the same way
    rounded = build_vision_model(model.cfg, load_params(model.cfg, lambda name: as_stored(name, Q.F32)))
    err = float(np.abs(np.asarray(model(pixels)) - np.asarray(rounded(pixels))).max())
    print(f"tower max |error| {tower_err:.2e}, soft tokens max |error| {err:.2e}")
    assert tower_err <= TOLERANCE and err <= TOLERANCE
    assert float(np.abs(hidden - arrays["vision_hidden"]).max()) <= 1e-4  # and transformers' own


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["f16", "q8_0"])
def test_quantized_files_match_the_rounded_weights(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    _, arrays = reference()
    pixels = jnp.asarray(arrays["pixel_values"])
    path = write(tmp_path / "mmproj.gguf", qtype)
    assert {GGUFFile(path).tensor_info("v.blk.0.attn_q.weight").ggml_type} == {qtype}
    model, _ = load_mmproj(path, TOKEN_IDS)
    expected = build_vision_model(model.cfg, load_params(model.cfg, lambda name: as_stored(name, qtype)))
    err = float(np.abs(np.asarray(model(pixels)) - np.asarray(expected(pixels))).max())
    print(f"{qtype.name}: soft tokens max |error| {err:.2e}")
    assert err <= TOLERANCE


def test_names_agree_with_gguf_py() -> None:
    cfg = VisionConfig.from_hf(hf_config())
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, cfg.num_layers)
    ours = tensor_table(cfg)
    assert ours.keys() == hf_weights().keys()
    for hf_name, (name, shape) in ours.items():
        hub_name = hf_name.replace("vision_tower.", "vision_tower.vision_model.").replace("_weight", ".weight")
        assert table.get_name(hub_name, try_suffixes=(".weight", ".bias")) == name
        assert hf_weights()[hf_name].shape == shape


def test_default_pooling_is_gemma3s_256_tokens() -> None:
    """A Hub-sized file (896 pixels, 14-pixel patches) without clip.vision.projector.scale_factor pools 4 x 4."""
    meta = {"clip.vision.image_size": 896, "clip.vision.patch_size": 14, "clip.vision.embedding_length": 1152,
            "clip.vision.feed_forward_length": 4304, "clip.vision.block_count": 27,
            "clip.vision.attention.head_count": 16, "clip.vision.attention.layer_norm_epsilon": 1e-6}
    shapes = {"mm.input_projection.weight": (1152, 2560), "v.patch_embd.weight": (1152, 3, 14, 14)}
    cfg = gemma3_mmproj.config_from_mmproj(meta, shapes)
    assert (cfg.mm_tokens_per_image, cfg.text_hidden_size, cfg.image_token_id) == (256, 2560, 262_144)


def test_token_ids_come_from_the_vocabulary() -> None:
    vocab = ["<pad>", "<start_of_image>", "x", "<end_of_image>", "<image_soft_token>"]
    assert image_token_ids(vocab) == {"boi_token_id": 1, "eoi_token_id": 3, "image_token_id": 4}
    assert image_token_ids(["a", "b"]) == {}


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_mmproj(path, TOKEN_IDS)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_wrong_projector_type_is_one_clear_line(tmp_path: Path) -> None:
    path = write(tmp_path / "mmproj.gguf", projector_type="qwen2vl_merger")
    one_line_error(path, "'qwen2vl_merger' projector, but this model needs 'gemma3'.*--mmproj")


def test_missing_tensor_is_one_clear_line(tmp_path: Path) -> None:
    one_line_error(write(tmp_path / "a.gguf", skip=("v.post_ln.weight",)), "has no tensor v.post_ln.weight")
    one_line_error(write(tmp_path / "b.gguf", skip=("mm.input_projection.weight",)),
                   "has no 2-D tensor mm.input_projection.weight")


def test_a_text_model_or_a_truncated_file_is_one_clear_line(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(text), "gemma3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(text, "general.architecture is 'gemma3', not 'clip'")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write(tmp_path / "whole.gguf").read_bytes()[:-100])
    one_line_error(cut, "truncated")


def test_open_checkpoint_is_what_the_pipeline_builds(tmp_path: Path) -> None:
    """`gemma3_vision.open_vision` with an mmproj file: the header read at once, the tensors when built; the
    token ids from the model's tokenizer, where it names them."""
    _, arrays = reference()
    pixels = jnp.asarray(arrays["pixel_values"])
    path = write(tmp_path / "mmproj.gguf")
    checkpoint = open_vision(None, None, path, None)
    assert checkpoint is not None and checkpoint.config.image_token_id == 262_144  # Gemma 3's, unnamed here
    model, _ = load_mmproj(path)
    assert np.array_equal(np.asarray(checkpoint.build()(pixels)), np.asarray(model(pixels)))

    class Backend:
        def token_to_id(self, token: str) -> int | None:
            return {"<image_soft_token>": 259, "<start_of_image>": 257, "<end_of_image>": 258}.get(token)

    class Tokenizer:
        backend = Backend()

    assert gemma3_mmproj.open_checkpoint(path, Tokenizer()).config == VisionConfig.from_hf(hf_config())


def test_mismatched_tensor_is_one_clear_line(tmp_path: Path) -> None:
    weights = dict(hf_weights())
    weights["vision_tower.encoder.layers.0.mlp.fc1.weight"] = np.zeros((32, 32), np.float32)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(path, hf_config(), preprocessor(), weights, Q.F32)
    one_line_error(path, r"tensor v.blk.0.ffn_up.weight has shape \[32, 32\].*gives it \[64, 32\]")


def test_find_mmproj(tmp_path: Path) -> None:
    model = tmp_path / "gemma-3-4b-it-Q4_K_M.gguf"
    model.touch()
    assert find_mmproj(model) is None
    (tmp_path / "mmproj.txt").touch()
    assert find_mmproj(model) is None
    (tmp_path / "gemma-3-4b-it-MMPROJ-Q8_0.gguf").touch()
    assert find_mmproj(model) == tmp_path / "gemma-3-4b-it-MMPROJ-Q8_0.gguf"
    for name in ("mmproj-F32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf"):
        (tmp_path / name).touch()
    assert find_mmproj(model) == tmp_path / "mmproj-F16.gguf"
    assert find_mmproj(tmp_path) == tmp_path / "mmproj-F16.gguf"  # a folder: the one in it
    assert find_mmproj(tmp_path / "mmproj-F16.gguf") != tmp_path / "mmproj-F16.gguf"  # never the model itself
    assert find_mmproj(tmp_path / "missing" / "model.gguf") is None
