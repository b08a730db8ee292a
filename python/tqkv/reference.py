"""PyTorch reference of the TurboQuant block formats: the readable specification of the bytes.

A row of n values (n a multiple of the block size qk: 64 for tqN_0, 32 for tqN_0_b32, 16 for
tqN_0_b16) becomes n/qk
blocks of `fp16 d` followed by qk b-bit codebook indices in one little-endian bit stream (index i
at bits b*i .. b*i+b-1). The codebook is the one solved for unit vectors in R^qk.

    norm       = ||x||, summed in float64 and rounded once to float32
    idx_i(s)   = #{ j : x_i > boundary_j * s }          (products in float32; no division)
    candidates = s_k = norm * float32((28 + k) / 40), k = 0..24  (the paper uses s = norm)
    pick         the k maximising <x,c>^2/<c,c> (c_i = centroid[idx_i(s_k)], float64), i.e.
                 the least residual after the least-squares scale; scanning k upwards, a
                 candidate replaces the best only if it gains more by a factor 1 + 1e-9
    d          = float32(<x,c>/<c,c>) for the pick; zero/inf/NaN norms keep s = d = norm
    y_i        = float(fp16(d)) * centroid[idx_i]

A finite d above 65504 (the largest fp16) is stored as 65504; NaN and inf are stored as they are,
so ggml's row validation flags them. This mirrors tq_ggml/tq-quants.c; tests/test_reference.py
checks that the bytes are identical (float64 sums may round differently in the last bits; the
tie margin absorbs that, so only a gain ratio within ~1e-14 of 1 + 1e-9 or a d at an fp16
rounding midpoint could still differ).
"""

from __future__ import annotations

import json
from functools import cache

import torch

from . import sources, types

QK = 64
FP16_MAX = 65504.0


@cache
def codebook(bits: int, qk: int = QK) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, boundaries) as float32, exactly the values compiled into tq-codebooks.h."""
    cb = json.loads(sources.codebooks_json(qk).read_text())["bits"][str(bits)]
    return (torch.tensor(cb["centroids"], dtype=torch.float32),
            torch.tensor(cb["boundaries"], dtype=torch.float32))


def block_bytes(bits: int, qk: int = QK) -> int:
    return 2 + qk * bits // 8


def _blocks(x: torch.Tensor, qk: int) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.shape[-1] % qk:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {qk}")
    return x.reshape(-1, qk)


SCALE_MIN, SCALE_STEPS, SCALE_DIV, SCALE_TIE = 28, 25, 40.0, 1e-9  # tq-common.h TQ_SCALE_*


def _indices(blocks: torch.Tensor, scale: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    thresholds = boundaries[None, :] * scale[:, None]                      # float32 products
    return (blocks[:, :, None] > thresholds[:, None, :]).sum(-1)           # cells below x_i


def quantize_indices(x: torch.Tensor, bits: int, qk: int = QK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the float32 scale d and the int64 codebook index of every value."""
    blocks = _blocks(x, qk)
    centroids, boundaries = codebook(bits, qk)
    norm = blocks.double().square().sum(-1).sqrt().float()
    factors = torch.arange(SCALE_MIN, SCALE_MIN + SCALE_STEPS, dtype=torch.float32) / SCALE_DIV
    idx = torch.stack([_indices(blocks, norm * f, boundaries) for f in factors])  # [steps, blocks, qk]
    c = centroids.double()[idx]
    xc = (blocks.double()[None] * c).sum(-1)
    cc = (c * c).sum(-1)
    gain = xc * xc / cc
    k = torch.zeros(blocks.shape[0], dtype=torch.int64)
    best = torch.full((blocks.shape[0],), -1.0, dtype=torch.float64)
    for s in range(SCALE_STEPS):  # a later candidate must win by SCALE_TIE: ties go to the first
        better = gain[s] > best * (1 + SCALE_TIE)
        k, best = torch.where(better, s, k), torch.where(better, gain[s], best)
    pick = torch.arange(blocks.shape[0])
    search = (norm > 0) & norm.isfinite()
    d = torch.where(search, (xc / cc)[k, pick].float(), norm)
    idx = torch.where(search[:, None], idx[k, pick], _indices(blocks, norm, boundaries))
    return d, idx


