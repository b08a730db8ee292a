"""The PyTorch reference and the built ggml agree byte for byte on the TurboQuant formats (CPU)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from tqkv import reference, types

TYPES = {2: types.TQ2_0, 3: types.TQ3_0, 4: types.TQ4_0}


class TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p),
    ]


class TypeTraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Ggml:
    """The built ggml's entry points for one TurboQuant type."""

    def __init__(self, bin_dir: Path, bits: int):
        base = ctypes.CDLL(str(bin_dir / "libggml-base.so.0"))
        cpu = ctypes.CDLL(str(bin_dir / "libggml-cpu.so.0"))
        cpu.ggml_cpu_init()  # fills the fp16 lookup table the CPU kernels read
        base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCPU)
        t = base.ggml_get_type_traits(TYPES[bits]).contents
        c = cpu.ggml_get_type_traits_cpu(TYPES[bits]).contents
        self.bits = bits
        self.from_float_ref, self.to_float = ROW_FN(t.from_float_ref), ROW_FN(t.to_float)
        self.from_float, self.vec_dot = ROW_FN(c.from_float), VEC_DOT(c.vec_dot)

    def quantize(self, x: np.ndarray, fast: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.zeros(x.size // 64 * reference.block_bytes(self.bits), dtype=np.uint8)
        (self.from_float if fast else self.from_float_ref)(x.ctypes.data, out.ctypes.data, x.size)
        return out

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        y = np.zeros(q.size // reference.block_bytes(self.bits) * 64, dtype=np.float32)
        self.to_float(q.ctypes.data, y.ctypes.data, y.size)
        return y

    def dot(self, q: np.ndarray, y: np.ndarray) -> float:
        s = np.zeros(1, dtype=np.float32)
        self.vec_dot(y.size, s.ctypes.data, 0, q.ctypes.data, 0, np.ascontiguousarray(y, np.float32).ctypes.data, 0, 1)
        return float(s[0])


def rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    spike = np.zeros((4, 256), np.float32)
    spike[:, 5] = [1.0, -3e4, 7e5, 1e-30]  # one huge coordinate, beyond fp16, denormal-tiny
    return {
        "gaussian": rng.standard_normal((64, 256)).astype(np.float32),
        "scaled": (rng.standard_normal((32, 128)) * rng.choice([1e-6, 1e-2, 1.0, 1e2, 1e4], (32, 1))).astype(np.float32),
        "zeros": np.zeros((2, 64), np.float32),
        "spike": spike,
        "constant": np.full((2, 64), 0.125, np.float32),
        "heavy_tail": rng.standard_t(2, (32, 64)).astype(np.float32),
    }


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", list(rows()))
def test_bytes_and_values_match(bin_dir: Path, bits: int, kind: str) -> None:
    g, x = Ggml(bin_dir, bits), rows()[kind]
    ref = reference.quantize(torch.from_numpy(x), bits).numpy()
    np.testing.assert_array_equal(g.quantize(x), ref)            # scalar reference (ggml-base)
    np.testing.assert_array_equal(g.quantize(x, fast=True), ref)  # CPU from_float (SET_ROWS, CPY)
    np.testing.assert_array_equal(g.dequantize(ref), reference.dequantize(torch.from_numpy(ref), bits).numpy())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nan_and_inf_propagate_to_the_norm(bin_dir: Path, bits: int) -> None:
    g = Ggml(bin_dir, bits)
    x = np.ones((2, 64), np.float32)
    x[0, 3], x[1, 9] = np.nan, np.inf
    q = g.quantize(x)
    np.testing.assert_array_equal(q, reference.quantize(torch.from_numpy(x), bits).numpy())
    d = q.reshape(2, -1)[:, :2].copy().view(np.float16).ravel()
    assert np.isnan(d[0]) and np.isinf(d[1])  # flagged by ggml_validate_row_data, not silently finite


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_vec_dot_matches_reference(bin_dir: Path, bits: int) -> None:
    # the AVX2 dot of a quantized row with an F32 query sums in another order than float64
    rng = np.random.default_rng(bits)
    g = Ggml(bin_dir, bits)
    for n in (64, 128, 256):
        x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        q = g.quantize(x)
        exact = float(reference.dequantize(torch.from_numpy(q), bits).double() @ torch.from_numpy(y).double())
        scale = float(np.abs(reference.dequantize(torch.from_numpy(q), bits).numpy() * y).sum())
        assert abs(g.dot(q, y) - exact) <= 1e-6 * scale, (n, g.dot(q, y), exact)


def test_row_length_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        reference.quantize(torch.zeros(96), 3)
