"""Write a Hugging Face checkpoint directory from a llama-family GGUF file, weights dequantized to float32.

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR

OUT_DIR gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json:
what `max generate --model OUT_DIR` (or transformers) loads. The tensor names, the config and the undoing of
llama.cpp's Q/K row permutation come from the architecture's registry entry (`maxjax.models.llama`),
exactly as the GGUF loader applies them, so the directory serves the same weights the GGUF file does. The
tests use `convert` to check that both load paths agree (tests/test_hf_export.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from maxjax.errors import UserError
from maxjax.registry import default_registry
from maxjax.tokenizer_gguf import load_gguf_tokenizer
from maxjax.weights.gguf import GGUFFile


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF directory for `gguf_path` into `out_dir` (created if needed); returns `out_dir`."""
    file = GGUFFile(gguf_path)
    arch = default_registry().for_gguf(file.architecture)
    assert arch.gguf_to_hf_config and arch.gguf_name_to_hf and arch.gguf_tensor_to_hf
    metadata = file.metadata
    hf_config = arch.gguf_to_hf_config(metadata, set(file.tensor_names))
    hf_config |= {"architectures": [arch.name], "model_type": file.architecture, "torch_dtype": "float32"}

    tensors: dict[str, np.ndarray] = {}
    for name in file.tensor_names:
        hf_name = arch.gguf_name_to_hf(name)
        if hf_name is None:  # e.g. rope_freqs: derived from the config on load
            continue
        tensors[hf_name] = np.ascontiguousarray(arch.gguf_tensor_to_hf(hf_name, file.tensor(name), hf_config))
    assert hf_config["tie_word_embeddings"] == ("lm_head.weight" not in tensors)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config)

    tokenizer = load_gguf_tokenizer(metadata)
    tokenizer.backend.save(str(out / "tokenizer.json"))
    token_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": hf_config["max_position_embeddings"],
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            token_config[f"{name}_token"] = tokenizer.backend.id_to_token(int(token_id))
    if tokenizer.chat_template is not None:
        token_config["chat_template"] = tokenizer.chat_template
    _write_json(out / "tokenizer_config.json", token_config)

    eos = sorted(tokenizer.eos_token_ids)
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    _write_json(
        out / "generation_config.json", {k: v for k, v in generation.items() if v is not None and v != []}
    )
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="a llama-family .gguf file")
    parser.add_argument("out_dir", type=Path, help="the directory to write (created if needed)")
    args = parser.parse_args(argv)
    try:
        convert(args.gguf, args.out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
