"""Images in requests (serve/images.py): reading a reference (data URLs of each format, files under the allowed
roots, never a remote URL), the limits and the 400s that name them, the digest, the prompt ids of a chat with
images against sequences built by hand with the tiny multimodal checkpoint's tokenizer, and the server end to end
with the fake engine (every bad image a 400 naming the problem, and the server still serving). (Past 400 lines: one
concern, the HTTP side of images, from the bytes to the prompt ids.)"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from maxjax.config import ImageLimits, ServerConfig
from maxjax.models.gemma3_vision import ImageProcessing
from maxjax.serve.app import ServingState
from maxjax.serve.chat import chat_prompt, tool_plan
from maxjax.serve.errors import ApiError
from maxjax.serve.fake_engine import FakeEngine
from maxjax.serve.images import ImageError, ImageRef, check_images, load_images, read_image
from maxjax.serve.protocol import VisionInfo
from maxjax.serve.schemas import ChatCompletionRequest, parse_request
from maxjax.serve.tool_use import ChatFeatures
from maxjax.tokenizer import Tokenizer, load_hf_tokenizer
from tests.serve_helpers import Server, running_server

FOLDER = Path(__file__).parent / "fixtures" / "arch" / "gemma3_multimodal"
BOI, EOI, IMAGE = 257, 258, 259
"""The tiny checkpoint's boi, eoi and image token ids (config.json); its vocabulary is byte-level, and 259 is also
the merge "he", so the texts below avoid "he"."""
NL = 13
"""The tiny vocabulary's "\\n"."""
BLOCK = [NL, NL, BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI, NL, NL]
"""One image as Gemma 3's processor writes it: "\\n\\n", boi, 4 image tokens (mm_tokens_per_image), eoi, "\\n\\n"."""
VISION = VisionInfo(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, tokens_per_image=4,
                    processing=ImageProcessing(height=32, width=32), max_images=3)  # fmt: skip
LIMITS = ImageLimits()


def picture(seed: int = 0, size: tuple[int, int] = (20, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def encoded(image: np.ndarray | Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def refused(url: str, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageError) as info:
        read_image(url, limits)
    return str(info.value)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds a few bytes of garbage for them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


# -- reading one image ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "options", "exact"), [
    ("PNG", {}, True),
    ("WEBP", {"lossless": True}, True),
    ("JPEG", {"quality": 95}, False),
])  # fmt: skip
def test_data_urls_of_each_format(fmt: str, options: dict[str, Any], exact: bool) -> None:
    image = picture()
    data = encoded(image, fmt, **options)
    got = read_image(data_url(data, f"image/{fmt.lower()}"), LIMITS)
    assert got.dtype == np.uint8 and got.shape == image.shape
    np.testing.assert_array_equal(got, image if exact else np.asarray(Image.open(io.BytesIO(data))))


def test_a_gif_is_its_first_frame_and_other_modes_become_rgb() -> None:
    red, blue = (Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 0, 255)))
    gif = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(gif)), "n_frames", 1) == 2
    got = read_image(data_url(gif, "image/gif"), LIMITS)
    assert got.shape == (6, 8, 3) and (got == [255, 0, 0]).all()
    gray = read_image(data_url(encoded(Image.new("L", (3, 2), 7), "PNG")), LIMITS)
    assert gray.shape == (2, 3, 3) and (gray == 7).all()
    rgba = read_image(data_url(encoded(Image.new("RGBA", (3, 2), (1, 2, 3, 0)), "PNG")), LIMITS)
    assert rgba.shape == (2, 3, 3) and (rgba == [1, 2, 3]).all()


def test_bad_data_urls_and_bytes_are_refused() -> None:
    assert "base64" in refused("data:image/png,rawbytes")
    assert "not valid base64" in refused("data:image/png;base64,@@@@")
    assert "not a PNG, JPEG, WebP or GIF" in refused(data_url(b"definitely not an image"))
    assert "not a PNG, JPEG, WebP or GIF" in refused(data_url(encoded(picture(), "BMP")))  # no other decoder runs
    truncated = encoded(picture(size=(64, 64)), "PNG")[:300]
    assert "could not be decoded" in refused(data_url(truncated))


