"""llama.cpp's split multimodal projector files (`mmproj-*.gguf`): finding one beside a model, opening one.

llama.cpp keeps a GGUF model's image encoder out of the model file: `convert_hf_to_gguf.py --mmproj` writes the
vision tower and its projector to a second GGUF file, `general.architecture` "clip" and `general.type` "mmproj",
with `clip.*` metadata (`clip.vision.image_size`, `clip.vision.embedding_length`, ...) and tensors named `v.*`
(the tower) and `mm.*` (the projector). `clip.projector_type` says whose projector it is ("gemma3", ...); files
with both an image and an audio encoder name the image one's in `clip.vision.projector_type` instead.

Reading the tensors into a model, and what each projector type's metadata means, belongs to the model's own
file (`models/gemma3_mmproj.py`); this one only opens the file and checks it is the kind asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from maxjax.errors import UserError
from maxjax.weights.gguf import GGUFFile

if TYPE_CHECKING:
    from maxjax.models.gemma3_vision import VisionCheckpoint

_PREFERRED_ENCODINGS = ("f16", "bf16", "f32", "q8_0")
"""Among several mmproj files beside a model, the first of these its name mentions wins (the converter's
default output, then the wider ones); a name mentioning none comes last."""


def find_mmproj(model_path: Path) -> Path | None:
    """The mmproj file beside a GGUF model (in its folder, or in `model_path` itself when that is a folder):
    a `*.gguf` whose name contains "mmproj" (`mmproj-model-f16.gguf`, `gemma-3-4b-it-mmproj-F16.gguf`), in any
    case. None when there is none. Where there are several (unsloth's repos ship F16, BF16 and F32), F16 is
    preferred, then BF16, F32, Q8_0, then the first by name."""
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    if not folder.is_dir():
        return None
    found = [
        p for p in folder.iterdir()
        if p.suffix.lower() == ".gguf" and "mmproj" in p.name.lower() and p.is_file() and p != model_path
    ]

    def preference(path: Path) -> tuple[int, str]:
        words = path.stem.lower().replace("-", ".").replace("_", ".").split(".")
        words += ["_".join(pair) for pair in zip(words, words[1:], strict=False)]  # q8_0 is split as "q8", "0"
        rank = next((i for i, enc in enumerate(_PREFERRED_ENCODINGS) if enc in words), len(_PREFERRED_ENCODINGS))
        return rank, path.name

    return min(found, key=preference, default=None)


def open_mmproj(path: Path, projector_types: tuple[str, ...]) -> GGUFFile:
    """The mmproj file at `path`, opened, once its metadata says it holds an image encoder whose projector is
    one of `projector_types` (llama.cpp's names, e.g. "gemma3"). Raises UserError naming what is wrong."""
    file = GGUFFile(path)
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch != "clip":
        raise UserError(f"{path} is not a multimodal projector file (its general.architecture is {arch!r}, not "
                        "'clip'): pass the model's mmproj-*.gguf with --mmproj")
    if meta.get("clip.has_vision_encoder") is False:
        raise UserError(f"{path} holds no image encoder (clip.has_vision_encoder is false): pass the model's "
                        "image mmproj file with --mmproj")
    kind = meta.get("clip.vision.projector_type", meta.get("clip.projector_type"))
    if kind not in projector_types:
        wanted = " or ".join(repr(t) for t in projector_types)
        raise UserError(f"{path} is a {kind!r} projector, but this model needs {wanted}: pass the mmproj file "
                        "converted from this model with --mmproj")
    return file


def open_gemma3_mmproj(path: Path, tokenizer: Any) -> VisionCheckpoint:
    """Gemma 3's mmproj file as a `VisionCheckpoint`: `gemma3_mmproj.open_checkpoint`, which reads it."""
    from maxjax.models.gemma3_mmproj import open_checkpoint

    return open_checkpoint(path, tokenizer)
