"""Shared fixtures: the real build (made by `tqkv build`) and the pinned models and texts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; decide it before any test module can.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tqkv import assets, build, profile
from tqkv.ggml_lib import Backend


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    return build.bin_dir()


@pytest.fixture(scope="module")
def cpu(bin_dir: Path):
    """The built CPU backend, for graphs of single ops."""
    be = Backend(bin_dir, "CPU")
    yield be
    be.close()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2 with its calibration profile beside it (what every tool then loads by default)."""
    model = assets.model("smollm2")
    profile.ensure(model)
    return model


@pytest.fixture(scope="session")
def gemma3() -> Path:
    model = assets.model("gemma3")
    profile.ensure(model)
    return model


@pytest.fixture(scope="session")
def alice() -> Path:
    return assets.text("alice29")
