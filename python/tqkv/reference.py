"""PyTorch reference of the TurboQuant block formats: the readable specification of the bytes.

A row of n values (n a multiple of 64) becomes n/64 blocks of `fp16 d` followed by 64 b-bit
codebook indices in one little-endian bit stream (index i at bits b*i .. b*i+b-1).

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
from pathlib import Path

import torch

QK = 64
FP16_MAX = 65504.0
CODEBOOKS = Path(__file__).resolve().parents[2] / "codebooks" / "tq_codebooks.json"


@cache
def codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, boundaries) as float32, exactly the values compiled into tq-codebooks.h."""
    cb = json.loads(CODEBOOKS.read_text())["bits"][str(bits)]
    return (torch.tensor(cb["centroids"], dtype=torch.float32),
            torch.tensor(cb["boundaries"], dtype=torch.float32))


def block_bytes(bits: int) -> int:
    return 2 + QK * bits // 8


def _blocks(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {QK}")
    return x.reshape(-1, QK)


SCALE_MIN, SCALE_STEPS, SCALE_DIV, SCALE_TIE = 28, 25, 40.0, 1e-9  # tq-common.h TQ_SCALE_*


def _indices(blocks: torch.Tensor, scale: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    thresholds = boundaries[None, :] * scale[:, None]                      # float32 products
    return (blocks[:, :, None] > thresholds[:, None, :]).sum(-1)           # cells below x_i


def quantize_indices(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the float32 scale d and the int64 codebook index of every value."""
    blocks = _blocks(x)
    centroids, boundaries = codebook(bits)
    norm = blocks.double().square().sum(-1).sqrt().float()
    factors = torch.arange(SCALE_MIN, SCALE_MIN + SCALE_STEPS, dtype=torch.float32) / SCALE_DIV
    idx = torch.stack([_indices(blocks, norm * f, boundaries) for f in factors])  # [steps, blocks, 64]
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
    stream = torch.zeros(idx.shape[0], QK * bits // 8, dtype=torch.int64)
    for i in range(QK):  # index i occupies bits [bits*i, bits*i + bits)
        for k in range(bits):
            bit = bits * i + k
            stream[:, bit // 8] |= ((idx[:, i] >> k) & 1) << (bit % 8)
    return torch.cat([d.view(torch.uint8).reshape(-1, 2), stream.to(torch.uint8)], dim=1)


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Float rows -> the bytes ggml stores (flat uint8)."""
    d, idx = quantize_indices(x, bits)
    return pack(d, idx, bits).reshape(-1)


def unpack(data: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes -> (d as float32, indices)."""
    blocks = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, block_bytes(bits))
    d = blocks[:, :2].contiguous().view(torch.float16).reshape(-1).float()
    stream = blocks[:, 2:].to(torch.int64)
    idx = torch.zeros(blocks.shape[0], QK, dtype=torch.int64)
    for i in range(QK):
        for k in range(bits):
            bit = bits * i + k
            idx[:, i] |= ((stream[:, bit // 8] >> (bit % 8)) & 1) << k
    return d, idx


def dequantize(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes -> float32 values (flat), y_i = d * centroid[idx_i]."""
    centroids, _ = codebook(bits)
    d, idx = unpack(data, bits)
    return (d[:, None] * centroids[idx]).reshape(-1)
