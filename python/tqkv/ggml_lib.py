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
        self.base.ggml_validate_row_data.restype = ctypes.c_bool
        self.base.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
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

    def validate_row(self, type_id: int, q: np.ndarray) -> bool:
        """ggml_validate_row_data: False for data a loader must refuse (non-finite block scales, ...)."""
        q = np.ascontiguousarray(q)
        return bool(self.base.ggml_validate_row_data(type_id, q.ctypes.data, q.nbytes))

    def vec_dot(self, type_id: int, q: np.ndarray, y: np.ndarray) -> float:
        """The CPU backend's dot of one quantized row with an F32 row (what FLASH_ATTN_EXT calls)."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        s = np.zeros(1, dtype=np.float32)
        fn = VecDotFn(self.cpu.ggml_get_type_traits_cpu(type_id).contents.vec_dot)
        fn(y.size, s.ctypes.data, 0, np.ascontiguousarray(q).ctypes.data, 0, y.ctypes.data, 0, 1)
        return float(s[0])


# --- graphs on a ggml backend (CPU, CUDA, ...): the ops a KV cache goes through ---

GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10
TYPE_F32, TYPE_F16, TYPE_I32, TYPE_I64 = 0, 1, 26, 27


class Tensor(ctypes.Structure):  # struct ggml_tensor (ggml.h)
    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class InitParams(ctypes.Structure):  # struct ggml_init_params, passed by value
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _sig(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)


P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Backend:
    """One ggml backend device (by name: "CPU", "CUDA0", ...) running small graphs built here."""

    def __init__(self, bin_dir: Path, name: str = "CPU", n_threads: int | None = None):
        self.ggml = Ggml(bin_dir)
        self.lib = ctypes.CDLL(str(bin_dir / "libggml.so.0"))
        b, g = self.ggml.base, self.lib
        _sig(b, "ggml_tensor_overhead", ctypes.c_size_t)
        _sig(b, "ggml_graph_overhead", ctypes.c_size_t)
        _sig(b, "ggml_init", P, InitParams)
        _sig(b, "ggml_free", None, P)
        _sig(b, "ggml_new_tensor_4d", ctypes.POINTER(Tensor), P, ctypes.c_int, I64, I64, I64, I64)
        _sig(b, "ggml_flash_attn_ext", ctypes.POINTER(Tensor), P, P, P, P, P, F32, F32, F32)
        _sig(b, "ggml_set_rows", ctypes.POINTER(Tensor), P, P, P, P)
        _sig(b, "ggml_get_rows", ctypes.POINTER(Tensor), P, P, P)
        _sig(b, "ggml_cpy", ctypes.POINTER(Tensor), P, P, P)
        _sig(b, "ggml_turbo_k_rot", ctypes.POINTER(Tensor), P, P, P, ctypes.c_int, ctypes.c_int)
        _sig(b, "ggml_new_graph", P, P)
        _sig(b, "ggml_build_forward_expand", None, P, P)
        _sig(b, "ggml_backend_alloc_ctx_tensors", P, P, P)
        _sig(b, "ggml_backend_buffer_free", None, P)
        _sig(b, "ggml_backend_tensor_set", None, P, P, ctypes.c_size_t, ctypes.c_size_t)
        _sig(b, "ggml_backend_tensor_get", None, P, P, ctypes.c_size_t, ctypes.c_size_t)
        _sig(b, "ggml_backend_graph_compute", ctypes.c_int, P, P)
        _sig(b, "ggml_backend_supports_op", ctypes.c_bool, P, P)
        _sig(b, "ggml_backend_free", None, P)
        _sig(g, "ggml_backend_load_all", None)
        _sig(g, "ggml_backend_init_by_name", P, ctypes.c_char_p, ctypes.c_char_p)
        g.ggml_backend_load_all()
        self.name = name
        self.backend = g.ggml_backend_init_by_name(name.encode(), None)
        if not self.backend:
            raise RuntimeError(f"ggml backend {name!r} is not available in {bin_dir}")
        if name == "CPU" and n_threads:
            _sig(self.ggml.cpu, "ggml_backend_cpu_set_n_threads", None, P, ctypes.c_int)
            self.ggml.cpu.ggml_backend_cpu_set_n_threads(self.backend, n_threads)

    def close(self) -> None:
        if self.backend:
            self.ggml.base.ggml_backend_free(self.backend)
            self.backend = None

    def _run(self, build, inputs: list[tuple[int, tuple[int, ...], np.ndarray]]):
        """build(ctx, *input tensors) -> output tensor; inputs are (ggml type, ne, raw data).
        Returns (output bytes, output ne) or None when the backend does not support the op."""
        b = self.ggml.base
        mem = (len(inputs) + 8) * b.ggml_tensor_overhead() + b.ggml_graph_overhead()
        ctx = b.ggml_init(InitParams(mem, None, True))
        buf = None
        try:
            tensors = [b.ggml_new_tensor_4d(ctx, t, *(list(ne) + [1] * (4 - len(ne)))) for t, ne, _ in inputs]
            out = build(ctx, *tensors)
            if not b.ggml_backend_supports_op(self.backend, out):
                return None
            graph = b.ggml_new_graph(ctx)
            b.ggml_build_forward_expand(graph, out)
            buf = b.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
            for t, (_, _, data) in zip(tensors, inputs):
                data = np.ascontiguousarray(data)
                b.ggml_backend_tensor_set(t, data.ctypes.data, 0, data.nbytes)
            if b.ggml_backend_graph_compute(self.backend, graph) != 0:
                raise RuntimeError(f"{self.name}: graph compute failed")
            o = out.contents
            n = o.nb[3] * o.ne[3]
            res = np.empty(n, np.uint8)
            b.ggml_backend_tensor_get(out, res.ctypes.data, 0, n)
            return res, tuple(o.ne)
        finally:
            if buf:
                b.ggml_backend_buffer_free(buf)
            b.ggml_free(ctx)

    def set_rows(self, type_id: int, x: np.ndarray) -> np.ndarray | None:
        """SET_ROWS of F32 rows [n, D] into a tensor of type_id (how llama.cpp stores K/V): bytes."""
        x = np.ascontiguousarray(x, np.float32)
        n, d = x.shape
        rows = np.arange(n, dtype=np.int64)
        dst_bytes = np.zeros(n * self.ggml.row_bytes(type_id, d), np.uint8)
        r = self._run(lambda ctx, dst, src, idx: self.ggml.base.ggml_set_rows(ctx, dst, src, idx),
                      [(type_id, (d, n), dst_bytes), (TYPE_F32, (d, n), x), (TYPE_I64, (n,), rows)])
        return None if r is None else r[0]

    def get_rows(self, type_id: int, q: np.ndarray, d: int) -> np.ndarray | None:
        """GET_ROWS of every row of quantized bytes (rows of d values) to F32."""
        n = q.size // self.ggml.row_bytes(type_id, d)
        r = self._run(lambda ctx, src, idx: self.ggml.base.ggml_get_rows(ctx, src, idx),
                      [(type_id, (d, n), q), (TYPE_I32, (n,), np.arange(n, dtype=np.int32))])
        return None if r is None else r[0].view(np.float32).reshape(n, d)

    def cpy(self, src_type: int, dst_type: int, data: np.ndarray, d: int, n: int) -> np.ndarray | None:
        """CPY of n rows of d values from src_type to dst_type (both directions of a quantized type)."""
        dst = np.zeros(n * self.ggml.row_bytes(dst_type, d), np.uint8)
        r = self._run(lambda ctx, s, t: self.ggml.base.ggml_cpy(ctx, s, t),
                      [(src_type, (d, n), data), (dst_type, (d, n), dst)])
        return None if r is None else r[0]

    def turbo_k_rot(self, x: np.ndarray, k_off: np.ndarray | None, nrot: int, mode: int) -> np.ndarray | None:
        """GGML_OP_TURBO_K_ROT of x [n_tokens, n_head, n] with k_off [2, n_head_kv, n] (offset, scale),
        or None (mode 0: the rotation alone)."""
        x = np.ascontiguousarray(x, np.float32)
        n_tokens, n_head, n = x.shape
        inputs = [(TYPE_F32, (n, n_head, n_tokens), x)]
        if k_off is not None:
            k_off = np.ascontiguousarray(k_off, np.float32)
            inputs.append((TYPE_F32, (n, k_off.shape[1], 2), k_off))
        r = self._run(lambda ctx, tx, to=None: self.ggml.base.ggml_turbo_k_rot(ctx, tx, to, nrot, mode), inputs)
        return None if r is None else r[0].view(np.float32).reshape(n_tokens, n_head, n)

    def flash_attn_ext(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, type_k: int, type_v: int,
                       n_kv: int, n_head_kv: int, scale: float, mask: np.ndarray | None = None,
                       softcap: float = 0.0) -> np.ndarray | None:
        """FLASH_ATTN_EXT: q [n_q, n_head, D] F32, k/v the bytes of [n_kv, n_head_kv, D] rows of
        type_k/type_v, mask [n_q, n_kv] (added; -inf hides). Returns [n_q, n_head, Dv] F32."""
        q = np.ascontiguousarray(q, np.float32)
        n_q, n_head, d = q.shape
        blck = self.ggml.traits(type_v).blck_size
        dv = v.size // (n_kv * n_head_kv * self.ggml.row_bytes(type_v, blck)) * blck
        # ggml's layouts: q [D, n_q, n_head], k/v [D, n_kv, n_head_kv]; ours have heads inside tokens
        qg = q.transpose(1, 0, 2)
        kg = k.reshape(n_kv, n_head_kv, -1).transpose(1, 0, 2)
        vg = v.reshape(n_kv, n_head_kv, -1).transpose(1, 0, 2)
        inputs = [(TYPE_F32, (d, n_q, n_head), qg), (type_k, (d, n_kv, n_head_kv), kg),
                  (type_v, (dv, n_kv, n_head_kv), vg)]
        if mask is not None:
            inputs.append((TYPE_F16, (n_kv, n_q), np.asarray(mask, np.float32).astype(np.float16)))

        def build(ctx, tq, tk, tv, tm=None):
            return self.ggml.base.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, softcap)

        r = self._run(build, inputs)
        return None if r is None else r[0].view(np.float32).reshape(n_q, n_head, dv)
