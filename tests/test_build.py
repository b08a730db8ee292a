"""`tqkv build`'s guards around the toolchain (the build itself runs before every test session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tqkv import build


def test_python_install_gets_real_cmake_and_ninja_binaries() -> None:
    # pip's isolated build of llama-cpp-python cannot run the Python shims of the cmake/ninja
    # packages; the folders handed to it must hold the ELF binaries themselves
    dirs = [Path(d) for d in build._tool_binary_dirs()]
    for name in ("cmake", "ninja"):
        found = [d / name for d in dirs if (d / name).is_file()]
        assert found, f"no {name} binary in {dirs}"
        assert found[0].read_bytes()[:4] == b"\x7fELF", found[0]


def test_warns_about_a_compiler_without_shared_libstdcxx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    system_cxx = shutil.which("g++") or shutil.which("c++")
    assert system_cxx
    monkeypatch.setenv("CXX", system_cxx)
    build._warn_static_libstdcxx()
    assert "WARNING" not in capsys.readouterr().out
    # a g++ installed with libstdc++.a only answers -print-file-name with the bare name
    static_only = tmp_path / "g++"
    static_only.write_text('#!/bin/sh\n[ "$1" = "-print-file-name=libstdc++.so" ] && echo libstdc++.so\n')
    static_only.chmod(0o755)
    monkeypatch.setenv("CXX", str(static_only))
    build._warn_static_libstdcxx()
    assert "links libstdc++ statically" in capsys.readouterr().out


def _tree_and_patch(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.c").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    patch = tmp_path / "0001-change.patch"
    patch.write_text("a change\n\n--- a/f.c\n+++ b/f.c\n@@ -3,5 +3,5 @@\n line 3\n line 4\n-line 5\n+LINE 5\n line 6\n line 7\n")
    return tree, patch


def test_patches_apply_exactly(tmp_path: Path) -> None:
    tree, patch = _tree_and_patch(tmp_path)
    build.apply_patch(patch, tree)
    assert "LINE 5\n" in (tree / "f.c").read_text()


def test_a_drifted_patch_is_refused(tmp_path: Path) -> None:
    # one context line changed upstream: patch's default fuzz would still apply the hunk
    tree, patch = _tree_and_patch(tmp_path)
    (tree / "f.c").write_text((tree / "f.c").read_text().replace("line 3\n", "line three\n"))
    with pytest.raises(RuntimeError, match="0001-change.patch does not apply exactly.*f.c"):
        build.apply_patch(patch, tree)
    assert "LINE 5" not in (tree / "f.c").read_text()
