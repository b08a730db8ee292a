"""Misuse gets a clear error and a clean exit, never a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tqkv import synth, types


def _perplexity(bin_dir: Path, model: Path, text: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "128",
                           "--chunks", "1", *args], capture_output=True, text=True, timeout=300)


def _clean_failure(r: subprocess.CompletedProcess, message: str) -> None:
    log = r.stdout + r.stderr
    assert r.returncode > 0, f"exit {r.returncode} (negative: killed by a signal)\n{log[-2000:]}"
    assert message in log, log[-2000:]


def test_quantized_v_needs_flash_attention(bin_dir: Path, smollm2: Path, alice: Path) -> None:
    r = _perplexity(bin_dir, smollm2, alice, "-fa", "off", "-ctk", "tq3_0", "-ctv", "tq2_0")
    _clean_failure(r, "quantized V cache requires flash_attn to be enabled")


def test_unknown_cache_type(bin_dir: Path, smollm2: Path, alice: Path) -> None:
    r = _perplexity(bin_dir, smollm2, alice, "-fa", "on", "-ctk", "tq5_0")
    _clean_failure(r, "Unsupported cache type: tq5_0")
    # and the help names the TurboQuant types
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "--help"], capture_output=True, text=True)
    assert "tq2_0, tq3_0, tq4_0 (TurboQuant)" in r.stdout + r.stderr


@pytest.fixture(scope="module")
def head72(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head size 72: not a multiple of 16, the smallest TurboQuant block (80, 96, 112 work: test_head_sizes.py)
    return synth.write_llama(tmp_path_factory.mktemp("m") / "head72.gguf", n_embd=288, n_head=4, n_head_kv=2)


@pytest.mark.parametrize("fa,k,v,message", [
    ("on", "tq3_0", "f16", "K cache type turbo3_0 with block size 16 does not divide n_embd_head_k=72"),
    ("off", "tq4_0", "f16", "K cache type turbo4_0 with block size 16 does not divide n_embd_head_k=72"),
    ("on", "f16", "tq2_0", "V cache type turbo2_0 with block size 16 does not divide n_embd_head_v=72"),
    ("on", "q4_0", "f16", "K cache type q4_0 with block size 32 does not divide n_embd_head_k=72"),
])
def test_head_size_not_divisible(bin_dir: Path, head72: Path, alice: Path, fa: str, k: str, v: str, message: str) -> None:
    r = _perplexity(bin_dir, head72, alice, "-fa", fa, "-ctk", k, "-ctv", v)
    _clean_failure(r, message)


def test_python_rejects_invalid_type_id(smollm2: Path) -> None:
    from llama_cpp import Llama

    with pytest.raises(ValueError):
        Llama(model_path=str(smollm2), flash_attn=True, type_k=99, type_v=types.TQ2_0, verbose=False)