def pack(d: torch.Tensor, idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Blocks of (fp16 d, bit-stream indices) as uint8, shape (n_blocks, block_bytes)."""
    d = torch.where((d > FP16_MAX) & ~d.isinf(), torch.tensor(FP16_MAX), d).half()
    qk = idx.shape[1]
    stream = torch.zeros(idx.shape[0], qk * bits // 8, dtype=torch.int64)
    for i in range(qk):  # index i occupies bits [bits*i, bits*i + bits)
        for k in range(bits):
            bit = bits * i + k
            stream[:, bit // 8] |= ((idx[:, i] >> k) & 1) << (bit % 8)
    return torch.cat([d.view(torch.uint8).reshape(-1, 2), stream.to(torch.uint8)], dim=1)


def quantize(x: torch.Tensor, bits: int, qk: int = QK) -> torch.Tensor:
    """Float rows -> the bytes ggml stores (flat uint8)."""
    d, idx = quantize_indices(x, bits, qk)
    return pack(d, idx, bits).reshape(-1)


def unpack(data: torch.Tensor, bits: int, qk: int = QK) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes -> (d as float32, indices)."""
    blocks = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, block_bytes(bits, qk))
    d = blocks[:, :2].contiguous().view(torch.float16).reshape(-1).float()
    stream = blocks[:, 2:].to(torch.int64)
    idx = torch.zeros(blocks.shape[0], qk, dtype=torch.int64)
    for i in range(qk):
        for k in range(bits):
            bit = bits * i + k
            idx[:, i] |= ((stream[:, bit // 8] >> (bit % 8)) & 1) << k
    return d, idx


def dequantize(data: torch.Tensor, bits: int, qk: int = QK) -> torch.Tensor:
    """Bytes -> float32 values (flat), y_i = d * centroid[idx_i]."""
    centroids, _ = codebook(bits, qk)
    d, idx = unpack(data, bits, qk)
    return (d[:, None] * centroids[idx]).reshape(-1)



# --- the stock cache types a TQ cache is mixed with, encoded and decoded as ggml does ---

QK8_0 = 32
ROW_TYPES = ("f16", "q8_0", "tq2_0", "tq3_0", "tq4_0", "tq2_0_b32", "tq3_0_b32", "tq4_0_b32",
             "tq2_0_b16", "tq3_0_b16", "tq4_0_b16")


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round rounds them to even)."""
    t = x.trunc()
    return t + torch.where((x - t).abs() >= 0.5, x.sign(), torch.zeros_like(x))


def _q8_0_quantize(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0_ref: per 32 values d = amax/127 (stored fp16), q = roundf(x/d)."""
    blocks = torch.as_tensor(x, dtype=torch.float32).reshape(-1, QK8_0)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = _roundf(blocks * inv[:, None]).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)], 1).reshape(-1)


def _q8_0_dequantize(data: torch.Tensor) -> torch.Tensor:
    blocks = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 2 + QK8_0)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return (d * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)


def _tq_bits(type_name: str) -> int:
    return int(type_name[2])


def _tq_qk(type_name: str) -> int:
    return types.block_size(type_name)


def for_head(type_name: str, head_dim: int) -> str:
    """The form of a cache type that a head of head_dim values is stored in (types.for_head)."""
    name = types.for_head(type_name, head_dim)
    if name is None:
        raise ValueError(f"no form of cache type {type_name} fits head_dim {head_dim}")
    return name


