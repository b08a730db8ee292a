"""ggml's ternary TQ2_0 weight type (id 35) must keep working next to TurboQuant tq2_0 (id 43)."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import gguf
import numpy as np

from tqkv import types

GGML_TYPE_TQ2_0 = 35  # ternary weights, upstream


class TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p),
    ]


def _ggml(bin_dir: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(bin_dir / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def test_type_names_do_not_collide(bin_dir: Path) -> None:
    lib = _ggml(bin_dir)
    assert lib.ggml_type_name(GGML_TYPE_TQ2_0) == b"tq2_0"
    assert [lib.ggml_type_name(t) for t in (types.TQ2_0, types.TQ3_0, types.TQ4_0)] == [b"turbo2_0", b"turbo3_0", b"turbo4_0"]
    for t, size in ((types.TQ2_0, 18), (types.TQ3_0, 26), (types.TQ4_0, 34)):
        tr = lib.ggml_get_type_traits(t).contents
        assert (tr.blck_size, tr.type_size, tr.is_quantized) == (64, size, True)


def test_ternary_tensor_roundtrip(bin_dir: Path) -> None:
    lib = _ggml(bin_dir)
    rng = np.random.default_rng(0)
    n_per_row, nrows = 256, 8  # TQ2_0 blocks hold 256 values
    scale = rng.uniform(0.5, 2.0, size=(nrows, 1)).astype(np.float32)
    x = (rng.integers(-1, 2, size=(nrows, n_per_row)) * scale).astype(np.float32)
    tr = lib.ggml_get_type_traits(GGML_TYPE_TQ2_0).contents
    buf = ctypes.create_string_buffer(nrows * n_per_row // tr.blck_size * tr.type_size)
    written = lib.ggml_quantize_chunk(GGML_TYPE_TQ2_0, x.ctypes.data, buf, 0, nrows, n_per_row, None)
    assert written == len(buf)
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
    y = np.empty_like(x)
    to_float(ctypes.addressof(buf), y.ctypes.data, x.size)
    # ternary values survive exactly up to the fp16 row scale
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=0)


def test_llama_quantize_writes_ternary_model(bin_dir: Path, smollm2: Path, alice: Path, tmp_path: Path) -> None:
    out = tmp_path / "smollm2-tq2_0.gguf"
    r = subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(smollm2), str(out), "TQ2_0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "tq2_0" in (r.stdout + r.stderr)
    # the ternary model loads and evaluates (its quality is irrelevant: the weights were not ternary)
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(out), "-f", str(alice), "-c", "128",
                        "--chunks", "1"], capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0 and "Final estimate: PPL" in log, log[-3000:]
    tensor_types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert gguf.GGMLQuantizationType.TQ2_0 in tensor_types, tensor_types
