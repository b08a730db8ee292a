"""llama-server with a TurboQuant cache answers an OpenAI-style chat request over real HTTP."""

from __future__ import annotations

from pathlib import Path

from tqkv import runner


def test_chat_completion_tq3_tq2(bin_dir: Path, smollm2: Path) -> None:
    with runner.Server(smollm2, runner.cache_args("tq3_0", "tq2_0") + ["-t", "2"]) as srv:
        answer = srv.chat("What is the capital of France? Answer in one word.", max_tokens=16)
    assert "paris" in answer.lower(), answer
    assert "K cache is TurboQuant tq3_0" in srv.log and "V cache is TurboQuant tq2_0" in srv.log, srv.log[-3000:]
    assert "attn_rot_k = 1" in srv.log and "attn_rot_v = 1" in srv.log, srv.log[-3000:]
