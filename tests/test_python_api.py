"""The patched llama-cpp-python takes the TurboQuant types as Llama(type_k=..., type_v=...)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from tqkv import demo, types


def test_constants_match() -> None:
    assert (llama_cpp.GGML_TYPE_TURBO2_0, llama_cpp.GGML_TYPE_TURBO3_0, llama_cpp.GGML_TYPE_TURBO4_0) == (
        types.TQ2_0, types.TQ3_0, types.TQ4_0)


@pytest.mark.parametrize("k,v", [("tq3_0", "tq2_0"), ("tq4_0", "tq4_0"), ("q8_0", "tq3_0")])
def test_generate_with_tq_cache(smollm2: Path, k: str, v: str) -> None:
    answer = demo.generate(smollm2, k, v, "What is the capital of France? Answer in one word.", max_tokens=12)
    assert "Paris" in answer, answer
