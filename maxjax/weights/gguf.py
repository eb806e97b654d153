"""GGUF files: metadata, tensors and their encodings, read with gguf-py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every key-value field of a GGUF file as plain Python values (str, int, float, bool, lists of them)."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
