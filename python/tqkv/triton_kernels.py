"""Triton kernels for TurboQuant KV caches: the encoder and decode attention over the packed bytes.

`quantize` writes the exact bytes of `reference.quantize` (tq2_0/tq3_0/tq4_0 blocks: fp16 d, then
64 b-bit codebook indices in one little-endian bit stream). `decode_attention` is FLASH_ATTN_EXT for
one query token per sequence over a cache of f16, q8_0 or TQ rows: it unpacks the bit stream in the
kernel, splits the KV sequence across programs (flash-decoding) and combines the partial softmaxes.

Without a CUDA device the kernels run under the Triton interpreter (numpy on the CPU, slow but the
same code): TRITON_INTERPRET=1 is set below, unless the caller already chose. Triton reads it when it
is first imported (its own library functions are jitted then), so on such a machine import this
module before triton, or set TRITON_INTERPRET=1 yourself. Tensors then live on the CPU; with CUDA
they must be CUDA tensors.
"""

from __future__ import annotations

import os
import sys
from functools import cache

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError("no CUDA device, and triton was imported without TRITON_INTERPRET=1: its kernels "
                          "cannot run; import tqkv.triton_kernels first or set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after TRITON_INTERPRET is decided)
import triton.language as tl  # noqa: E402

from tqkv import reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Type codes of the attention kernel; a TQ type's code is its bit width.
F16, Q8_0 = 0, 1
TYPE_CODES = {"f16": F16, "q8_0": Q8_0, "tq2_0": 2, "tq3_0": 3, "tq4_0": 4}
TQ_TYPES = ("tq2_0", "tq3_0", "tq4_0")

_QK = tl.constexpr(reference.QK)
_STEPS = tl.constexpr(reference.SCALE_STEPS)
# A Python float inside a kernel is a float32 constant, which would round 1 + 1e-9 to 1: build it
# with tl.full as float64 instead.
_TIE = tl.constexpr(1.0 + reference.SCALE_TIE)
_FP16_MAX = tl.constexpr(reference.FP16_MAX)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


def row_bytes(type_name: str, dim: int) -> int:
    """Bytes of one cache row of dim values."""
    if type_name == "f16":
        return 2 * dim
    if type_name == "q8_0":
        return dim // reference.QK8_0 * (2 + reference.QK8_0)
    return dim // reference.QK * reference.block_bytes(TYPE_CODES[type_name])


@cache
def _tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centroids, boundaries and the 25 scale factors, float32 exactly as the reference makes them."""
    centroids, boundaries = reference.codebook(bits)
    factors = torch.arange(reference.SCALE_MIN, reference.SCALE_MIN + reference.SCALE_STEPS,
                           dtype=torch.float32) / reference.SCALE_DIV
    return centroids.to(device), boundaries.to(device), factors.to(device)


def _check_device(t: torch.Tensor, name: str) -> None:
    if not INTERPRET and not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor (Triton runs natively here)")


# --- quantize -------------------------------------------------------------------------------------

@triton.jit
def _cells(x, s, boundaries_ptr, BITS: tl.constexpr):
    """idx_i = #{j : x_i > boundary_j * s}, the products in float32 as the reference forms them."""
    idx = tl.zeros(x.shape, tl.int32)
    for j in tl.static_range((1 << BITS) - 1):
        idx += (x > (tl.load(boundaries_ptr + j) * s)[:, None]).to(tl.int32)
    return idx


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, centroids_ptr, boundaries_ptr, factors_ptr, n_blocks,
                     BITS: tl.constexpr, BLOCKS: tl.constexpr):
    BLOCK_BYTES: tl.constexpr = 2 + 8 * BITS
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = blocks < n_blocks
    x = tl.load(x_ptr + blocks.to(tl.int64)[:, None] * _QK + tl.arange(0, _QK)[None, :],
                mask=live[:, None], other=0.0)
    xd = x.to(tl.float64)  # float32 * float32 products are exact in float64
    norm = tl.sqrt(tl.sum(xd * xd, axis=1)).to(tl.float32)
    search = (norm > 0) & (norm <= _FLT_MAX)  # NaN fails both

    tie = tl.full([], _TIE, tl.float64)
    best_gain = tl.full([BLOCKS], -1.0, tl.float64)
    best_k = tl.zeros([BLOCKS], tl.int32)
    best_d = tl.zeros([BLOCKS], tl.float64)
    for k in range(_STEPS):
        idx = _cells(x, norm * tl.load(factors_ptr + k), boundaries_ptr, BITS)
        c = tl.load(centroids_ptr + idx).to(tl.float64)
        xc = tl.sum(xd * c, axis=1)
        cc = tl.sum(c * c, axis=1)
        gain = xc * xc / cc
        better = gain > best_gain * tie  # ties (within the margin) keep the earlier candidate
        best_gain = tl.where(better, gain, best_gain)
        best_k = tl.where(better, k, best_k)
        best_d = tl.where(better, xc / cc, best_d)

    # zero/inf/NaN norms skip the search: s = d = norm
    idx = _cells(x, tl.where(search, norm * tl.load(factors_ptr + best_k), norm), boundaries_ptr, BITS)
    d = tl.where(search, best_d.to(tl.float32), norm)
    d = tl.where((d > _FP16_MAX) & (d <= _FLT_MAX), _FP16_MAX, d)
    d_bits = d.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    # A GPU writes NaN as the canonical 0x7FFF; the reference (torch on the CPU) keeps the quiet
    # NaN's sign: 0x7E00 or 0xFE00, negative when the block's NaNs are (mixed signs: unspecified).
    negative_nan = tl.max(((x != x) & (x.to(tl.int32, bitcast=True) < 0)).to(tl.int32), axis=1)
    d_bits = tl.where(d != d, 0x7E00 | (negative_nan << 15), d_bits)

    out = out_ptr + blocks.to(tl.int64) * BLOCK_BYTES
    tl.store(out, (d_bits & 0xFF).to(tl.uint8), mask=live)
    tl.store(out + 1, (d_bits >> 8).to(tl.uint8), mask=live)
    # 8 consecutive indices fill exactly BITS bytes: build each 8*BITS-bit word, store its bytes
    groups = tl.reshape(idx.to(tl.int64), [BLOCKS, 8, 8])
    words = tl.sum(groups << (tl.arange(0, 8) * BITS)[None, None, :], axis=2)
    byte = out[:, None] + 2 + tl.arange(0, 8)[None, :] * BITS
    for r in tl.static_range(BITS):
        tl.store(byte + r, ((words >> (8 * r)) & 0xFF).to(tl.uint8), mask=live[:, None])


