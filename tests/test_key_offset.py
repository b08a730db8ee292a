"""The TurboQuant key offset (patch 0006): it improves the cache, and session state carries it."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from tqkv import runner, types


def test_offset_lowers_perplexity(smollm2: Path, alice: Path, monkeypatch) -> None:
    on = runner.perplexity(smollm2, alice, "tq3_0", "f16", ctx=512, chunks=3)
    monkeypatch.setenv("LLAMA_TQ_K_OFFSET", "0")
    off = runner.perplexity(smollm2, alice, "tq3_0", "f16", ctx=512, chunks=3)
    assert "minus a per-layer offset" in on.log and "minus a per-layer offset" not in off.log
    assert on.ppl < 0.97 * off.ppl, (on.ppl, off.ppl)


def _llama(model: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model), n_ctx=512, flash_attn=True, type_k=types.TQ3_0,
                           type_v=types.TQ2_0, logits_all=False, verbose=False, seed=1)


def test_state_round_trip_keeps_the_offset(smollm2: Path, alice: Path) -> None:
    # keys restored into a fresh context were encoded with the saved offset; the next token must be
    # encoded with the same one, so its logits equal those of the uninterrupted context bit for bit
    a = _llama(smollm2)
    tokens = a.tokenize(alice.read_bytes()[:1500])[:200]
    a.eval(tokens[:-1])
    state = a.save_state()
    a.eval(tokens[-1:])
    want = np.array(a.scores[a.n_tokens - 1])

    b = _llama(smollm2)
    b.load_state(state)
    b.eval(tokens[-1:])
    got = np.array(b.scores[b.n_tokens - 1])
    np.testing.assert_array_equal(got, want)


def _shifted_logprobs(model: Path, tokens: list[int], k: int, drop: int, tail: int) -> np.ndarray:
    """A context shift: evaluate, drop `drop` positions after BOS, shift the rest down, then decode
    the last `tail` tokens one by one; their log-probabilities."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, flash_attn=True, type_k=k, type_v=llama_cpp.GGML_TYPE_F16,
                          verbose=False, seed=1)
    n = len(tokens) - tail
    llm.eval(tokens[:n])
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 1, 1 + drop)
    llama_cpp.llama_memory_seq_add(mem, 0, 1 + drop, n, -drop)
    out = []
    for t in tokens[n:]:  # positions continue after the shifted ones
        assert llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(t), 1)) == 0
        x = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).astype(np.float64)
        out.append(x - x.max() - np.log(np.exp(x - x.max()).sum()))
    return np.array(out)


def test_context_shift_restores_the_offset(smollm2: Path, alice: Path, monkeypatch) -> None:
    # shifted keys get RoPE on k itself (offset added back, then removed); new keys carry the plain
    # offset. Both must agree, or every new key's logit is off by q.(c - rope(c)): with the offset
    # the shifted cache must stay closer to f16 than without it
    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=512, vocab_only=True, verbose=False)
    tokens = llm.tokenize(alice.read_bytes()[:3000])[:320]
    ref = _shifted_logprobs(smollm2, tokens, llama_cpp.GGML_TYPE_F16, 100, 40)
    kl = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LLAMA_TQ_K_OFFSET", flag)
        got = _shifted_logprobs(smollm2, tokens, types.TQ4_0, 100, 40)
        kl[flag] = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    # measured: 0.043 with the offset, 0.090 without, 0.126 with the offset not added back
    assert kl["1"] < kl["0"], kl
