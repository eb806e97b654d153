"""`--custom-architectures`: serve architectures defined in modules outside maxjax.

A spec is `path/to/dir:module` (the directory goes on `sys.path` first, then `module` is imported) or a bare
`module` (imported as it is, e.g. an installed package). The module defines `ARCHITECTURES`, a non-empty list of
`maxjax.registry.SupportedArchitecture` entries; they are registered after the built-ins, so an entry with a
built-in's name replaces it. A minimal module (see tests/fixtures/custom_arch/my_arch.py):

    from maxjax.models import llama
    from maxjax.registry import SupportedArchitecture

    ARCHITECTURES = [SupportedArchitecture(
        name="MyLlamaForCausalLM", example_repo_ids=(), default_encoding="float32",
        supported_encodings=("float32",), model_class=llama.LlamaForCausalLM, load_params=llama.load_params,
    )]
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from pathlib import Path

from maxjax.errors import UserError
from maxjax.registry import Registry, SupportedArchitecture, default_registry


def registry_with(specs: Iterable[str]) -> Registry:
    """The built-in registry with every spec's architectures registered over it, in order."""
    registry = default_registry()
    for spec in specs:
        for arch in load_architectures(spec):
            registry.register(arch)
    return registry


def load_architectures(spec: str) -> list[SupportedArchitecture]:
    """Import the module `spec` names and return its `ARCHITECTURES`. Raises UserError naming the module."""
    path, _, module = spec.rpartition(":")
    if not module:
        raise UserError(f"--custom-architectures {spec!r}: name a module, as path/to/dir:module or module")
    if path:
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"--custom-architectures {spec}: {path} is not a directory (the form is dir:module)")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        loaded = importlib.import_module(module)
    except Exception as e:  # any failure inside the module is the user's to fix: say which and why
        hint = " (give the directory and the module name, as dir:module)" if module.endswith(".py") else ""
        raise UserError(
            f"--custom-architectures {spec}: cannot import module {module!r}: {type(e).__name__}: {e}{hint}"
        ) from e
    architectures = getattr(loaded, "ARCHITECTURES", None)
    if not isinstance(architectures, (list, tuple)) or not architectures:
        raise UserError(
            f"--custom-architectures {spec}: module {module!r} has no non-empty ARCHITECTURES list; define "
            "ARCHITECTURES = [SupportedArchitecture(...), ...] in it"
        )
    for arch in architectures:
        if not isinstance(arch, SupportedArchitecture):
            raise UserError(
                f"--custom-architectures {spec}: module {module!r} lists {arch!r} in ARCHITECTURES, which is not "
                "a maxjax.registry.SupportedArchitecture"
            )
    return list(architectures)