def test_remote_and_unknown_references_are_refused_without_a_fetch() -> None:
    for url in ("http://example.com/cat.png", "HTTPS://example.com/cat.png"):
        message = refused(url)
        assert "does not fetch remote URLs" in message and "data:image/png;base64" in message
    assert "not an image this server reads" in refused("ftp://example.com/cat.png")
    assert "not an image this server reads" in refused("cat.png")
    assert "names host" in refused("file://otherhost/cat.png", ImageLimits(allowed_roots=(Path("/"),)))


def test_size_limits_are_refused_with_the_numbers() -> None:
    png = encoded(picture(), "PNG")
    assert "images may be at most 100 bytes" in refused(data_url(png), ImageLimits(max_bytes=100))
    message = refused(data_url(png), ImageLimits(max_pixels=100))
    assert "28 x 20 = 560 pixels" in message and "at most 100" in message


def test_too_many_pixels_are_refused_from_the_header_before_decoding() -> None:
    # The pixel data is garbage: decoding it would fail; the header alone refuses it first.
    assert "10000 x 5000 = 50,000,000 pixels" in refused(data_url(png_header(10_000, 5_000)))
    # Past Pillow's own decompression-bomb limit, which it checks while reading the header.
    assert "too many pixels" in refused(data_url(png_header(100_000, 100_000)))
    assert "could not be decoded" in refused(data_url(png_header(40, 30)))


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root holding a picture, and a directory beside it that is not allowed."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir()
    private.mkdir()
    (allowed / "cat.png").write_bytes(encoded(picture(), "PNG"))
    (private / "secret.png").write_bytes(encoded(picture(1), "PNG"))
    return allowed, private


