"""The KV-cache types this project adds to ggml, and the stock ones it compares against."""

from __future__ import annotations

from dataclasses import dataclass

# ggml enum ids (patches/0001): after upstream's last type, Q2_0 = 42. ggml's own TQ1_0/TQ2_0
# (34/35) are ternary weight types and unrelated.
TQ2_0 = 43
TQ3_0 = 44
TQ4_0 = 45

QK_TQ = 64  # values per block: one fp16 scale + QK_TQ codebook indices


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
