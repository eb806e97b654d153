"""Gemma 3 with images from GGUF: llama.cpp's `gemma3` text model and its mmproj file beside it, both written from
the tiny checkpoint in tests/fixtures/arch/gemma3_multimodal/, through the engine against the safetensors one.

The files are what llama.cpp's converter writes at F32 (tests/gguf_writer.py): the language model's tensors as
they are, its norms with Gemma's 1 added (`w + 1`, taken off at load; the model multiplies by 1 + w, which that
round trip gives back to float32's rounding); the vision tower F32 too, except `mm.input_projection`, which the
converter always stores in F16. That rounding is the one real difference from the safetensors model, so the
engine's logprobs are compared twice: within `ROUNDED_TOLERANCE` of the safetensors model whose vision weights are
rounded as the file holds them, and within `F16_TOLERANCE` of the plain one (and of transformers' logits) at and
after the first image, and as closely as the first before it, which the projection does not reach.

An mmproj file does not name the text model's image tokens: the model's vocabulary does (Gemma 3's
`<start_of_image>`, `<end_of_image>`, `<image_soft_token>`; llama.cpp writes no metadata for them). The tiny
checkpoint's ids 257, 258, 259 are "þ", "ÿ" (bytes 0xFE and 0xFF) and the merge "he" in its byte-level
vocabulary, so the GGUF's tokenizer names them there (`tokenizer_metadata`); Gemma 3's own ids (255999, 256000,
262144) are past its end, which is a UserError when the vocabulary does not name them.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from maxjax.cli import main
from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.errors import UserError
from maxjax.hub import resolve_model
from maxjax.models.gemma3_vision import ImageProcessing, VisionConfig
from maxjax.pipeline import LoadedModel, build_model, load_model, open_checkpoint
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.protocol import GenerationRequest, RequestRejected, SamplingParams, TokenLogprob
from maxjax.weights.mmproj import find_mmproj
from tests.gguf_writer import TOKENIZER_METADATA, TOKENS, Q, write_gguf, write_mmproj
from tests.test_mmproj import as_stored, hf_config, hf_weights, preprocessor
from tests.test_vision import FOLDER, TOLERANCE, reference
from tests.test_vision_engine import image, log_softmax, prompt, run

ROUNDED_TOLERANCE = 1e-5
"""GGUF vs the safetensors model with the same F16 projection: the same weights, the same computation, so float32
noise at most (measured: 0)."""
F16_TOLERANCE = 2e-2
"""GGUF vs the plain safetensors model, from the first image on. F16 keeps each projection weight to 2^-11 of
itself; the soft tokens move by up to 1.9e-4 of their largest (measured: 4.1e-4 of 2.2), and this random model's
logits reach +-80 (Gemma scales its embeddings by sqrt(hidden)), so to first order the logprobs move by about
80 x 1.9e-4 = 1.5e-2 at most. Measured: 9.9e-3 at most, at the image's own positions, 2.7e-3 after it. A misplaced or
wrong image moves them by more than 0.1 (tests/test_vision_engine.py)."""
IMAGE_TOKENS = {257: "<start_of_image>", 258: "<end_of_image>", 259: "<image_soft_token>"}
"""The tiny checkpoint's boi, eoi and image token ids (its config.json) and Gemma 3's names for them."""
IMAGE_TOKEN = 259
"""Its image placeholder, where the soft tokens go."""
FREE_BYTE = 0xC0
"""A byte that never occurs in UTF-8 text: its token spells "he" instead, so the merge "h e" keeps its result."""


def tokenizer_metadata() -> dict[str, Any]:
    """The tiny checkpoint's byte-level tokenizer (`TOKENIZER_METADATA`) with Gemma 3's image tokens named at its
    ids 257-259, as control tokens: the bytes 0xFE and 0xFF they displace never occur in UTF-8 text, and "he"
    moves to the token of the byte 0xC0, which does not either."""
    tokens, types = list(TOKENS), list(TOKENIZER_METADATA["tokenizer.ggml.token_type"])
    tokens[3 + FREE_BYTE] = "he"  # three control tokens, then the bytes in order
    for i, name in IMAGE_TOKENS.items():
        tokens[i], types[i] = name, 3
    return TOKENIZER_METADATA | {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def language_model() -> dict[str, np.ndarray]:
    """The checkpoint's language model under `Gemma3ForCausalLM`'s names, as llama.cpp's converter takes them
    (`language_model.` dropped, the vision tower and projector left to the mmproj file)."""
    weights = load_file(FOLDER / "model.safetensors")
    return {name.removeprefix("language_model."): w for name, w in weights.items() if name.startswith("language_model.")}


def write_text_model(path: Path, tokenizer: dict[str, Any] | None = None) -> Path:
    write_gguf(path, "gemma3", hf_config(), language_model(), Q.F32, name="gemma-3-tiny",
               tokenizer=tokenizer_metadata() if tokenizer is None else tokenizer)
    return path


def write_projector(path: Path, config: dict[str, Any] | None = None,
                    weights: dict[str, np.ndarray] | None = None) -> Path:
    """The checkpoint's vision tower as llama.cpp's mmproj file, F32 where the converter allows."""
    write_mmproj(path, config or hf_config(), preprocessor(), weights or hf_weights(), Q.F32)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gemma-3-tiny-f32.gguf, its mmproj-gemma-3-tiny-f32.gguf beside it."""
    folder = tmp_path_factory.mktemp("gguf")
    write_projector(folder / "mmproj-gemma-3-tiny-f32.gguf")
    return write_text_model(folder / "gemma-3-tiny-f32.gguf")


