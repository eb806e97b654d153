"""Where maxjax keeps what it downloads, so every command and test agrees on one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/maxjax`, or `~/.cache/maxjax` when XDG_CACHE_HOME is unset or empty.

    Read at every call (not at import) so that tests can point it at a temporary directory.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "maxjax"
