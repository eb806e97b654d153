"""Make the vision references of tests/fixtures/arch/gemma3_multimodal/: what transformers' Gemma 3 computes for images.

    /tmp/devvenv/bin/python scripts/make_vision_fixtures.py   # needs torch, transformers, pillow, safetensors

Run after scripts/make_arch_fixtures.py (which rewrites that folder and leaves these files out). The tiny
checkpoint it made already holds a SigLIP vision tower (1 layer, 32x32 images of 8x8 patches: a 4x4 grid) and
the multimodal projector (average-pooled to 2x2 = `mm_tokens_per_image` 4 soft tokens). This script

1. writes preprocessor_config.json (Gemma 3's processor: bilinear resize to the tower's image size, rescale by
   1/255, normalize by mean = std = 0.5, as the Hub's Gemma 3 checkpoints have it);
2. preprocesses two fixed random RGB images of other sizes (one shrunk, one enlarged) with transformers'
   Gemma3ImageProcessorPil and records the raw images and the pixel values;
3. records the vision tower's last hidden state and the projector's output (`get_image_features`);
4. for a prompt with one image and one with two (each image expanded as Gemma 3's processor does:
   `\\n\\n<boi>` + 4 image tokens + `<eoi>\\n\\n`), records the input embeddings transformers' language model receives
   after the merge, and the logits: with `token_type_ids` (the processor's: image tokens attend to one another
   bidirectionally) and without (plain causal), so a test can tell the two masks apart.

Everything in float32, eager attention. Outputs: vision_reference.npz and vision_reference.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tests" / "fixtures" / "arch" / "gemma3_multimodal"
IMAGE_SIZES = ((40, 56), (24, 20))
"""(height, width) of the two raw images: the first is shrunk to 32x32, the second enlarged."""
NEWLINES = 10
"""The tiny byte-level vocabulary's "\\n" (byte 0x0a); Gemma's real tokenizer has one "\\n\\n" token."""


def image_block(config: Any) -> list[int]:
    """One image's tokens as Gemma 3's processor writes them (its `full_image_sequence`)."""
    n = config.mm_tokens_per_image
    return [NEWLINES, NEWLINES, config.boi_token_index, *[config.image_token_index] * n, config.eoi_token_index,
            NEWLINES, NEWLINES]


def prompts(config: Any, rng: np.random.Generator) -> dict[str, list[int]]:
    def text(n: int) -> list[int]:
        return rng.integers(11, 250, n).tolist()

    return {
        "one": [1, *text(3), *image_block(config), *text(4)],
        "two": [1, *text(2), *image_block(config), *text(2), *image_block(config), *text(3)],
    }


@torch.no_grad()
def run_prompt(model: Any, tokens: list[int], pixel_values: torch.Tensor, image_token: int) -> dict[str, np.ndarray]:
    ids = torch.tensor([tokens])
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"][0].clone()

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        types = (ids == image_token).long()
        bidirectional = model(input_ids=ids, pixel_values=pixel_values, token_type_ids=types).logits[0]
        causal = model(input_ids=ids, pixel_values=pixel_values).logits[0]
    finally:
        hook.remove()
    return {"tokens": np.array(tokens, np.int32), "inputs_embeds": captured["embeds"].numpy(),
            "logits": bidirectional.numpy(), "logits_causal": causal.numpy()}


def main() -> None:
    torch.set_num_threads(1)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.float32,
                                                                        attn_implementation="eager").eval()
    config, vision = model.config, model.config.vision_config
    processor = Gemma3ImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(FOLDER)

    rng = np.random.default_rng(2020)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]
    pixel_values = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values)
    arrays: dict[str, np.ndarray] = {
        "image_0": images[0], "image_1": images[1],
        "pixel_values": pixel_values.numpy().astype(np.float32),
        "vision_hidden": features.last_hidden_state.numpy(),
        "image_features": features.pooler_output.numpy(),
    }
    record: dict[str, Any] = {
        "made_by": "scripts/make_vision_fixtures.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "checkpoint_sha256": hashlib.sha256((FOLDER / "model.safetensors").read_bytes()).hexdigest(),
    }
    for name, tokens in prompts(config, rng).items():
        n_images = tokens.count(config.image_token_index) // config.mm_tokens_per_image
        out = run_prompt(model, tokens, pixel_values[:n_images], config.image_token_index)
        arrays |= {f"{key}_{name}": value for key, value in out.items()}
        record[f"prompt_{name}"] = {
            "tokens": tokens,
            "images": n_images,
            "logit_std": float(out["logits"].std()),
            "bidirectional_vs_causal_max_abs_diff": float(np.abs(out["logits"] - out["logits_causal"]).max()),
        }
    np.savez_compressed(FOLDER / "vision_reference.npz", **arrays)
    (FOLDER / "vision_reference.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.startswith("prompt")}, indent=1))
    size = sum((FOLDER / f).stat().st_size for f in ("vision_reference.npz", "vision_reference.json",
                                                       "preprocessor_config.json"))
    print(f"vision fixtures: {size / 1024:.0f} KiB in {FOLDER}")


if __name__ == "__main__":
    main()
