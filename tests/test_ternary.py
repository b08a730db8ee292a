"""ggml's ternary TQ2_0 weight type (id 35) must keep working next to TurboQuant tq2_0 (id 43)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np

from tqkv import types
from tqkv.ggml_lib import Ggml

GGML_TYPE_TQ2_0 = 35  # ternary weights, upstream


def test_type_names_do_not_collide(bin_dir: Path) -> None:
    ggml = Ggml(bin_dir)
    assert ggml.type_name(GGML_TYPE_TQ2_0) == "tq2_0"
    assert [ggml.type_name(t) for t in (types.TQ2_0, types.TQ3_0, types.TQ4_0)] == ["turbo2_0", "turbo3_0", "turbo4_0"]
    for t, size in ((types.TQ2_0, 18), (types.TQ3_0, 26), (types.TQ4_0, 34)):
        tr = ggml.traits(t)
        assert (tr.blck_size, tr.type_size, tr.is_quantized) == (64, size, True)


def test_ternary_tensor_roundtrip(bin_dir: Path) -> None:
    ggml = Ggml(bin_dir)
    rng = np.random.default_rng(0)
    n_per_row, nrows = 256, 8  # TQ2_0 blocks hold 256 values
    scale = rng.uniform(0.5, 2.0, size=(nrows, 1)).astype(np.float32)
    x = (rng.integers(-1, 2, size=(nrows, n_per_row)) * scale).astype(np.float32)
    q = ggml.quantize(GGML_TYPE_TQ2_0, x)
    assert q.size == nrows * 66  # 66-byte ternary blocks
    y = ggml.dequantize(GGML_TYPE_TQ2_0, q, x.size).reshape(x.shape)
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
