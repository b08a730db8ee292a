"""The KV-cache types this project adds to ggml, and the stock ones it compares against.

The TurboQuant type ids have one source: the ggml_type enum that patches/0001 adds to ggml.h. They
are read from that patch here, and the patched llama-cpp-python's constants are checked against it
(tests/test_build.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import sources

QK_TQ = 64  # values per block: one fp16 scale + QK_TQ codebook indices
QK_TQ32, QK_TQ16 = 32, 16  # the smaller blocks' forms, for head sizes that are not a multiple of 64


def _enum_ids() -> dict[str, int]:
    """"tq<b>_0[_b32|_b16]" -> ggml type id, from the `+ GGML_TYPE_TURBO<b>_0[_B32|_B16] = <id>,` lines
    of patches/0001."""
    patch = next(p for p in sources.patches() if p.name.startswith("0001-"))
    found = re.findall(r"^\+\s*GGML_TYPE_TURBO(\d)_0(_B32|_B16)?\s*=\s*(\d+),", patch.read_text(), re.M)
    ids = {f"tq{b}_0{suffix.lower()}": int(i) for b, suffix, i in found}
    want = [f"tq{b}_0{s}" for s in ("", "_b32", "_b16") for b in (2, 3, 4)]
    if sorted(ids) != sorted(want):
        raise RuntimeError(f"{patch.name}: expected GGML_TYPE_TURBO2_0..4_0 and their _B32 and _B16 forms in the "
                           f"ggml_type enum, found {ids}")
    return ids


# ggml's own TQ1_0/TQ2_0 (34/35) are ternary weight types and unrelated.
TQ2_0, TQ3_0, TQ4_0 = (_enum_ids()[f"tq{b}_0"] for b in (2, 3, 4))
TQ2_0_B32, TQ3_0_B32, TQ4_0_B32 = (_enum_ids()[f"tq{b}_0_b32"] for b in (2, 3, 4))
TQ2_0_B16, TQ3_0_B16, TQ4_0_B16 = (_enum_ids()[f"tq{b}_0_b16"] for b in (2, 3, 4))


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
        CacheType("tq4_0_b32", TQ4_0_B32, (16 + QK_TQ32 * 4) / QK_TQ32),
        CacheType("tq3_0_b32", TQ3_0_B32, (16 + QK_TQ32 * 3) / QK_TQ32),
        CacheType("tq2_0_b32", TQ2_0_B32, (16 + QK_TQ32 * 2) / QK_TQ32),
        CacheType("tq4_0_b16", TQ4_0_B16, (16 + QK_TQ16 * 4) / QK_TQ16),
        CacheType("tq3_0_b16", TQ3_0_B16, (16 + QK_TQ16 * 3) / QK_TQ16),
        CacheType("tq2_0_b16", TQ2_0_B16, (16 + QK_TQ16 * 2) / QK_TQ16),
    )
}


def block_size(name: str) -> int:
    """Values per block of a cache type."""
    if name.startswith("tq"):
        return QK_TQ32 if name.endswith("_b32") else QK_TQ16 if name.endswith("_b16") else QK_TQ
    return {"q8_0": 32, "q5_1": 32, "q5_0": 32, "q4_1": 32, "q4_0": 32, "iq4_nl": 32}.get(name, 1)


def for_head(name: str, head_dim: int) -> str | None:
    """The form of cache type `name` that stores heads of head_dim values, as the patched llama.cpp
    picks it (ggml_turbo_type_for_head): the type itself where its block divides the head, else a
    TurboQuant type's form of the largest block (64, 32, 16) that does; None where nothing fits."""
    if head_dim % block_size(name) == 0:
        return name
    if not name.startswith("tq"):
        return None
    base = name.removesuffix("_b32").removesuffix("_b16")
    return next((f for f in (base, base + "_b32", base + "_b16") if head_dim % block_size(f) == 0), None)


def cache_type(name: str) -> CacheType:
    """Look a cache type up by its command-line name, with a clear error for unknown names."""
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; known: {', '.join(CACHE_TYPES)}") from None
