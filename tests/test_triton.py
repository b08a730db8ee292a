"""The Triton kernels against the PyTorch reference: quantize byte for byte, decode attention to float32.

Without CUDA, tqkv.triton_kernels runs the kernels under the Triton interpreter (TRITON_INTERPRET=1 on
CPU tensors); with CUDA the same tests run natively on the GPU. Shapes are small for the interpreter.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from tqkv import reference
from tqkv import triton_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")


def rows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    spike = torch.zeros(5, 128)
    spike[:, 5] = torch.tensor([1.0, -3e4, 7e5, 1e30, 3e38])  # beyond fp16 (d clamps), near FLT_MAX (d = inf)
    special = torch.ones(8, 64)
    special[0, 3] = NAN
    special[1, 3] = -NAN  # the reference keeps a NaN's sign: d = 0xFE00
    special[2, [3, 60]] = torch.tensor([NAN, INF])
    special[3, 9] = INF
    special[4, [9, 10]] = torch.tensor([INF, -INF])
    special[5:7] = 0.0
    special[6, 0] = -0.0
    special[7, 63] = NAN  # NaN in the last value of the block only
    return {
        "gaussian": torch.randn(48, 128, generator=g),
        "scaled": torch.randn(30, 128, generator=g) * torch.tensor([1e-6, 1e-2, 1.0, 1e2, 1e4]).repeat(6)[:, None],
        "zeros": torch.zeros(3, 64),
        "spike": spike,
        "tiny": torch.cat([torch.randn(2, 64, generator=g) * 1e-30, torch.randn(2, 64, generator=g) * 1e-40]),
        "special": special,
        "constant": torch.tensor([0.125, -3.0, 1e-30, 6e4])[:, None].expand(4, 64).contiguous(),  # exact ties
        "heavy_tail": torch.randn(16, 128, generator=g) / torch.randn(16, 128, generator=g),  # Cauchy
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/inf rows, as meant
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", list(rows()))
def test_quantize_is_byte_identical(bits: int, kind: str) -> None:
    x = rows()[kind]
    got = tk.quantize(x.to(DEVICE), f"tq{bits}_0").cpu()
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 64 * reference.block_bytes(bits))
    want = reference.quantize(x, bits)
    bad = (got.reshape(-1) != want).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} bytes differ, first at {bad[0].item()}"


def test_quantize_keeps_leading_dims_and_ragged_program_tail() -> None:
    x = torch.randn(3, 7, 2, 64, generator=torch.Generator().manual_seed(5))  # 42 blocks: not whole programs
    got = tk.quantize(x.to(DEVICE), "tq3_0").cpu()
    assert got.shape == (3, 7, 2, 26)
    assert torch.equal(got.reshape(-1), reference.quantize(x, 3))


@pytest.mark.parametrize("call, message", [
    (lambda: tk.quantize(torch.zeros(2, 64, dtype=torch.float64, device=DEVICE), "tq3_0"), "float32"),
    (lambda: tk.quantize(torch.zeros(2, 96, device=DEVICE), "tq3_0"), "multiple of 64"),
    (lambda: tk.quantize(torch.zeros(2, 64, device=DEVICE), "q4_0"), "unknown TQ type"),
])
def test_quantize_rejects_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- decode attention ---
#
# Tolerance: the kernel and the reference read the same decoded float32 K/V, so the only difference is
# arithmetic: float32 in the kernel (dot products over D <= 256 terms, 3xTF32 on CUDA, which is as
# accurate; exp; running sums over <= 300 positions; the split combine) against float64 in the
# reference. With logits up to ~10 each softmax weight is off by a relative ~1e-6, and the output, a
# convex combination of V rows, by ~1e-6 * max|V| (observed at most 1.0e-6 * max|V| here).
# ATOL = 5e-6 * max|V| leaves a 5x margin; an unpacking error that touches many values moves the output
# by orders of magnitude more, and even one flipped index bit of one cached value mostly shows
# (1e-5 to 4e-4 * max|V| for tq3_0 V, n_kv 200).
ATOL = 5e-6
TYPES = ["f16", "q8_0", "tq2_0", "tq3_0", "tq4_0"]
MIXES = [(k, v) for k, v in itertools.product(TYPES, TYPES) if k.startswith("tq") or v.startswith("tq")]


@cache  # the reference encoder dominates the run time: share caches between tests
def kv_cache(n_kv: int, n_head_kv: int, dim: int, type_name: str, seed: int) -> torch.Tensor:
    x = torch.randn(n_kv, n_head_kv, dim, generator=torch.Generator().manual_seed(seed))
    return reference.encode(x, type_name).view(n_kv, n_head_kv, -1)


def random_mask(n_kv: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = -torch.rand(n_kv, generator=g) * 4  # a finite bias (ALiBi-like) ...
    mask[torch.rand(n_kv, generator=g) < 0.25] = -INF  # ... and hidden positions
    mask[:70] = -INF  # whole splits that see nothing
    return mask


def check(n_head: int, n_head_kv: int, n_kv: int, dim: int, type_k: str, type_v: str, mask: torch.Tensor | None,
          split_size: int | None = None) -> None:
    q = 3 * torch.randn(n_head, dim, generator=torch.Generator().manual_seed(1))  # peaked softmax
    k, v = kv_cache(n_kv, n_head_kv, dim, type_k, 2), kv_cache(n_kv, n_head_kv, dim, type_v, 3)
    scale = dim**-0.5
    got = tk.decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), type_k, type_v, scale,
                              None if mask is None else mask.to(DEVICE), split_size=split_size).cpu()
    k_f = reference.decode(k, type_k).view(n_kv, n_head_kv, dim)
    v_f = reference.decode(v, type_v).view(n_kv, n_head_kv, dim)
    want = reference.flash_attn_ext(q[None], k_f, v_f, scale, None if mask is None else mask[None])[0]
    assert got.shape == (n_head, dim) and got.dtype == torch.float32
    err = (got.double() - want).abs().max().item()
    assert err <= ATOL * v_f.abs().max().item(), err


@pytest.mark.parametrize("type_k, type_v", MIXES)
def test_every_type_mix(type_k: str, type_v: str) -> None:
    check(8, 2, 200, 128, type_k, type_v, random_mask(200, 4))


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split_size", [None, 100])  # default splits; one that is no multiple of the tile
def test_head_dims_masks_and_splits(dim: int, masked: bool, split_size: int | None) -> None:
    check(8, 2, 300, dim, "tq3_0", "tq4_0", random_mask(300, 5) if masked else None, split_size)


@pytest.mark.parametrize("n_head, n_head_kv", [(4, 4), (8, 2), (6, 1), (32, 4)])
def test_gqa(n_head: int, n_head_kv: int) -> None:
    check(n_head, n_head_kv, 150, 64, "tq2_0", "tq3_0", None)


def test_fully_hidden_heads_give_zeros() -> None:
    k, v = kv_cache(130, 1, 64, "tq3_0", 6), kv_cache(130, 1, 64, "tq3_0", 7)
    mask = torch.full((130,), -INF, device=DEVICE)
    got = tk.decode_attention(torch.randn(2, 64, device=DEVICE), k.to(DEVICE), v.to(DEVICE), "tq3_0", "tq3_0",
                              0.125, mask)
    assert torch.equal(got.cpu(), torch.zeros(2, 64))


def test_reads_a_strided_cache_view() -> None:
    # a cache holding 4 KV heads, attended over heads 1..2 without a copy
    full = kv_cache(120, 4, 128, "tq4_0", 8)
    q = torch.randn(4, 128, generator=torch.Generator().manual_seed(9))
    got = tk.decode_attention(q.to(DEVICE), full.to(DEVICE)[:, 1:3], full.to(DEVICE)[:, 1:3], "tq4_0", "tq4_0",
                              0.1).cpu()
    kv = reference.decode(full, "tq4_0").view(120, 4, 128)[:, 1:3]
    want = reference.flash_attn_ext(q[None], kv, kv, 0.1)[0]
    assert (got.double() - want).abs().max().item() <= ATOL * kv.abs().max().item()


def _attend(q=None, k=None, v=None, type_k="tq3_0", type_v="tq3_0", mask=None):
    q = torch.zeros(4, 64, device=DEVICE) if q is None else q
    k = kv_cache(10, 2, 64, type_k, 0).to(DEVICE) if k is None else k
    v = kv_cache(10, 2, 64, type_v, 0).to(DEVICE) if v is None else v
    return tk.decode_attention(q, k, v, type_k, type_v, 0.125, mask)


@pytest.mark.parametrize("call, message", [
    (lambda: _attend(q=torch.zeros(4, 64, dtype=torch.float16, device=DEVICE)), "q must be float32"),
    (lambda: _attend(q=torch.zeros(4, 96, device=DEVICE)), "multiple of 64"),
    (lambda: _attend(q=torch.zeros(4, 128, device=DEVICE)), "head dim 128"),
    (lambda: _attend(q=torch.zeros(3, 64, device=DEVICE)), "do not group"),
    (lambda: _attend(k=kv_cache(10, 2, 64, "tq3_0", 0).to(DEVICE), type_k="tq5_0"), "unknown cache type"),
    (lambda: _attend(k=torch.zeros(10, 2, 26, dtype=torch.int8, device=DEVICE)), "uint8"),
    (lambda: _attend(k=torch.zeros(10, 2, 25, dtype=torch.uint8, device=DEVICE)), "not whole tq3_0 rows"),
    (lambda: _attend(v=kv_cache(11, 2, 64, "tq3_0", 0).to(DEVICE)), r"\[n_kv, n_head_kv\]"),
    (lambda: _attend(mask=torch.zeros(9, device=DEVICE)), "mask must be"),
    (lambda: _attend(mask=torch.zeros(10, dtype=torch.float64, device=DEVICE)), "mask must be"),
])
def test_decode_attention_rejects_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
