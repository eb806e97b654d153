"""A request's images: from what the client sent to the pixels the vision tower takes, and their places in the prompt.

The path of one image (chat's `image_url` part, the Responses API's `input_image`), in a worker thread
(`asyncio.to_thread`: decoding a large JPEG takes a tenth of a second), before the request reaches the engine
(`read_image` is steps 1 and 2, `load_images` all three):

1. `_encoded`: the image's bytes. A `data:` URL (base64) is decoded. A local file (a `file://` URL or an absolute
   path) is read only from under `ImageLimits.allowed_roots`, its symlinks and `..` resolved before the check, and
   only when it is a regular file. A remote URL (`http(s)://`) is never fetched.
2. `_decoded`: Pillow reads the header (PNG, JPEG, WebP or GIF; no other decoder is tried), the pixel count is
   checked before a pixel is decoded (a decompression bomb costs a header read), then the first frame becomes RGB.
3. `gemma3_vision.preprocess_images` resizes, rescales and normalizes it as the checkpoint's processor config says;
   `digest` hashes the result, so the same picture is the same image to the engine's caches however it was sent.

Every refusal is a 400 that names the image and the problem (`param`: where it is in the request). Images are
read one at a time, so one full-size decode is held at once.

`image_prompt_ids` is the other half: the rendered prompt, in which the chat template left a marker where each
image goes, tokenized with each marker replaced by the image's block of placeholder tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maxjax.config import ImageLimits
from maxjax.serve.errors import ApiError
from maxjax.serve.protocol import ImageInput, VisionInfo

if TYPE_CHECKING:
    from maxjax.serve.text import TextTokenizer

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
"""The decoders Pillow may use; an image in any other format is refused before a decoder runs."""
IMAGE_BREAK = "\n\n"
"""What Gemma 3's processor writes before and after each image's block (its `full_image_sequence`)."""


@dataclass(frozen=True)
class ImageRef:
    """One image as the request names it."""

    url: str
    """A `data:` URL, a `file://` URL or an absolute path (anything else is refused when it is read)."""
    param: str
    """Where it is in the request (`messages[1].content[0]`), for the `param` of a 400."""


def check_images(count: int, vision: VisionInfo | None) -> VisionInfo:
    """The model's `VisionInfo` for a request with `count` images (at least one); a 400 when the model takes no
    images or the request has more than the server allows."""
    if vision is None:
        raise ApiError(f"This model does not take images, and the messages carry {count}: send text only.",
                       param="messages")  # fmt: skip
    if count > vision.max_images:
        raise ApiError(f"The messages carry {count} images; this server takes at most {vision.max_images} in one "
                       "request (max serve --max-images-per-request).", param="messages")  # fmt: skip
    return vision


class ImageError(ValueError):
    """An image that cannot be used; the message says why (`load_images` makes it the request's 400)."""


def read_image(url: str, limits: ImageLimits) -> np.ndarray:
    """The image a reference names (a data URL or an allowed local file), decoded: RGB uint8 [H, W, 3]. Raises
    `ImageError`. Blocking: call it in a worker thread."""
    return _decoded(_encoded(url, limits), limits)


def load_images(refs: Sequence[ImageRef], vision: VisionInfo, limits: ImageLimits) -> tuple[ImageInput, ...]:
    """Read, decode and preprocess each image, in order; a 400 names the first that cannot be used. Blocking:
    call it in a worker thread."""
    from maxjax.models.gemma3_vision import preprocess_images

    inputs = []
    for number, ref in enumerate(refs, 1):
        try:
            rgb = read_image(ref.url, limits)
        except ImageError as exc:
            raise ApiError(f"Image {number} ({ref.param}): {exc}", param=ref.param) from None
        pixels = preprocess_images([rgb], vision.processing)[0]  # [C, H, W] float32
        inputs.append(ImageInput(pixels=pixels, digest=digest(pixels)))
    return tuple(inputs)


def digest(pixels: np.ndarray) -> bytes:
    """16 bytes that tell preprocessed images apart: a hash of the pixel values, their shape and type."""
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.blake2b(f"{pixels.dtype.str}{pixels.shape}".encode(), digest_size=16)
    h.update(pixels.data)
    return h.digest()


def _encoded(url: str, limits: ImageLimits) -> bytes:
    """The image's encoded bytes, from a data URL or an allowed local file."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        return _from_data_url(url, limits)
    if scheme in ("http", "https"):
        also = ", or a file:// URL under the directories it reads images from" if limits.allowed_roots else ""
        raise ImageError("this server does not fetch remote URLs; send the image inline as a base64 data URL "
                         f"(data:image/png;base64,...){also}.")
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file URLs name files on this machine: {_shown(url)} names host '{parts.netloc}'.")
        return _from_file(urllib.parse.unquote(parts.path), limits)
    if url.startswith("/"):
        return _from_file(url, limits)
    raise ImageError(f"{_shown(url)} is not an image this server reads: send a base64 data URL "
                     "(data:image/png;base64,...), or a file:// URL or absolute path under the allowed image roots.")


def _from_data_url(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError("a data URL must be base64-encoded: data:image/png;base64,...")
    if len(payload) // 4 * 3 > limits.max_bytes + 2:  # refused before it is decoded
        raise _too_large(len(payload) // 4 * 3, limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL is not valid base64.") from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits)
    return data


def _from_file(name: str, limits: ImageLimits) -> bytes:
    """An absolute path's bytes, when it resolves to a regular file under an allowed root."""
    shown = _shown(name)
    if not limits.allowed_roots:
        raise ImageError("this server reads no local files (its operator allows directories with "
                         "--allowed-image-roots): send the image inline as a base64 data URL.")
    if not name.startswith("/"):
        raise ImageError(f"a local image must be named by its absolute path, not {shown}.")
    try:
        path = Path(os.path.realpath(name))  # symlinks and `..` resolved before the check
    except ValueError:  # a NUL byte in the name
        raise ImageError(f"{shown} is not a path.") from None
    roots = [Path(os.path.realpath(root)) for root in limits.allowed_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise ImageError(f"{shown} is outside the directories this server reads images from "
                         "(--allowed-image-roots).")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(f"there is no file {shown}.") from None
    except OSError as exc:
        raise ImageError(f"{shown} could not be read ({type(exc).__name__}).") from None
    if not stat.S_ISREG(info.st_mode):  # a directory, a FIFO (which would block the read), a device
        raise ImageError(f"{shown} is not a regular file.")
    if info.st_size > limits.max_bytes:
        raise _too_large(info.st_size, limits)
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"{shown} could not be read ({type(exc).__name__}).") from None
    if len(data) > limits.max_bytes:  # it grew since it was measured
        raise _too_large(len(data), limits)
    return data


def _decoded(data: bytes, limits: ImageLimits) -> np.ndarray:
    """The first frame of an encoded image as RGB uint8 [H, W, 3]; its size checked from the header first."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise _too_many_pixels(width, height, limits)
            return np.asarray(image.convert("RGB"))  # a GIF or WebP animation: its first frame
    except Image.DecompressionBombError:  # Pillow's own limit, met in the header before ours
        raise ImageError(f"it has too many pixels: at most {limits.max_pixels:,} are allowed.") from None
    except UnidentifiedImageError:
        raise ImageError("it is not a PNG, JPEG, WebP or GIF image (or it is corrupt).") from None
    except ImageError:
        raise
    except Exception as exc:  # a truncated or corrupt image: any error its decoder raises
        raise ImageError(f"it could not be decoded ({type(exc).__name__}: {exc}).") from None


def _too_large(size: int, limits: ImageLimits) -> ImageError:
    return ImageError(f"it is {size:,} bytes; images may be at most {limits.max_bytes:,} bytes.")


def _too_many_pixels(width: int, height: int, limits: ImageLimits) -> ImageError:
    return ImageError(f"it is {width} x {height} = {width * height:,} pixels; images may have at most "
                      f"{limits.max_pixels:,}.")


def _shown(text: str, limit: int = 120) -> str:
    """A name as it was sent, cut short for a message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ------------------------------------------------------------------------------------------------------- prompt


def image_prompt_ids(tokenizer: TextTokenizer, text: str, *, marker: str, images: int,
                     vision: VisionInfo) -> list[int]:
    """The ids of a rendered prompt whose chat template wrote `marker` where each of its `images` goes, each
    marker replaced as Gemma 3's processor replaces it: "\\n\\n", boi, `tokens_per_image` image tokens, eoi,
    "\\n\\n". The processor tokenizes that text whole, so the newlines are tokenized with the text beside them
    ("\\n" + "\\n\\n" is one token in Gemma's vocabulary), and the ids are the same. A 400 when the template left
    a different number of places than there are images, or the text itself holds the image token."""
    pieces = text.split(marker)
    if len(pieces) - 1 != images:
        raise ApiError(f"The chat template left {len(pieces) - 1} places for images in the prompt, and the messages "
                       f"carry {images}: it dropped or repeated images (or a text part holds {marker!r}).",
                       param="messages")  # fmt: skip
    block = [vision.boi_token_id, *[vision.image_token_id] * vision.tokens_per_image, vision.eoi_token_id]
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        before = IMAGE_BREAK if i > 0 else ""
        after = IMAGE_BREAK if i < images else ""
        piece_ids = tokenizer.encode(before + piece + after, add_special_tokens=False)
        if vision.image_token_id in piece_ids:
            raise ApiError(f"The prompt's text holds the image placeholder token "
                           f"{tokenizer.token_text(vision.image_token_id)!r}, which only images may hold.",
                           param="messages")  # fmt: skip
        ids += piece_ids
        if i < images:
            ids += block
    return ids