def test_files_under_an_allowed_root_are_read(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    limits = ImageLimits(allowed_roots=(allowed,))
    for url in (str(allowed / "cat.png"), (allowed / "cat.png").as_uri(), f"file://localhost{allowed}/cat.png"):
        np.testing.assert_array_equal(read_image(url, limits), picture())
    (allowed / "my cat.png").write_bytes(encoded(picture(), "PNG"))
    np.testing.assert_array_equal(read_image((allowed / "my cat.png").as_uri(), limits), picture())  # %20


def test_files_outside_the_allowed_roots_are_refused(roots: tuple[Path, Path]) -> None:
    allowed, private = roots
    limits = ImageLimits(allowed_roots=(allowed,))
    assert "reads no local files" in refused(str(allowed / "cat.png"), ImageLimits())
    assert "outside the directories" in refused(str(private / "secret.png"), limits)
    assert "outside the directories" in refused(f"{allowed}/../private/secret.png", limits)
    assert "outside the directories" in refused("/etc/passwd", limits)
    (allowed / "escape.png").symlink_to(private / "secret.png")
    (allowed / "dir").symlink_to(private)
    assert "outside the directories" in refused(str(allowed / "escape.png"), limits)
    assert "outside the directories" in refused(str(allowed / "dir" / "secret.png"), limits)
    # Whether a file outside exists is not told: the same answer for one that does not.
    assert "outside the directories" in refused(str(private / "nothing.png"), limits)
    assert "no file" in refused(str(allowed / "nothing.png"), limits)
    (allowed / "sub").mkdir()
    assert "not a regular file" in refused(str(allowed / "sub"), limits)
    assert "images may be at most 10 bytes" in refused(str(allowed / "cat.png"),
                                                       ImageLimits(allowed_roots=(allowed,), max_bytes=10))


def test_the_limits_config_checks_its_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        ImageLimits(allowed_roots=(tmp_path / "missing",))
    with pytest.raises(ValueError, match="not a directory"):
        ImageLimits(allowed_roots=(Path("relative"),))
    with pytest.raises(ValueError, match="max_bytes 0"):
        ImageLimits(max_bytes=0)


# -- a request's images -----------------------------------------------------------------------------------------


def test_the_digest_is_the_pictures_however_it_was_sent(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    refs = [ImageRef(data_url(encoded(picture(), "PNG")), "a"), ImageRef(str(allowed / "cat.png"), "b"),
            ImageRef(data_url(encoded(picture(), "WEBP", lossless=True)), "c"), ImageRef(str(allowed / "cat.png"), "d"),
            ImageRef(data_url(encoded(picture(2), "PNG")), "e")]  # fmt: skip
    images = load_images(refs, VISION, ImageLimits(allowed_roots=(allowed,)))
    assert all(i.pixels.shape == (3, 32, 32) and i.pixels.dtype == np.float32 for i in images)
    assert len({i.digest for i in images[:4]}) == 1 and len(images[0].digest) == 16
    assert images[4].digest != images[0].digest


def test_a_bad_image_is_a_400_naming_it() -> None:
    refs = [ImageRef(data_url(encoded(picture(), "PNG")), "messages[0].content[0]"),
            ImageRef("https://example.com/x.png", "messages[2].content[1]")]  # fmt: skip
    with pytest.raises(ApiError) as info:
        load_images(refs, VISION, LIMITS)
    assert info.value.status == 400 and info.value.param == "messages[2].content[1]"
    assert info.value.message.startswith("Image 2 (messages[2].content[1]): this server does not fetch remote URLs")


def test_image_count_and_text_only_models() -> None:
    assert check_images(3, VISION) is VISION
    with pytest.raises(ApiError, match="at most 3 in one request") as info:
        check_images(4, VISION)
    assert info.value.param == "messages"
    with pytest.raises(ApiError, match="does not take images") as info:
        check_images(1, None)
    assert info.value.param == "messages"


# -- the prompt -------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny() -> Tokenizer:
    return load_hf_tokenizer(FOLDER)


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    """A text without special tokens in the tiny byte-level vocabulary: one id per byte, +3 (no merge but "he")."""
    assert "he" not in text
    return [b + 3 for b in text.encode()]


def image(url: str = "data:,") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def prompt(tok: Tokenizer, messages: list[dict[str, Any]], vision: VisionInfo | None = VISION) -> list[int]:
    request = parse_request(ChatCompletionRequest, {"messages": messages}, vocab_size=tok.vocab_size)
    plan = tool_plan(tok, request, ChatFeatures.for_tokenizer(tok))
    return chat_prompt(tok, request, plan, vision=vision)[1]


def test_prompt_ids_with_one_and_two_images(tiny: Tokenizer) -> None:
    start, end = 1, 2  # <|im_start|>, <|im_end|>: the tiny template is ChatML over a string (images: a marker)
    one = [{"role": "user", "content": [image(), {"type": "text", "text": "Describe it."}]}]
    assert prompt(tiny, one) == [start, *ids_of(tiny, "user\n"), *BLOCK, *ids_of(tiny, "\nDescribe it."), end,
                                 *ids_of(tiny, "\n"), start, *ids_of(tiny, "assistant\n")]  # fmt: skip
    two: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Compare"}, image(),
                                                              {"type": "text", "text": "and"}, image()]}]  # fmt: skip
    assert prompt(tiny, two) == [
        start, *ids_of(tiny, "system\nBe brief."), end, *ids_of(tiny, "\n"),
        start, *ids_of(tiny, "user\nCompare\n"), *BLOCK, *ids_of(tiny, "\nand\n"), *BLOCK, end, *ids_of(tiny, "\n"),
        start, *ids_of(tiny, "assistant\n"),
    ]  # fmt: skip
    # Text alone: the ids the template's text encodes to, as ever.
    text = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert prompt(tiny, text) == tiny.encode(tiny.apply_chat_template([{"role": "user", "content": "a\nb"}]))


GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
"""Gemma 3's chat template (google/gemma-3-*-it): it loops over content parts and writes `<start_of_image>` for an
image part."""
TINY_GEMMA3 = (GEMMA3_TEMPLATE.replace("<start_of_turn>", "<|im_start|>").replace("<end_of_turn>", "<|im_end|>")
               .replace("<start_of_image>", "<|endoftext|>"))  # fmt: skip
"""The same over the tiny vocabulary's special tokens (its boi is a byte, so `<|endoftext|>`, id 0, stands in for
`<start_of_image>`)."""


def test_gemma3s_template_places_the_images_where_it_writes_the_boi_token(tiny: Tokenizer) -> None:
    tiny.set_chat_template(TINY_GEMMA3)
    vision = VisionInfo(image_token_id=IMAGE, boi_token_id=0, eoi_token_id=EOI, tokens_per_image=2,
                        processing=VISION.processing, max_images=3)  # fmt: skip
    parts = [image(), {"type": "text", "text": " Describe "}, image(), image()]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    # As Gemma 3's processor tokenizes its expanded text whole: the newlines it adds go in with the text beside
    # them ("\n\n" + "\n\n" between two images), which Gemma's vocabulary merges ("\n\n\n\n" is one token).
    block = [0, IMAGE, IMAGE, EOI]
    assert prompt(tiny, messages, vision) == [
        1, 1, *ids_of(tiny, "user\nBe brief.\n\n\n\n"), *block, *ids_of(tiny, "\n\nDescribe\n\n"), *block,
        *ids_of(tiny, "\n\n\n\n"), *block, *ids_of(tiny, "\n\n"), 2, *ids_of(tiny, "\n"), 1, *ids_of(tiny, "model\n"),
    ]  # fmt: skip


def test_a_template_that_drops_images_or_text_with_the_image_token_is_a_400(tiny: Tokenizer) -> None:
    tiny.set_chat_template("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}")
    with pytest.raises(ApiError, match="left 0 places for images in the prompt, and the messages carry 1"):
        prompt(tiny, [{"role": "user", "content": [image(), {"type": "text", "text": "x"}]}])
    tiny = load_hf_tokenizer(FOLDER)
    with pytest.raises(ApiError, match="holds the image placeholder token") as info:
        prompt(tiny, [{"role": "user", "content": [image(), {"type": "text", "text": "hello"}]}])
    assert info.value.param == "messages"
    with pytest.raises(ApiError, match="does not take images"):
        prompt(tiny, [{"role": "user", "content": [image()]}], vision=None)


# -- the server -------------------------------------------------------------------------------------------------


def serve(tok: Tokenizer, vision: VisionInfo | None, config: ServerConfig | None = None) -> Any:
    engine = FakeEngine(ids_of(tok, " abc"), eos_token_id=2, model_name="m", max_model_len=128, vision=vision)
    state = ServingState(model_name="m")
    state.set_ready(engine, tok)
    return running_server(state, config)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "cat.png").write_bytes(encoded(picture(), "PNG"))
    return root


@pytest.fixture(scope="module")
def server(allowed: Path) -> Iterator[Server]:
    config = ServerConfig(host="127.0.0.1", port=0, images=ImageLimits(allowed_roots=(allowed,), max_bytes=4096))
    with serve(load_hf_tokenizer(FOLDER), VISION, config) as srv:
        yield srv


def client(srv: Server) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, _strict_response_validation=True)


def user(*parts: Any) -> list[Any]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe it."}]}]


