"""Resolve `--model` to files on disk: the default model, a local path, or a Hugging Face repository.

What `--model` may be, tried in this order:

- nothing: the default model, SmolLM2-135M-Instruct Q4_1, fetched once into the maxjax cache (`maxjax.fetch`);
- an existing path: a `.gguf` file; a Hugging Face checkpoint directory (`config.json` + `*.safetensors`,
  single-file or sharded); or a directory of `.gguf` files;
- otherwise a Hugging Face id (`org/name`), downloaded through `huggingface_hub` into its usual cache, at
  `--revision`, and only the files serving needs (config, tokenizer, weights). `HF_HUB_OFFLINE=1` uses the cache
  alone and never touches the network.

Choosing among GGUF files: the first by file name, unless `--quantization-encoding` names an encoding one of
them holds. What a file holds is read from its header (`general.file_type`), never guessed from its name. A float
encoding (float32, bfloat16, float16) can always be asked for, since any file can be dequantized to it; a file
that already holds it is preferred, else the first file is dequantized. From the hub we cannot read a header
without downloading the file, so there the file names pick which files to download and the headers then decide,
as for a local directory.

A directory with both safetensors and GGUF weights serves the safetensors unless a quantized encoding is asked
for; float safetensors asked for in `encodings.QUANTIZE_AT_LOAD` (q8_0, q4_0, q4_1) are quantized at load.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from maxjax.errors import UserError
from maxjax.weights import encodings

HF_CONFIG_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Small files that configure a model and its tokenizer; downloaded with any weights."""
SAFETENSORS_PATTERNS: tuple[str, ...] = ("*.safetensors", "model.safetensors.index.json")
GGUF_PATTERN = "*.gguf"

_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """The files a `--model` value names, and the encoding the weights will be served in."""

    kind: Literal["hf", "gguf"]
    """`hf`: a Hugging Face checkpoint (config.json + safetensors); `gguf`: one GGUF file."""
    path: Path
    """The checkpoint directory (`hf`) or the chosen `.gguf` file (`gguf`)."""
    encoding: str
    """What the weights will be served in: the asked-for encoding, else what the files hold."""
    stored_encoding: str
    """What the chosen files hold; differs from `encoding` when a float type was asked for (cast/dequantize)."""
    config_dir: Path | None
    """A directory holding config.json and/or tokenizer files for these weights (for `hf`, `path` itself);
    None for a bare GGUF file, whose metadata carries its config and tokenizer."""
    name: str
    """The model's name as the server reports it: the `--model` value, or the default model's file name."""
    available_encodings: tuple[str, ...]
    """The encodings the files on offer hold (every GGUF file considered, or the checkpoint's one)."""
    repo_id: str | None = None
    """The Hugging Face id, for models that came from the hub."""
    revision: str | None = None
    """The commit the hub snapshot is at, for models that came from the hub."""

    @property
    def needs_conversion(self) -> bool:
        """Whether loading must cast or dequantize the stored weights to `encoding`."""
        return self.encoding != self.stored_encoding


def resolve_model(
    spec: str | None, *, revision: str | None = None, quantization_encoding: str | None = None
) -> ResolvedModel:
    """The files `spec` (the `--model` value) names; see the module docstring for the rules.

    Raises UserError, one line naming the problem and the fix, for a missing path, a directory with no model, a
    Hugging Face id that cannot be found (or is not cached while offline), or an encoding the model lacks.
    """
    wanted = encodings.normalize(quantization_encoding) if quantization_encoding else None
    if spec is None:
        if revision is not None:
            raise UserError(
                f"--revision {revision} needs --model with a Hugging Face id; the default model is pinned"
            )
        from maxjax.fetch import default_model_path

        path = default_model_path()
        return _from_gguf_files([path], wanted, name=path.stem)
    local = Path(spec).expanduser()
    if local.exists():
        if revision is not None:
            raise UserError(
                f"--revision {revision} applies to Hugging Face ids, not to the local path {spec}: drop it"
            )
        if local.is_dir():
            return _from_directory(local, wanted, name=spec)
        if local.suffix.lower() == ".gguf":
            return _from_gguf_files([local], wanted, name=local.stem)
        raise UserError(
            f"--model {spec} is a file but not a .gguf file: pass a .gguf file, a checkpoint directory or a "
            "Hugging Face id"
        )
    if _looks_like_repo_id(spec):
        return _from_hub(spec, revision, wanted)
    raise UserError(
        f"--model {spec}: no such file or directory, and not a Hugging Face id (org/name): check the path"
    )


def _looks_like_repo_id(spec: str) -> bool:
    return (
        bool(_REPO_ID.match(spec))
        and ".." not in spec
        and not spec.lower().endswith((".gguf", ".safetensors"))
    )