def encode(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """Float rows -> the bytes a cache of type_name holds (flat uint8)."""
    if type_name == "f16":
        return torch.as_tensor(x, dtype=torch.float32).half().reshape(-1).view(torch.uint8)
    if type_name == "q8_0":
        return _q8_0_quantize(x)
    if type_name in ROW_TYPES:
        return quantize(x, _tq_bits(type_name), _tq_qk(type_name))
    raise ValueError(f"no reference for cache type {type_name!r}; known: {', '.join(ROW_TYPES)}")


def decode(data: torch.Tensor, type_name: str) -> torch.Tensor:
    """Bytes of a cache of type_name -> float32 values (flat), as ggml's to_float."""
    if type_name == "f16":
        return torch.as_tensor(data, dtype=torch.uint8).view(torch.float16).float()
    if type_name == "q8_0":
        return _q8_0_dequantize(data)
    if type_name in ROW_TYPES:
        return dequantize(data, _tq_bits(type_name), _tq_qk(type_name))
    raise ValueError(f"no reference for cache type {type_name!r}; known: {', '.join(ROW_TYPES)}")


# --- attention over a compressed cache ---
#
# llama.cpp (src/llama-graph.cpp, build_attn) with a quantized cache multiplies Q and K by an
# orthonormal Hadamard matrix H_k (blocks of k_rotation_size(head_dim) values) and V by H_64,
# stores K and V, runs FLASH_ATTN_EXT on the rotated Q and the stored K/V and multiplies the output
# by H_64 again (H = H^T = H^-1). Q.K is unchanged by the rotation; the output is un-rotated exactly.
# A TQ K cache also stores K - c for a per-(KV head, channel) offset c (patches/0006): every logit
# of a query moves by the same q.c, which softmax ignores.


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix (float64), the one llama.cpp's ggml_gen_hadamard builds."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def k_rotation_size(head_dim: int) -> int:
    """llama.cpp rotates K in blocks of the largest power of two (at least 64) dividing head_dim; a
    TQ cache of a head size that is not a multiple of 64 rotates in runs of 16 or 32 (patches/0027)."""
    if head_dim % 16:
        raise ValueError(f"head_dim {head_dim} is not a multiple of 16: llama.cpp does not rotate it")
    n = 64 if head_dim % 64 == 0 else 16
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


V_ROTATION_SIZE = 64


def v_rotation_size(head_dim: int) -> int:
    """V is rotated in runs of 64, or of the largest power of two below that divides head_dim."""
    n = V_ROTATION_SIZE
    while head_dim % n and n > 16:
        n //= 2
    return n


def rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    """Multiply every block of n consecutive values of the last dimension by H_n."""
    shape = x.shape
    return (x.double().reshape(-1, n) @ hadamard(n)).reshape(shape)


def flash_attn_ext(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """What ggml's FLASH_ATTN_EXT computes, in float64.

    q [n_q, n_head, D], k [n_kv, n_head_kv, D], v [n_kv, n_head_kv, Dv]; query head h reads KV head
    h // (n_head / n_head_kv) (GQA); mask [n_q, n_kv] is added to the scaled (soft-capped) logits
    (-inf hides a position). Returns [n_q, n_head, Dv]. A row that sees no position gives zeros.
    """
    n_head, n_head_kv = q.shape[1], k.shape[1]
    if n_head % n_head_kv:
        raise ValueError(f"{n_head} query heads do not group over {n_head_kv} KV heads")
    group = n_head // n_head_kv
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask.double()[None]
    m = s.amax(-1, keepdim=True)
    p = torch.where(s == -torch.inf, 0.0, torch.exp(s - torch.where(m == -torch.inf, 0.0, m)))
    denom = p.sum(-1, keepdim=True)
    o = torch.einsum("hqk,khd->qhd", p / torch.where(denom > 0, denom, 1.0), v)
    return o


def store(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """What attention reads back from a cache of type_name that stored rows x ([..., D])."""
    return decode(encode(x, type_name), type_name).reshape(x.shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, type_k: str, type_v: str, scale: float,
              mask: torch.Tensor | None = None, k_offset: torch.Tensor | None = None,
              k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One llama.cpp attention layer over a cache of type_k/type_v (shapes as flash_attn_ext).

    Rotation as llama.cpp applies it for quantized caches (see above); as a TQ K cache does,
    k_scale [n_head_kv, D] multiplies K and divides Q before the rotation, and k_offset
    [n_head_kv, D] (rotated space) is subtracted before K is stored. Returns float64.
    """
    rot_k = type_k != "f16"
    rot_v = type_v != "f16"
    if k_scale is not None:
        q = q.double() / k_scale.double().repeat_interleave(q.shape[1] // k.shape[1], dim=0)[None]
        k = k.double() * k_scale.double()[None]
    if rot_k:
        n = k_rotation_size(q.shape[-1])
        q, k = rotate(q, n), rotate(k, n)
    if k_offset is not None:
        k = k.double() - k_offset.double()[None]
    nv = v_rotation_size(v.shape[-1])
    if rot_v:
        v = rotate(v, nv)
    type_k, type_v = for_head(type_k, k.shape[-1]), for_head(type_v, v.shape[-1])
    o = flash_attn_ext(q.float(), store(k.float(), type_k), store(v.float(), type_v), scale, mask)
    return rotate(o, nv) if rot_v else o