@cache
def safetensors(rounded: bool) -> LoadedModel:
    """The safetensors checkpoint; `rounded`: its vision weights rounded through the types the mmproj file holds
    them in (the projection F16, the rest F32)."""
    checkpoint = open_checkpoint(resolve_model(str(FOLDER)))
    if rounded:
        checkpoint.vision = dataclasses.replace(checkpoint.vision, get=lambda name: as_stored(name, Q.F32))
    return build_model(checkpoint, platform="cpu")


def engine(loaded: LoadedModel) -> EngineCore:
    return EngineCore.create(loaded, jax.devices("cpu")[0],
                             SchedulerConfig(max_batch_size=4, max_length=64, prefill_chunk_size=16),
                             KVCacheConfig(num_pages=32))  # fmt: skip


def logprobs(loaded: LoadedModel) -> dict[str, list[TokenLogprob]]:
    """For the recorded prompts "one" and "two" with their images: the top 5 logprobs at every position (the
    prompt's, then the first answer token's), as tests/test_vision_engine.py reads them."""
    core = engine(loaded)
    got = {}
    for name, n in (("one", 1), ("two", 2)):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5, logprobs=5)
        out = run(core, GenerationRequest(name, prompt(name), params, images=tuple(image(i) for i in range(n))))[name]
        assert out[0].prompt_logprobs is not None and out[0].logprobs is not None
        got[name] = [*out[0].prompt_logprobs[1:], out[0].logprobs[0]]  # position p's logprobs score token p + 1
    return got  # type: ignore[return-value]


def differences(a: list[TokenLogprob], b: list[TokenLogprob]) -> np.ndarray:
    """The largest logprob difference at each position, over the tokens both top 5s hold: the same 5 tokens (in
    either order: the rounding may swap a near-tie), the same first."""
    out = []
    for ea, eb in zip(a, b, strict=True):
        top_a, top_b = dict(ea.top), dict(eb.top)
        assert top_a.keys() == top_b.keys() and ea.top[0][0] == eb.top[0][0]
        out.append(max(abs(lp - top_b[t]) for t, lp in top_a.items()))
    return np.array(out)


def test_the_text_file_holds_the_checkpoints_language_model(model_file: Path) -> None:
    """F32 throughout, the norms with the 1 added: the file holds the safetensors weights."""
    reader = gguf.GGUFReader(model_file)
    assert {Q(t.tensor_type) for t in reader.tensors} == {Q.F32}
    stored = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    weights = language_model()
    assert np.array_equal(stored["token_embd.weight"], weights["model.embed_tokens.weight"])
    assert np.array_equal(stored["blk.0.attn_norm.weight"], weights["model.layers.0.input_layernorm.weight"] + 1)
    assert np.array_equal(stored["blk.5.ffn_down.weight"], weights["model.layers.5.mlp.down_proj.weight"])
    mmproj = find_mmproj(model_file)
    assert mmproj is not None and mmproj.name == "mmproj-gemma-3-tiny-f32.gguf"
    projector = gguf.GGUFReader(mmproj)
    types = {t.name: Q(t.tensor_type) for t in projector.tensors}
    assert types.pop("mm.input_projection.weight") == Q.F16 and set(types.values()) == {Q.F32}


def test_the_mmproj_beside_the_model_is_its_vision_tower(model_file: Path) -> None:
    loaded = load_model(resolve_model(str(model_file)), platform="cpu")
    assert loaded.vision is not None
    hf_cfg = VisionConfig.from_hf(hf_config())
    assert loaded.vision.config == hf_cfg  # image tokens 259, 257, 258 included: named by the vocabulary
    pre = json.loads((FOLDER / "preprocessor_config.json").read_text())
    assert loaded.vision.processing == ImageProcessing.from_hf(pre, hf_cfg)
    assert loaded.tokenizer.token_text(259) == "<image_soft_token>"


