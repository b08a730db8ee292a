"""Where the project's own inputs live: patches/, tq_ggml/ and codebooks/ of the source checkout
(an editable install), or their copies inside an installed package (tqkv/_src, see setup.py)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@cache
def root() -> Path:
    """The folder holding patches/, tq_ggml/ and codebooks/."""
    for candidate in (_PACKAGE / "_src", _PACKAGE.parents[1]):
        if (candidate / "patches").is_dir() and (candidate / "tq_ggml").is_dir():
            return candidate
    raise FileNotFoundError(f"no patches/ and tq_ggml/ beside {_PACKAGE}: a broken tqkv install, reinstall it")


def checkout() -> Path | None:
    """The source checkout this package runs from, None for an installed package."""
    r = root()
    return r if (r / "pyproject.toml").is_file() else None


def patches() -> list[Path]:
    return sorted((root() / "patches").glob("*.patch"))


def tq_ggml() -> Path:
    return root() / "tq_ggml"


def codebooks_relpath(block: int = 64) -> str:
    """Where the codebooks solved for blocks of `block` values (64, or 32 and 16 for the smaller
    forms) live, relative to root()."""
    return "codebooks/tq_codebooks.json" if block == 64 else f"codebooks/tq_codebooks_{block}.json"


def codebooks_json(block: int = 64) -> Path:
    return root() / codebooks_relpath(block)
