"""How a checkpoint says its embeddings are pooled.

- A sentence-transformers checkpoint lists its modules in `modules.json`: a `Pooling` module whose folder
  (usually `1_Pooling/`) holds `config.json` with one `pooling_mode_*` set (`mean_tokens`, `cls_token`,
  `lasttoken`), and a `Normalize` module when the vectors are scaled to unit length.
- A GGUF file may carry `<arch>.pooling_type` (llama.cpp's enum: 1 mean, 2 CLS, 3 last) and is normalized, as
  llama.cpp's server does by default.
- Anything else (a decoder used as an embedder, Qwen3 Embedding, or a chat model) pools the last token and
  normalizes: what decoder embedders are trained for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maxjax.serve.protocol import Pooling

_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_GGUF_TYPES = {1: "mean", 2: "cls", 3: "last"}


def sentence_transformers_pooling(model_dir: Path) -> Pooling | None:
    """The pooling `modules.json` declares, or None when there is no such file. Raises ValueError for a
    declaration maxjax cannot follow (a pooling mode other than mean, CLS or last token)."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules: list[dict[str, Any]] = json.loads(modules_file.read_text())
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    kind = "last"
    if "Pooling" in kinds:
        config = json.loads((model_dir / kinds["Pooling"].get("path", "1_Pooling") / "config.json").read_text())
        chosen = [mode for key, mode in _ST_MODES.items() if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _ST_MODES]
        if others or len(chosen) != 1:
            raise ValueError(f"{model_dir}: sentence-transformers pooling {sorted(others) or chosen} is not served "
                             "(one of mean, CLS or last token is)")  # fmt: skip
        kind = chosen[0]
    return Pooling(kind, normalize="Normalize" in kinds)  # type: ignore[arg-type]


def declared_pooling(folder: Path | None, gguf_metadata: Mapping[str, Any] | None = None) -> Pooling | None:
    """The pooling a checkpoint declares: the sentence-transformers modules in `folder` (its directory, or the
    config directory beside a GGUF file), else a GGUF file's `<arch>.pooling_type` (from the metadata its reader
    already parsed); None when it declares none (an embedding model, then, only by `--task embed`)."""
    declared = sentence_transformers_pooling(folder) if folder is not None else None
    if declared is None and gguf_metadata is not None:
        arch = gguf_metadata.get("general.architecture")
        code = gguf_metadata.get(f"{arch}.pooling_type")
        if code in _GGUF_TYPES:
            declared = Pooling(_GGUF_TYPES[code], normalize=True)  # type: ignore[arg-type]
    return declared


def checkpoint_pooling(kind: str, path: Path, config_dir: Path | None) -> Pooling:
    """The pooling of a resolved checkpoint (`ResolvedModel.kind`, `.path`, `.config_dir`): what it declares,
    else the last token, normalized."""
    metadata = None
    if kind == "gguf":
        from maxjax.weights.gguf import read_metadata

        metadata = read_metadata(path)
    return declared_pooling(path if kind == "hf" else config_dir, metadata) or Pooling()
