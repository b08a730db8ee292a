"""Shared fixtures: the real build (made by `tqkv build`) and the pinned models and texts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; decide it before any test module can.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
