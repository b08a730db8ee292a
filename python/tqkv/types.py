"""The KV-cache types this project adds to ggml, and the stock ones it compares against.

The TurboQuant type ids have one source: the ggml_type enum that patches/0001 adds to ggml.h. They
are read from that patch here, and the patched llama-cpp-python's constants are checked against it
(tests/test_build.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import sources

QK_TQ = 64  # values per block: one fp16 scale + QK_TQ codebook indices


def _enum_ids() -> dict[int, int]:
    """bits -> ggml type id, from the `+ GGML_TYPE_TURBO<b>_0 = <id>,` lines of patches/0001."""
    patch = next(p for p in sources.patches() if p.name.startswith("0001-"))
    ids = {int(b): int(i) for b, i in re.findall(r"^\+\s*GGML_TYPE_TURBO(\d)_0\s*=\s*(\d+),", patch.read_text(), re.M)}
    if sorted(ids) != [2, 3, 4]:
        raise RuntimeError(f"{patch.name}: expected GGML_TYPE_TURBO2_0/3_0/4_0 in the ggml_type enum, found {ids}")
    return ids


# ggml's own TQ1_0/TQ2_0 (34/35) are ternary weight types and unrelated.
TQ2_0, TQ3_0, TQ4_0 = (_enum_ids()[b] for b in (2, 3, 4))


@dataclass(frozen=True)
class CacheType:
    name: str  # as given to --cache-type-k/-v
    ggml_id: int
    bits_per_value: float  # including block metadata


CACHE_TYPES: dict[str, CacheType] = {
    t.name: t
    for t in (
        CacheType("f16", 1, 16.0),
        CacheType("q8_0", 8, 8.5),
        CacheType("q5_1", 7, 6.0),
        CacheType("q5_0", 6, 5.5),
        CacheType("q4_1", 3, 5.0),
        CacheType("q4_0", 2, 4.5),
        CacheType("iq4_nl", 20, 4.5),
        CacheType("tq4_0", TQ4_0, (16 + QK_TQ * 4) / QK_TQ),
        CacheType("tq3_0", TQ3_0, (16 + QK_TQ * 3) / QK_TQ),
        CacheType("tq2_0", TQ2_0, (16 + QK_TQ * 2) / QK_TQ),
    )
}


def cache_type(name: str) -> CacheType:
    """Look a cache type up by its command-line name, with a clear error for unknown names."""
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; known: {', '.join(CACHE_TYPES)}") from None
