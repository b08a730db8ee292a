"""The patched llama-cpp-python takes the TurboQuant types as Llama(type_k=..., type_v=...)."""

from __future__ import annotations

from pathlib import Path

import llama_cpp

from tqkv import demo, types


def test_constants_match() -> None:
    assert (llama_cpp.GGML_TYPE_TURBO2_0, llama_cpp.GGML_TYPE_TURBO3_0, llama_cpp.GGML_TYPE_TURBO4_0) == (
        types.TQ2_0, types.TQ3_0, types.TQ4_0)


def test_generate_with_tq_cache(smollm2: Path) -> None:
    prompt = "The capital of France is"
    f16 = demo.generate(smollm2, "f16", "f16", prompt, max_tokens=12)
    tq = demo.generate(smollm2, "tq3_0", "tq2_0", prompt, max_tokens=12)
    assert "Paris" in f16, f16
    assert "Paris" in tq, tq