def test_a_chat_with_images_reaches_the_engine(server: Server, allowed: Path) -> None:
    engine = server.state.engine
    assert isinstance(engine, FakeEngine)
    png = data_url(encoded(picture(), "PNG"))
    out = client(server).chat.completions.create(
        model="m", messages=user(image(png), {"type": "image_url", "image_url": str(allowed / "cat.png")}),
        max_tokens=3, n=2,
    )
    assert len(out.choices) == 2 and out.usage is not None
    request = engine.requests[-1]
    assert len(request.images) == 2 and request.images[0].digest == request.images[1].digest
    assert request.prompt_ids.count(IMAGE) == 8 and out.usage.prompt_tokens == len(request.prompt_ids)
    assert engine.requests[-2].images == request.images  # each choice carries them
    counted = httpx.post(server.url + "/tokenize", json={"messages": user(image(png), image(png))}).json()
    assert counted["tokens"] == list(request.prompt_ids)

    response = client(server).responses.create(model="m", max_output_tokens=3, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": png, "detail": "auto"},
                                     {"type": "input_text", "text": "Describe it."}]}])  # fmt: skip
    assert response.status in ("completed", "incomplete")
    assert len(engine.requests[-1].images) == 1 and engine.requests[-1].images[0].digest == request.images[0].digest
    again = client(server).responses.create(model="m", max_output_tokens=3, previous_response_id=response.id,
                                            input="And now?")  # fmt: skip
    assert again.status in ("completed", "incomplete") and len(engine.requests[-1].images) == 1  # the earlier turn's


BAD_IMAGES = [
    (image("https://example.com/cat.png"), "messages[0].content[0]", "does not fetch remote URLs"),
    (image("/etc/passwd"), "messages[0].content[0]", "outside the directories"),
    (image(data_url(b"corrupt")), "messages[0].content[0]", "not a PNG, JPEG, WebP or GIF"),
    (image(data_url(encoded(picture(size=(64, 64)), "PNG"))), "messages[0].content[0]", "at most 4,096 bytes"),
    (image(data_url(png_header(10_000, 5_000))), "messages[0].content[0]", "50,000,000 pixels"),
    ({"type": "image_url", "image_url": {"url": "data:,", "detail": "huge"}}, "messages[0].content", "detail"),
    ({"type": "image_url", "image_url": {}}, "messages[0].content", "an image part must look like"),
]  # fmt: skip


@pytest.mark.parametrize(("part", "param", "message"), BAD_IMAGES)
def test_bad_images_are_400s_naming_the_problem(server: Server, part: dict[str, Any], param: str,
                                                message: str) -> None:
    reply = httpx.post(server.base_url + "/chat/completions", json={"messages": user(part), "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]
    ok = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None  # still serving


def test_too_many_images_and_a_dropped_image_are_400s(server: Server) -> None:
    png = image(data_url(encoded(picture(), "PNG")))
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="m", messages=user(png, png, png, png), max_tokens=2)
    assert info.value.param == "messages" and "at most 3 in one request" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        history: Any = [{"role": "assistant", "content": [png]}, {"role": "user", "content": "Hi"}]
        client(server).chat.completions.create(model="m", max_tokens=2, messages=history)
    assert "only allowed in user messages" in info.value.message
    reply = httpx.post(server.base_url + "/responses", json={"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://example.com/a.png"}]}]})  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input"
    assert "does not fetch remote URLs" in reply.json()["error"]["message"]
    reply = httpx.post(server.base_url + "/responses", json={"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-123"}]}]})  # fmt: skip
    assert reply.status_code == 400 and "file_id" in reply.json()["error"]["message"]


def test_a_text_only_model_refuses_images() -> None:
    png = image(data_url(encoded(picture(), "PNG")))
    with serve(load_hf_tokenizer(FOLDER), None) as srv:
        with pytest.raises(openai.BadRequestError) as info:
            client(srv).chat.completions.create(model="m", messages=user(png), max_tokens=2)
        assert info.value.param == "messages" and "does not take images" in info.value.message
        reply = httpx.post(srv.base_url + "/responses", json={"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": png["image_url"]["url"]}]}]})  # fmt: skip
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "input"
        assert client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2).choices  # fmt: skip


def test_the_body_limit_is_a_413_that_says_so() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, images=ImageLimits(max_body_bytes=2000))
    with serve(load_hf_tokenizer(FOLDER), VISION, config) as srv:
        png = image(data_url(encoded(picture(size=(40, 40)), "PNG")))
        reply = httpx.post(srv.base_url + "/chat/completions", json={"messages": user(png)})
        assert reply.status_code == 413 and "larger than the 2,000 bytes" in reply.json()["error"]["message"]
