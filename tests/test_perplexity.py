"""llama-perplexity with TurboQuant caches stays close to f16 on a Canterbury text."""

from __future__ import annotations

from pathlib import Path

import pytest

from tqkv import assets, runner

CTX, CHUNKS = 512, 6


@pytest.fixture(scope="module")
def f16(bin_dir: Path, smollm2: Path, alice: Path) -> runner.Perplexity:
    return runner.perplexity(smollm2, alice, "f16", "f16", ctx=CTX, chunks=CHUNKS)


# bounds on PPL relative to f16 (SmolLM2-135M Q4_1, alice29, ctx 512, 6 chunks: 17.870), set
# above what the plain paper format measures here: tq4_0 19.167 (+7.3%), tq3_0/tq2_0 27.950
# (+56.4%); q4_0/q4_0 for comparison 18.707 (+4.7%)
@pytest.mark.parametrize("k,v,bound", [("tq4_0", "tq4_0", 0.10), ("tq3_0", "tq2_0", 0.70)])
def test_ppl_close_to_f16(f16: runner.Perplexity, smollm2: Path, alice: Path, k: str, v: str, bound: float) -> None:
    tq = runner.perplexity(smollm2, alice, k, v, ctx=CTX, chunks=CHUNKS)
    assert tq.ppl / f16.ppl - 1 < bound, (tq.ppl, f16.ppl)
    # and the cache really is smaller: 4.25 or 3.25/2.25 bits per value against 16
    bits = {"tq4_0": 4.25, "tq3_0": 3.25, "tq2_0": 2.25}
    assert tq.kv.k_mib == pytest.approx(f16.kv.k_mib * bits[k] / 16, abs=0.01)  # log prints 2 decimals
    assert tq.kv.v_mib == pytest.approx(f16.kv.v_mib * bits[v] / 16, abs=0.01)


def test_gemma3_head_256(bin_dir: Path, alice: Path) -> None:
    # Gemma-3-270M: head size 256 (four TurboQuant blocks per head) and sliding-window layers.
    # Measured (ctx 512, 2 chunks): f16 17.031, q4_0 18.182 (+6.8%), tq4_0 19.726 (+15.8%)
    gemma = assets.model("gemma3")
    f16 = runner.perplexity(gemma, alice, "f16", "f16", ctx=CTX, chunks=2)
    tq = runner.perplexity(gemma, alice, "tq4_0", "tq4_0", ctx=CTX, chunks=2)
    assert "K cache is TurboQuant tq4_0" in tq.log and "attn_rot_k = 1" in tq.log, tq.log[-3000:]
    assert tq.ppl / f16.ppl - 1 < 0.25, (tq.ppl, f16.ppl)


def test_kv_size_counts_the_last_context_only() -> None:
    # the fork's tools log a memory-fit probe context before the real one (lines as it prints them)
    line = ("llama_kv_cache: size =   12.75 MiB (  2048 cells,  30 layers,  1/1 seqs), "
            "K (turbo2):    5.98 MiB, V (turbo2):    6.77 MiB\n")
    probe = "common_params_fit_impl: getting device memory data\nllama_context: constructing llama_context\n" + line
    kv = runner.kv_size(probe + "llama_context: constructing llama_context\n" + line)
    assert (kv.total_mib, kv.k_mib, kv.v_mib, kv.cells, kv.rows) == (12.75, 5.98, 6.77, 2048, 2048 * 30)


def test_kv_size_counts_the_sliding_window_cache() -> None:
    # Gemma-3-270M at -c 2048 (lines as our build prints them): 3 global layers hold 2048 cells, the
    # 15 sliding-window layers 1024; the bits per value are the type's own (one KV head of 256)
    log = ("llama_context: constructing llama_context\n"
           "llama_kv_cache: size =    1.59 MiB (  2048 cells,   3 layers,  1/1 seqs), "
           "K (turbo4_0):    0.80 MiB, V (turbo4_0):    0.80 MiB\n"
           "llama_kv_cache: size =    3.98 MiB (  1024 cells,  15 layers,  1/1 seqs), "
           "K (turbo4_0):    1.99 MiB, V (turbo4_0):    1.99 MiB\n")
    kv = runner.kv_size(log)
    assert kv.total_mib == pytest.approx(5.57) and (kv.cells, kv.rows) == (2048, 2048 * 3 + 1024 * 15)
    assert kv.bits_per_value(256) == pytest.approx(4.25, rel=0.01)
