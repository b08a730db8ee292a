"""Shared fixtures: the real build (made by `tqkv build`) and the pinned models and texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tqkv import assets, build


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    return build.bin_dir()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return assets.model("smollm2")


@pytest.fixture(scope="session")
def alice() -> Path:
    return assets.text("alice29")