def quantize(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """float32 rows [..., D] (D a multiple of 64) -> the packed bytes [..., D/64 * block_bytes].

    `.reshape(-1)` of the result is byte-identical to `reference.quantize(x, bits)`.
    """
    if type_name not in TQ_TYPES:
        raise ValueError(f"unknown TQ type {type_name!r}; known: {', '.join(TQ_TYPES)}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] % reference.QK:
        raise ValueError(f"row length {x.shape[-1] if x.dim() else 0} is not a multiple of {reference.QK}")
    _check_device(x, "x")
    bits = TYPE_CODES[type_name]
    x = x.contiguous()
    n_blocks = x.numel() // reference.QK
    out = torch.empty(*x.shape[:-1], row_bytes(type_name, x.shape[-1]), dtype=torch.uint8, device=x.device)
    if n_blocks:
        blocks_per_program = 64 if INTERPRET else 16  # the interpreter pays per operation, not per value
        _quantize_kernel[(triton.cdiv(n_blocks, blocks_per_program),)](
            x, out, *_tables(bits, x.device), n_blocks, BITS=bits, BLOCKS=blocks_per_program)
    return out


# --- decode attention ---------------------------------------------------------------------------

@triton.jit
def _fp16_at(ptr, mask):
    """The little-endian fp16 at byte pointers ptr, as float32 (cache rows are only byte-aligned)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _centroid(idx, centroids_ptr, BITS: tl.constexpr):
    """centroid[idx] as a chain of selects over the 2^BITS table entries (on an H100 about twice as
    fast as loading centroids_ptr + idx, a gather per value)."""
    c = tl.zeros(idx.shape, tl.float32)
    for j in tl.static_range(1 << BITS):
        c = tl.where(idx == j, tl.load(centroids_ptr + j), c)
    return c


@triton.jit
def _rows(ptr, rows, live, centroids_ptr, TYPE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Decoded float32 tile [len(rows), DP] of the cache rows starting at element offsets rows.

    Columns D..DP-1 (padding to a power of two) and rows that are not live read as 0. Values are the
    float32 products of ggml's to_float: d * q (q8_0), d * centroid[idx] (TQ).
    """
    if TYPE == 0:  # f16: ptr is a float16 pointer
        cols = tl.arange(0, DP)
        return tl.load(ptr + rows[:, None] + cols[None, :], mask=live[:, None] & (cols < D)[None, :],
                       other=0.0).to(tl.float32)
    elif TYPE == 1:  # q8_0: blocks of fp16 d and 32 int8
        j = tl.arange(0, DP // 32)
        block = ptr + rows[:, None, None] + (j * 34)[None, :, None]  # [N, blocks, 1]
        mask = live[:, None, None] & (j < D // 32)[None, :, None]
        q = tl.load(block + 2 + tl.arange(0, 32)[None, None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
        return tl.reshape(_fp16_at(block, mask) * q.to(tl.float32), [rows.shape[0], DP])
    else:  # TQ, TYPE = bits: blocks of fp16 d and 64 indices; 8 indices fill exactly TYPE bytes
        BP: tl.constexpr = 2 if TYPE == 2 else 4  # a group's bytes, padded to a power of two
        j = tl.arange(0, DP // 64)
        r = tl.arange(0, BP)
        block = ptr + rows[:, None] + (j * (2 + 8 * TYPE))[None, :]  # [N, blocks]
        mask = live[:, None] & (j < D // 64)[None, :]
        # each group of 8 indices as one little-endian word of 8 * TYPE bits: [N, blocks, 8]
        at = block[:, :, None, None] + 2 + (tl.arange(0, 8) * TYPE)[None, None, :, None] + r[None, None, None, :]
        byte = tl.load(at, mask=mask[:, :, None, None] & (r < TYPE)[None, None, None, :], other=0)
        word = tl.sum(byte.to(tl.int32) << (8 * r)[None, None, None, :], axis=3)
        idx = (word[:, :, :, None] >> (TYPE * tl.arange(0, 8))[None, None, None, :]) & ((1 << TYPE) - 1)
        values = _fp16_at(block, mask)[:, :, None, None] * _centroid(idx, centroids_ptr, TYPE)
        return tl.reshape(values, [rows.shape[0], DP])


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, k_centroids_ptr, v_centroids_ptr,
                       m_ptr, l_ptr, acc_ptr, n_kv, split_size, scale,
                       k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
                       GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       DV: tl.constexpr, DVP: tl.constexpr, TYPE_K: tl.constexpr, TYPE_V: tl.constexpr,
                       BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DOT: tl.constexpr):
    """One KV head and one split of the sequence: the partial max, sum and output of its query heads."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    g = tl.arange(0, GP)  # the GROUP query heads sharing this KV head, padded for tl.dot
    heads = kv_head * GROUP + g
    cols = tl.arange(0, DP)
    q = tl.load(q_ptr + heads[:, None] * D + cols[None, :], mask=(g < GROUP)[:, None] & (cols < D)[None, :],
                other=0.0)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, n_kv)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        live = tok < end
        k = _rows(k_ptr, tok.to(tl.int64) * k_tok_stride + kv_head * k_head_stride, live, k_centroids_ptr,
                  TYPE_K, D, DP)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * scale
        if HAS_MASK:
            s += tl.load(mask_ptr + tok, mask=live, other=0.0)[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all hidden so far: exp(-inf) = 0, no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = _rows(v_ptr, tok.to(tl.int64) * v_tok_stride + kv_head * v_head_stride, live, v_centroids_ptr,
                  TYPE_V, DV, DVP)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    part = heads * n_splits + split
    live_head = g < GROUP
    tl.store(m_ptr + part, m_i, mask=live_head)
    tl.store(l_ptr + part, l_i, mask=live_head)
    tl.store(acc_ptr + part[:, None] * DVP + tl.arange(0, DVP)[None, :], acc, mask=live_head[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, DV: tl.constexpr, DVP: tl.constexpr,
                    SP: tl.constexpr):
    """One query head: rescale every split's partials to the global max and normalise."""
    head = tl.program_id(0)
    sp = tl.arange(0, SP)
    part = head * n_splits + sp
    m = tl.load(m_ptr + part, mask=sp < n_splits, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # hidden splits weigh 0
    l = tl.sum(w * tl.load(l_ptr + part, mask=sp < n_splits, other=0.0), axis=0)
    cols = tl.arange(0, DVP)
    acc = tl.load(acc_ptr + part[:, None] * DVP + cols[None, :], mask=(sp < n_splits)[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(l > 0, l, 1.0)  # a head that sees nothing: zeros
    tl.store(out_ptr + head * DV + cols, o, mask=cols < DV)


def _dot_precision(device: torch.device) -> str:
    """3xTF32 runs on tensor cores: ~6x faster than "ieee" (FMA) dots on an H100 and within ~1e-7 of
    them; plain tf32 would be off by ~1e-3. The interpreter and GPUs before Ampere take "ieee"."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def _cache_rows(data: torch.Tensor, type_name: str, name: str) -> tuple[torch.Tensor, int]:
    """Validate one cache's bytes [n_kv, n_head_kv, row_bytes]; return what the kernel reads and D."""
    if type_name not in TYPE_CODES:
        raise ValueError(f"unknown cache type {type_name!r} for {name}; known: {', '.join(TYPE_CODES)}")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 3:
        raise ValueError(f"{name} must be uint8 bytes [n_kv, n_head_kv, row_bytes], "
                         f"got {getattr(data, 'dtype', type(data))} of shape {tuple(getattr(data, 'shape', ()))}")
    _check_device(data, name)
    if data.stride(-1) != 1:
        data = data.contiguous()
    per_64 = row_bytes(type_name, reference.QK)
    if data.shape[-1] % per_64:
        raise ValueError(f"{name} rows of {data.shape[-1]} bytes are not whole {type_name} rows of "
                         f"64-value multiples ({per_64} bytes per 64 values)")
    dim = data.shape[-1] // per_64 * reference.QK
    # f16 rows are read as float16 elements; the block types as bytes
    return (data.view(torch.float16) if type_name == "f16" else data), dim


def decode_attention(q: torch.Tensor, k_bytes: torch.Tensor, v_bytes: torch.Tensor, type_k: str, type_v: str,
                     scale: float, mask: torch.Tensor | None = None, *, split_size: int | None = None
                     ) -> torch.Tensor:
    """FLASH_ATTN_EXT for one query token over a packed cache: [n_head, Dv] float32.

    q [n_head, D] float32; k_bytes/v_bytes uint8 [n_kv, n_head_kv, row_bytes] (e.g.
    `reference.encode(k, type_k).view(n_kv, n_head_kv, -1)`); query head h reads KV head
    h // (n_head // n_head_kv); mask [n_kv] (float16/32) is added to the scaled logits (-inf hides).
    split_size: KV positions per program (default: enough splits to fill the GPU).
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float32 or q.dim() != 2:
        raise ValueError(f"q must be float32 [n_head, D], got {getattr(q, 'dtype', type(q))} "
                         f"of shape {tuple(getattr(q, 'shape', ()))}")
    if q.shape[1] % reference.QK:
        raise ValueError(f"head dim {q.shape[1]} is not a multiple of {reference.QK}")
    _check_device(q, "q")
    k, dim = _cache_rows(k_bytes, type_k, "k_bytes")
    v, dim_v = _cache_rows(v_bytes, type_v, "v_bytes")
    if dim != q.shape[1]:
        raise ValueError(f"K rows hold {dim} values per head, q has head dim {q.shape[1]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"K has [n_kv, n_head_kv] = {list(k.shape[:2])}, V has {list(v.shape[:2])}")
    n_head, (n_kv, n_head_kv) = q.shape[0], k.shape[:2]
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ValueError(f"{n_head} query heads do not group over {n_head_kv} KV heads")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.float16, torch.float32) \
                or mask.shape != (n_kv,):
            raise ValueError(f"mask must be float16/float32 [{n_kv}], got {getattr(mask, 'dtype', type(mask))} "
                             f"of shape {tuple(getattr(mask, 'shape', ()))}")
        _check_device(mask, "mask")
        mask = mask.float().contiguous()
    if split_size is not None and split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")

    out = torch.zeros(n_head, dim_v, dtype=torch.float32, device=q.device)
    if n_kv == 0 or n_head == 0:
        return out
    dp, dvp = triton.next_power_of_2(dim), triton.next_power_of_2(dim_v)
    block_n = 64 if max(dp, dvp) <= 128 else 32  # keeps the decoded K/V tiles at 8K floats
    if split_size is None:
        # flash-decoding: about 4 programs per SM (CUDA) so a long context uses the whole GPU
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = max(1, min(triton.cdiv(4 * sms, n_head_kv), triton.cdiv(n_kv, block_n)))
        split_size = triton.cdiv(triton.cdiv(n_kv, splits), block_n) * block_n
    n_splits = triton.cdiv(n_kv, split_size)
    group = n_head // n_head_kv

    m = torch.empty(n_head, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(n_head, n_splits, dvp, dtype=torch.float32, device=q.device)
    # f16/q8_0 rows read no codebook, and no mask is read without HAS_MASK: q stands in for those pointers
    centroids = {t: _tables(TYPE_CODES[t], q.device)[0] if t in TQ_TYPES else q for t in (type_k, type_v)}
    _attn_split_kernel[(n_head_kv, n_splits)](
        q.contiguous(), k, v, mask if mask is not None else q, centroids[type_k], centroids[type_v],
        m, l, acc, n_kv, split_size, float(scale), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=dim, DP=dp, DV=dim_v, DVP=dvp,
        TYPE_K=TYPE_CODES[type_k], TYPE_V=TYPE_CODES[type_v], BLOCK_N=block_n, HAS_MASK=mask is not None,
        DOT=_dot_precision(q.device))
    _combine_kernel[(n_head,)](m, l, acc, out, n_splits, DV=dim_v, DVP=dvp, SP=triton.next_power_of_2(n_splits))
    return out