def test_logprobs_with_images_equal_the_safetensors_models(model_file: Path) -> None:
    got = logprobs(load_model(resolve_model(str(model_file)), platform="cpu"))
    rounded, plain = logprobs(safetensors(rounded=True)), logprobs(safetensors(rounded=False))
    for name in ("one", "two"):
        seen = prompt(name).index(IMAGE_TOKEN)  # the first soft token: the positions before it see no image
        want = log_softmax(reference()[1][f"logits_{name}"])
        to_transformers = np.array([max(abs(lp - want[p, t]) for t, lp in e.top) for p, e in enumerate(got[name])])
        to_rounded, to_plain = differences(got[name], rounded[name]), differences(got[name], plain[name])
        print(f"{name}: max |logprob difference| {to_rounded.max():.2e} from the F16-rounded safetensors model, "
              f"{to_plain.max():.2e} from the plain one, {to_transformers.max():.2e} from transformers")
        assert to_rounded.max() <= ROUNDED_TOLERANCE
        assert to_plain[:seen].max() <= ROUNDED_TOLERANCE and to_transformers[:seen].max() <= TOLERANCE
        assert 10 * ROUNDED_TOLERANCE < to_plain[seen:].max() <= F16_TOLERANCE  # the rounding shows, no more
        assert to_transformers.max() <= TOLERANCE + F16_TOLERANCE
        assert [e.top[0][0] for e in got[name]] == want.argmax(-1).tolist()


def test_mmproj_named_elsewhere(model_file: Path, tmp_path: Path) -> None:
    """`--mmproj` names a file that is not beside the model: the pipeline takes it, and the CLI hands it there."""
    text = write_text_model(tmp_path / "gemma-3-tiny-f32.gguf")
    assert find_mmproj(text) is None
    elsewhere = find_mmproj(model_file)
    assert elsewhere is not None
    loaded = load_model(resolve_model(str(text)), platform="cpu", mmproj=elsewhere)
    assert loaded.vision is not None and loaded.vision.config == VisionConfig.from_hf(hf_config())
    beside = load_model(resolve_model(str(model_file)), platform="cpu")
    pixels = jnp.asarray(reference()[1]["pixel_values"])
    named, found = (np.asarray(m.model.vision(pixels)) for m in (loaded, beside))  # type: ignore[attr-defined]
    assert np.array_equal(named, found)


def test_the_cli_hands_mmproj_to_the_server(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("maxjax.serve.launch.run_server", lambda config, **kwargs: seen.update(kwargs))
    elsewhere = find_mmproj(model_file)
    result = CliRunner().invoke(main, ["serve", "--model", str(model_file), "--mmproj", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert seen["mmproj"] == elsewhere
    result = CliRunner().invoke(main, ["serve", "--model", str(model_file), "--mmproj", str(model_file.parent / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_a_text_model_alone_takes_no_images(tmp_path: Path) -> None:
    text = write_text_model(tmp_path / "gemma-3-tiny-f32.gguf")
    loaded = load_model(resolve_model(str(text)), platform="cpu")
    assert loaded.vision is None and getattr(loaded.model, "vision", None) is None  # no tower built
    core = engine(loaded)
    assert core.vision is None
    with pytest.raises(RequestRejected, match="does not take images"):
        core.admit(GenerationRequest("a", prompt("one"), SamplingParams(max_tokens=1), images=(image(0),)))


def one_line(error: pytest.ExceptionInfo[UserError], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_a_projector_of_another_width_is_one_clear_line(tmp_path: Path) -> None:
    """An mmproj file that projects to 48 where the model is 64 wide: opened (its header is whole), refused when
    the model is built."""
    config = hf_config()
    config = config | {"text_config": config["text_config"] | {"hidden_size": 48}}
    weights = dict(hf_weights())
    weights["multi_modal_projector.mm_input_projection_weight"] = np.ones((32, 48), np.float32)
    mmproj = write_projector(tmp_path / "mmproj-other-f32.gguf", config, weights)
    text = write_text_model(tmp_path / "gemma-3-tiny-f32.gguf")
    checkpoint = open_checkpoint(resolve_model(str(text)))  # found beside it
    assert checkpoint.vision is not None and checkpoint.vision.config.text_hidden_size == 48
    with pytest.raises(UserError) as error:
        build_model(checkpoint, platform="cpu")
    one_line(error, str(text), "48 wide", "64", "--mmproj")
    assert find_mmproj(text) == mmproj


def test_a_vocabulary_without_the_image_tokens_is_one_clear_line(tmp_path: Path) -> None:
    """The tiny vocabulary as it is (no `<image_soft_token>` ...): Gemma 3's ids would be past its 260 tokens."""
    write_projector(tmp_path / "mmproj-gemma-3-tiny-f32.gguf")
    text = write_text_model(tmp_path / "gemma-3-tiny-f32.gguf", TOKENIZER_METADATA)
    with pytest.raises(UserError) as error:
        open_checkpoint(resolve_model(str(text)))
    one_line(error, "mmproj-gemma-3-tiny-f32.gguf", "260 tokens", "<image_soft_token> (Gemma 3's id 262144)",
             "<start_of_image> (Gemma 3's id 255999)")
