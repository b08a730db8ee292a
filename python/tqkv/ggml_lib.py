"""ctypes access to the built ggml: type traits and row kernels, for parity checks."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


class TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p),
    ]


class TypeTraitsCPU(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


RowFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VecDotFn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class Ggml:
    """libggml-base and libggml-cpu of one build."""

    def __init__(self, bin_dir: Path):
        self.base = ctypes.CDLL(str(bin_dir / "libggml-base.so.0"))
        self.cpu = ctypes.CDLL(str(bin_dir / "libggml-cpu.so.0"))
        self.cpu.ggml_cpu_init()  # fills the fp16 lookup table the CPU kernels read
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCPU)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_type_name.restype = ctypes.c_char_p
        self.base.ggml_type_name.argtypes = [ctypes.c_int]
        self.base.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def traits(self, type_id: int) -> TypeTraits:
        return self.base.ggml_get_type_traits(type_id).contents

    def type_name(self, type_id: int) -> str:
        return self.base.ggml_type_name(type_id).decode()

    def row_bytes(self, type_id: int, n: int) -> int:
        t = self.traits(type_id)
        return n // t.blck_size * t.type_size

    def quantize(self, type_id: int, x: np.ndarray, kernel: str = "chunk") -> np.ndarray:
        """x (rows of floats) -> bytes, through ggml_quantize_chunk, the scalar reference
        (from_float_ref) or the CPU backend's from_float (what SET_ROWS and CPY call)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        x2 = x.reshape(-1, x.shape[-1])
        out = np.zeros(x2.shape[0] * self.row_bytes(type_id, x2.shape[1]), dtype=np.uint8)
        if kernel == "chunk":
            self.base.ggml_quantize_chunk(type_id, x2.ctypes.data, out.ctypes.data, 0, x2.shape[0], x2.shape[1], None)
        else:
            fn = self.traits(type_id).from_float_ref if kernel == "ref" else \
                self.cpu.ggml_get_type_traits_cpu(type_id).contents.from_float
            RowFn(fn)(x2.ctypes.data, out.ctypes.data, x2.size)
        return out

    def dequantize(self, type_id: int, q: np.ndarray, n: int) -> np.ndarray:
        y = np.zeros(n, dtype=np.float32)
        RowFn(self.traits(type_id).to_float)(np.ascontiguousarray(q).ctypes.data, y.ctypes.data, n)
        return y

    def vec_dot(self, type_id: int, q: np.ndarray, y: np.ndarray) -> float:
        """The CPU backend's dot of one quantized row with an F32 row (what FLASH_ATTN_EXT calls)."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        s = np.zeros(1, dtype=np.float32)
        fn = VecDotFn(self.cpu.ggml_get_type_traits_cpu(type_id).contents.vec_dot)
        fn(y.size, s.ctypes.data, 0, np.ascontiguousarray(q).ctypes.data, 0, y.ctypes.data, 0, 1)
        return float(s[0])
