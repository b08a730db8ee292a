"""Hostile bytes in the TurboQuant block formats, through the built CPU kernels: bounded and seeded.

Every block is an fp16 scale and packed indices. Rows mix special scales (zeros, subnormals, the
largest finite, infinities, NaNs) with index patterns (all zero, all one bits, alternating, random)
and fully random bytes. What must hold: nothing crashes; a row whose scales are finite decodes,
dots and attends to finite numbers, the same through GET_ROWS as through the row decoder; and
ggml_validate_row_data (what the GGUF loader and state reads use) refuses exactly the rows with a
non-finite scale.
"""

from __future__ import annotations


import numpy as np
import pytest

from tqkv import types
from tqkv.ggml_lib import Backend

NAMES = [f"tq{b}_0{form}" for form in ("", "_b32", "_b16") for b in (2, 3, 4)]
# head size per block size: 256 (four 64-value blocks, the largest the kernels take), 96 (three
# 32-value blocks) and 80 (five 16-value blocks): the heads each form is made for
HEAD = {64: 256, 32: 96, 16: 80}
# fp16 bit patterns: +0, -0, smallest and largest subnormal, smallest normal, 1, largest finite and
# its negative, +inf, -inf, a quiet NaN, a signalling NaN, a negative NaN
SCALES = (0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF)
PATTERNS = (0x00, 0xFF, 0xAA, 0x55, None)  # None: random index bytes
N_RANDOM_ROWS = 4000


def _shape(name: str) -> tuple[int, int, int]:
    """(head size, blocks per row, bytes per block) of a cache type's fuzzed rows."""
    qk = types.block_size(name)
    return HEAD[qk], HEAD[qk] // qk, 2 + qk * int(name[2]) // 8


def _rows(name: str, rng: np.random.Generator) -> np.ndarray:
    """[n_rows, bytes per row]: every special scale with every index pattern (the blocks of a row
    get the scale at one of them, random finite scales elsewhere), then fully random rows."""
    _, nb, size = _shape(name)
    rows = []
    for scale in SCALES:
        for pattern in PATTERNS:
            for at in range(nb):
                blocks = rng.integers(0, 256, (nb, size), dtype=np.uint8)
                if pattern is not None:
                    blocks[:, 2:] = pattern
                finite = rng.uniform(-2, 2, nb).astype(np.float16)
                blocks[:, :2] = finite.view(np.uint8).reshape(nb, 2)
                blocks[at, :2] = np.array([scale], np.uint16).view(np.uint8)
                rows.append(blocks.reshape(-1))
    rows += list(rng.integers(0, 256, (N_RANDOM_ROWS, nb * size), dtype=np.uint8))
    return np.stack(rows)


def _finite_scales(name: str, rows: np.ndarray) -> np.ndarray:
    """Per row: True when every block scale is finite."""
    scales = rows.reshape(len(rows), -1, _shape(name)[2])[:, :, :2].copy().view(np.float16)
    return np.isfinite(scales.astype(np.float32)).all(axis=(1, 2))


@pytest.mark.parametrize("name", NAMES)
def test_hostile_blocks(cpu: Backend, name: str) -> None:
    type_id = types.cache_type(name).ggml_id
    D = _shape(name)[0]
    rng = np.random.default_rng(type_id)
    rows = _rows(name, rng)
    finite = _finite_scales(name, rows)
    assert finite.sum() > 100 and (~finite).sum() > 100, "the corpus holds both kinds of row"
    ggml = cpu.ggml
    y = rng.standard_normal(D).astype(np.float32)

    # the row decoder, the dot product and the validator, row by row
    decoded = np.stack([ggml.dequantize(type_id, r, D) for r in rows])
    dots = np.array([ggml.vec_dot(type_id, r, y) for r in rows])
    valid = np.array([ggml.validate_row(type_id, r) for r in rows])
    assert np.isfinite(decoded[finite]).all() and np.isfinite(dots[finite]).all()
    np.testing.assert_array_equal(valid, finite)  # exactly the rows with a non-finite scale are refused

    # GET_ROWS (the graph op) decodes every row as the row decoder does, NaNs in the same places
    got = cpu.get_rows(type_id, rows.reshape(-1), D)
    np.testing.assert_array_equal(got, decoded)

    # flash attention over the finite rows as K and V: finite output; over all rows: no crash
    ok = rows[finite]
    q = rng.standard_normal((4, 2, D)).astype(np.float32)
    out = cpu.flash_attn_ext(q, ok.reshape(-1), ok.reshape(-1), type_id, type_id, len(ok), 1, D ** -0.5)
    assert out is not None and np.isfinite(out).all()
    cpu.flash_attn_ext(q, rows.reshape(-1), rows.reshape(-1), type_id, type_id, len(rows), 1, D ** -0.5)
    print(f"{name}: {len(rows)} rows ({len(rows) * _shape(name)[1]} blocks), {(~finite).sum()} with a "
          f"non-finite scale: decoded, dotted, validated, GET_ROWS, FLASH_ATTN_EXT; no crash")
