"""The parity suite (tqkv parity) on the CPU backend: the reference and ggml agree on every check."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from tqkv import parity, reference
from tqkv.ggml_lib import Backend


@pytest.fixture(scope="module")
def real() -> list[parity.RealLayer]:
    return parity.real_layers(n_tokens=128)


def test_reference_attention_is_softmax_attention() -> None:
    # the specification itself, against torch's own attention: GQA, a causal mask, a row that sees nothing
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 6, 64, generator=g), torch.randn(9, 2, 64, generator=g), torch.randn(9, 2, 64, generator=g)
    mask = torch.triu(torch.full((4, 9), -torch.inf), diagonal=6)
    want = F.scaled_dot_product_attention(q.double().transpose(0, 1), k.double().repeat_interleave(3, 1).transpose(0, 1),
                                          v.double().repeat_interleave(3, 1).transpose(0, 1), attn_mask=mask.double(),
                                          scale=0.3).transpose(0, 1)
    torch.testing.assert_close(reference.flash_attn_ext(q, k, v, 0.3, mask), want)
    assert reference.flash_attn_ext(q, k, v, 0.3, torch.full((4, 9), -torch.inf)).abs().max() == 0


def test_rotation_is_llamas_and_exact() -> None:
    h = reference.hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64, dtype=torch.float64))
    assert reference.k_rotation_size(64) == 64 and reference.k_rotation_size(192) == 64
    assert reference.k_rotation_size(256) == 256
    # with an f16-exact cache, the rotated path equals plain attention: the rotation is undone exactly
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 128, generator=g), torch.randn(16, 2, 128, generator=g), torch.randn(16, 2, 128, generator=g)
    plain = reference.flash_attn_ext(q, k, v, 0.1)
    rotated = reference.attention(q, k, v, "q8_0", "q8_0", 0.1)  # rotates both (quantized types)
    assert (rotated - plain).abs().max() < 0.05 * plain.abs().max()  # q8_0 noise only
    offset = reference.attention(q, k, v, "q8_0", "q8_0", 0.1, k_offset=k.mean(0) * 3)
    assert (offset - plain).abs().max() < 0.05 * plain.abs().max()  # a K offset leaves softmax unchanged
    scale = torch.rand(2, 128, generator=g) * 4 + 0.25
    scaled = reference.attention(q, k, v, "q8_0", "q8_0", 0.1, k_offset=k.mean(0), k_scale=scale)
    assert (scaled - plain).abs().max() < 0.05 * plain.abs().max()  # so does a K channel scale


def test_quantize_and_dequantize_paths(cpu: Backend, real: list[parity.RealLayer]) -> None:
    assert {r.model for r in real} == {"smollm2", "gemma3"}
    checks = parity.quantize_checks(cpu, real)
    assert {c.op for c in checks} == {"SET_ROWS", "CPY f32->", "quantize_row_ref", "quantize_chunk", "GET_ROWS",
                                      "CPY ->f32"}
    failed = [c for c in checks if c.status != "pass"]
    assert not failed, parity.report(failed)
    assert sum(c.total_bytes for c in checks) > 1_000_000


def test_flash_attn_ext(cpu: Backend, real: list[parity.RealLayer]) -> None:
    checks = parity.flash_attn_checks(cpu, real)
    assert len({c.types for c in checks}) == len(parity.PAIRS) + len(parity.SMALL_PAIRS) == 21 + 60
    failed = [c for c in checks if c.status != "pass"]
    assert not failed, parity.report(failed)


def test_a_wrong_byte_or_value_fails(cpu: Backend) -> None:
    # the harness can fail: one flipped index bit, and attention over the wrong value type
    c = parity.Check("CPU", "SET_ROWS", "tq3_0", "test")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    got = cpu.set_rows(44, x)
    got[7] ^= 1
    ref = reference.quantize(torch.from_numpy(x), 3).numpy()
    c.add(0.0, int((got != ref).sum()), ref.size)
    assert c.status == "FAIL" and c.bad_bytes == 1
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 64, generator=g), torch.randn(64, 2, 64, generator=g), torch.randn(64, 2, 64, generator=g)
    c = parity.Check("CPU", "FLASH_ATTN_EXT", "tq3_0/tq3_0", "test", tol=parity.TOL_F32)
    kb, vb = reference.encode(k, "tq3_0"), reference.encode(v, "tq3_0")
    out = cpu.flash_attn_ext(q.numpy(), kb.numpy(), vb.numpy(), 44, 44, 64, 2, 0.125)
    wrong = reference.flash_attn_ext(q, reference.decode(kb, "tq3_0").reshape(k.shape), v, 0.125)  # V not quantized
    c.add(float((torch.from_numpy(out).double() - wrong).abs().max() / v.abs().max()))
    assert c.status == "FAIL"


# ggml_turbo_k_rot (patches/0010): the key scale, upstream's rotation and the key offset in one op
ROT_SCALE, ROT_INV_SCALE, ROT_OFFSET = 1, 2, 4  # its modes (ggml.h)
K_ROT_CASES = [  # n, nrot, n_head, n_head_kv (0: no k_off, the value rotation), mode
    (128, 128, 8, 8, ROT_SCALE | ROT_OFFSET), (128, 128, 32, 8, ROT_INV_SCALE), (256, 64, 4, 2, ROT_SCALE),
    (64, 0, 4, 4, ROT_OFFSET | ROT_SCALE), (64, 64, 6, 2, 0), (128, 128, 8, 0, 0),
    # head sizes of the smaller blocks' forms: runs of 16 (5 per head) and 32, and none
    (80, 16, 3, 3, ROT_SCALE | ROT_OFFSET), (96, 32, 8, 2, ROT_INV_SCALE), (112, 0, 4, 4, ROT_OFFSET)]


def _k_rot_spec(x: np.ndarray, k_off: np.ndarray | None, nrot: int, mode: int) -> np.ndarray:
    """H(x*a) - c or H(x/a) in float64: H the normalised Sylvester-Hadamard matrix (upstream's
    rotation) on each run of nrot values, head h using KV head h // (n_head // n_head_kv)."""
    n_tokens, n_head, n = x.shape
    c, a = (0.0, 1.0) if k_off is None else \
        (np.repeat(k_off[i], n_head // k_off.shape[1], axis=0).astype(np.float64) for i in (0, 1))
    y = x.astype(np.float64) * (a if mode & ROT_SCALE else 1.0) / (a if mode & ROT_INV_SCALE else 1.0)
    if nrot:
        h = scipy.linalg.hadamard(nrot) / np.sqrt(nrot)
        y = (y.reshape(n_tokens, n_head, n // nrot, nrot) @ h.T).reshape(x.shape)
    return y - (c if mode & ROT_OFFSET else 0.0)


def check_k_rot(be: Backend, n: int, nrot: int, n_head: int, n_head_kv: int, mode: int) -> None:
    rng = np.random.default_rng(n + nrot + mode)
    x = rng.standard_normal((5, n_head, n)).astype(np.float32)
    k_off = np.stack([rng.standard_normal((n_head_kv, n)), rng.uniform(0.5, 2.0, (n_head_kv, n))]).astype(np.float32) \
        if n_head_kv else None
    y = be.turbo_k_rot(x, k_off, nrot, mode)
    assert y is not None, f"{be.name} does not support TURBO_K_ROT"
    np.testing.assert_allclose(y, _k_rot_spec(x, k_off, nrot, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, nrot, n_head, n_head_kv, mode", K_ROT_CASES)
def test_fused_key_rotation_matches_its_spec(cpu, n: int, nrot: int, n_head: int, n_head_kv: int, mode: int) -> None:
    check_k_rot(cpu, n, nrot, n_head, n_head_kv, mode)