def _config_folder(folder: Path) -> Path | None:
    """`folder` when it holds an HF config or tokenizer to use alongside a GGUF file's own metadata."""
    return folder if any((folder / name).is_file() for name in ("config.json", "tokenizer.json")) else None


def _has_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _gguf_files(folder: Path, *, nested: bool) -> list[Path]:
    """GGUF files in `folder`, by path; `nested` also searches subfolders (hub repos often keep one quantization
    per subfolder, and a hub snapshot holds only what we downloaded; a local folder may hold anything)."""
    found = folder.rglob(GGUF_PATTERN) if nested else folder.glob(GGUF_PATTERN)
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def _from_directory(
    folder: Path,
    wanted: str | None,
    *,
    name: str,
    repo_id: str | None = None,
    revision: str | None = None,
) -> ResolvedModel:
    ggufs = _gguf_files(folder, nested=repo_id is not None)
    if _has_checkpoint(folder) and (wanted is None or encodings.is_float(wanted) or not ggufs):
        return _from_checkpoint(folder, wanted, name=name, repo_id=repo_id, revision=revision)
    if ggufs:
        return _from_gguf_files(ggufs, wanted, name=name, root=folder, repo_id=repo_id, revision=revision)
    where = f"{repo_id} (snapshot {folder})" if repo_id else str(folder)
    if (folder / "config.json").is_file():
        raise UserError(
            f"{where} has config.json but no *.safetensors or .gguf weights (PyTorch .bin checkpoints are not "
            "supported): use a repository with safetensors or GGUF files"
        )
    raise UserError(
        f"{where} holds no model: expected config.json with *.safetensors files, or .gguf files; check the path"
    )


def _from_checkpoint(
    folder: Path, wanted: str | None, *, name: str, repo_id: str | None, revision: str | None
) -> ResolvedModel:
    config = _read_json(folder / "config.json")
    stored = encodings.from_hf_config(config)
    if stored is None:  # the config does not say; the tensors do
        from maxjax.weights.safetensors import SafetensorsWeights

        weights = SafetensorsWeights(folder)
        stored = encodings.from_safetensors_dtypes(weights.info(n).dtype for n in weights.names)
    if (
        wanted is not None
        and wanted != stored
        and not (encodings.is_float(stored) and (encodings.is_float(wanted) or wanted in encodings.QUANTIZE_AT_LOAD))
    ):
        offered = [stored, *encodings.FLOAT_ENCODINGS, *encodings.QUANTIZE_AT_LOAD] if encodings.is_float(stored) else [stored]
        raise UserError(
            f"--quantization-encoding {wanted}: {name} holds {stored} safetensors weights, which can be served as "
            f"{', '.join(dict.fromkeys(offered))}; pick one of those, or a GGUF model for other quantized encodings"
        )
    return ResolvedModel(
        kind="hf",
        path=folder,
        encoding=wanted or stored,
        stored_encoding=stored,
        config_dir=folder,
        name=name,
        available_encodings=(stored,),
        repo_id=repo_id,
        revision=revision,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): fix or re-download the file") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object: fix or re-download the file")
    return value


def _from_gguf_files(
    files: Sequence[Path],
    wanted: str | None,
    *,
    name: str,
    root: Path | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> ResolvedModel:
    from maxjax.weights.gguf import file_encoding

    held = {path: file_encoding(path) for path in files}  # header peeks: cheap even for many files
    available = tuple(dict.fromkeys(held.values()))
    exact = [path for path, enc in held.items() if enc == wanted]
    if wanted is None or exact or encodings.is_float(wanted):
        chosen = exact[0] if exact else files[0]
    else:
        source = repo_id or (str(files[0].parent) if len(files) > 1 else str(files[0]))
        raise UserError(
            f"--quantization-encoding {wanted}: {source} holds {', '.join(available)} (each can also be served "
            f"as {', '.join(encodings.FLOAT_ENCODINGS)}); pick one of those"
        )
    if _SPLIT_GGUF.search(chosen.name):
        raise UserError(
            f"{chosen} is one part of a split GGUF model: merge the parts with llama.cpp's "
            "`llama-gguf-split --merge` and pass the merged file"
        )
    return ResolvedModel(
        kind="gguf",
        path=chosen,
        encoding=wanted or held[chosen],
        stored_encoding=held[chosen],
        config_dir=_config_folder(chosen.parent) or (_config_folder(root) if root else None),
        name=name,
        available_encodings=available,
        repo_id=repo_id,
        revision=revision,
    )


# --- the Hugging Face hub ---------------------------------------------------------------------------------


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE read now: huggingface_hub reads it once at import, which may predate the setting."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache() -> str | None:
    """HF_HUB_CACHE read now, for the same reason; None leaves huggingface_hub's own default."""
    return os.environ.get("HF_HUB_CACHE") or None


def _name_suggests(file_name: str, encoding: str) -> bool:
    """Whether a GGUF file's name suggests `encoding`; only to pick what to download, never to decide."""
    stem = file_name.lower().rsplit("/", 1)[-1]
    tokens = {
        "float32": ("f32", "fp32", "float32"),
        "float16": ("f16", "fp16", "float16"),
        "bfloat16": ("bf16", "bfloat16"),
    }.get(encoding, (encoding,))
    return any(re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![0-9])", stem) for t in tokens)


def choose_downloads(files: Iterable[str], wanted: str | None) -> list[str]:
    """Which files of a hub repository (paths as listed by the hub) to download for `wanted`.

    The config and tokenizer files always; then the safetensors checkpoint when there is one and no quantized
    encoding is wanted; else the GGUF files whose names suggest `wanted` (all of them for a float encoding no
    name suggests: the first is then dequantized), or the first GGUF by name when nothing is wanted.
    Raises UserError when the repository holds no weights maxjax reads, or no GGUF named for `wanted`.
    """
    files = sorted(files)
    top = [f for f in files if "/" not in f]
    picked = [f for f in top if f in HF_CONFIG_FILES]
    checkpoint = "config.json" in top and any(f.endswith(".safetensors") for f in top)
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if checkpoint and (wanted is None or encodings.is_float(wanted) or not ggufs):
        return picked + [f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    if not ggufs:
        raise UserError(
            "the repository holds no *.safetensors checkpoint and no .gguf file: pick a repository with one"
        )
    if wanted is None:
        return [*picked, ggufs[0]]
    named = [f for f in ggufs if _name_suggests(f, wanted)]
    if named:
        return picked + named
    if encodings.is_float(wanted):
        return [*picked, ggufs[0]]
    raise UserError(
        f"--quantization-encoding {wanted}: no GGUF file in the repository is named for it "
        f"({', '.join(ggufs[:8])}{', ...' if len(ggufs) > 8 else ''}); pick the encoding one of them names"
    )


def _from_hub(repo_id: str, revision: str | None, wanted: str | None) -> ResolvedModel:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    cache = _hf_cache()
    folder: str | None = None
    try:
        if not _hf_offline():
            folder = _download(repo_id, revision, cache, wanted)
        if folder is None:
            folder = _cached_snapshot(repo_id, revision, cache)
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its terms on huggingface.co/{repo_id}, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private): check the id, or log in with "
            "`hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id} has no revision {revision!r}: check --revision") from None
    except LocalEntryNotFoundError:
        if _hf_offline():
            raise UserError(
                f"{repo_id}{at} is not in the Hugging Face cache ({cache or 'default location'}) and HF_HUB_OFFLINE "
                "is set: download it once with HF_HUB_OFFLINE unset, or pass a local path"
            ) from None
        raise UserError(
            f"cannot reach the Hugging Face hub and {repo_id}{at} is not cached: check the network, or pass a "
            "local path"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(
            f"the Hugging Face hub refused {repo_id}{at} ({' '.join(str(e).split())[:200]})"
        ) from None
    snapshot = Path(folder)
    return _from_directory(snapshot, wanted, name=repo_id, repo_id=repo_id, revision=snapshot.name)


def _download(repo_id: str, revision: str | None, cache: str | None, wanted: str | None) -> str | None:
    """Download what `choose_downloads` picks; None when the hub cannot be reached (the cache may do)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError, HfHubHTTPError, RepositoryNotFoundError

    patterns = [*HF_CONFIG_FILES, *SAFETENSORS_PATTERNS, GGUF_PATTERN, f"**/{GGUF_PATTERN}"]
    try:
        listing = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns, dry_run=True
        )
    except DryRunError as e:
        # A dry run reports every failure as DryRunError; an unknown or forbidden repository must still say so.
        cause = e.__cause__
        if isinstance(cause, RepositoryNotFoundError) or (
            isinstance(cause, HfHubHTTPError)
            and cause.response is not None
            and cause.response.status_code == 401
        ):
            raise cause from None
        return None
    try:
        chosen = choose_downloads((info.filename for info in listing), wanted)
    except UserError as e:
        raise UserError(f"{repo_id}: {e}") from None
    return snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=chosen)


def _cached_snapshot(repo_id: str, revision: str | None, cache: str | None) -> str:
    """The cached snapshot folder, without the network.

    maxjax downloads only some of a repository's files, so when huggingface_hub knows the full file list it calls
    the snapshot incomplete; the files present are what we asked for, and the directory checks decide.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError as e:
        partial = getattr(e, "snapshot_path", None)  # IncompleteSnapshotError, huggingface_hub >= 2
        if partial:
            return str(partial)
        raise
