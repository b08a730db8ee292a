"""The PyTorch reference and the built ggml agree byte for byte on the TurboQuant formats (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tqkv import reference, types
from tqkv.ggml_lib import Ggml

# (bits, block size) -> ggml type: tqN_0 and its forms tqN_0_b32, tqN_0_b16
TYPES = {(2, 64): types.TQ2_0, (3, 64): types.TQ3_0, (4, 64): types.TQ4_0,
         (2, 32): types.TQ2_0_B32, (3, 32): types.TQ3_0_B32, (4, 32): types.TQ4_0_B32,
         (2, 16): types.TQ2_0_B16, (3, 16): types.TQ3_0_B16, (4, 16): types.TQ4_0_B16}


@pytest.fixture(scope="module")
def ggml(bin_dir: Path) -> Ggml:
    return Ggml(bin_dir)


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


@pytest.mark.parametrize("qk", [64, 32, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", list(rows()))
def test_bytes_and_values_match(ggml: Ggml, bits: int, qk: int, kind: str) -> None:
    t, x = TYPES[bits, qk], rows()[kind]
    ref = reference.quantize(torch.from_numpy(x), bits, qk).numpy()
    for kernel in ("ref", "cpu", "chunk"):  # scalar reference, CPU from_float (SET_ROWS, CPY), quantize_chunk
        np.testing.assert_array_equal(ggml.quantize(t, x, kernel), ref, err_msg=kernel)
    np.testing.assert_array_equal(ggml.dequantize(t, ref, x.size), reference.dequantize(torch.from_numpy(ref), bits, qk).numpy())


@pytest.mark.parametrize("qk", [64, 32, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nan_and_inf_propagate_to_the_norm(ggml: Ggml, bits: int, qk: int) -> None:
    x = np.ones((2, qk), np.float32)
    x[0, 3], x[1, 9] = np.nan, np.inf
    q = ggml.quantize(TYPES[bits, qk], x, "cpu")
    np.testing.assert_array_equal(q, reference.quantize(torch.from_numpy(x), bits, qk).numpy())
    d = q.reshape(2, -1)[:, :2].copy().view(np.float16).ravel()
    assert np.isnan(d[0]) and np.isinf(d[1])  # flagged by ggml_validate_row_data, not silently finite


@pytest.mark.parametrize("qk", [64, 32, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_vec_dot_matches_reference(ggml: Ggml, bits: int, qk: int) -> None:
    # the AVX2 dot of a quantized row with an F32 query sums in another order than float64
    rng = np.random.default_rng(bits)
    for n in (64, 128, 256) if qk == 64 else (qk, 96, 160) if qk == 32 else (16, 80, 96, 112):
        x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        q = ggml.quantize(TYPES[bits, qk], x, "cpu")
        deq = reference.dequantize(torch.from_numpy(q), bits, qk).double()
        exact = float(deq @ torch.from_numpy(y).double())
        got = ggml.vec_dot(TYPES[bits, qk], q, y)
        assert abs(got - exact) <= 1e-6 * float((deq.abs() @ torch.from_numpy(y).double().abs())), (n, got, exact)


def test_row_length_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        reference.quantize(torch.zeros(96), 3)


@pytest.mark.parametrize("qk", [64, 32, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scale_search_never_loses_to_the_paper_encoder(ggml: Ggml, bits: int, qk: int) -> None:
    # the candidates include the paper's s = ||x||, and the stored d is least squares for the
    # chosen indices: per block, the error can only go down (up to rounding d to fp16)
    x = rows()["gaussian"]
    centroids, boundaries = reference.codebook(bits, qk)
    blocks = torch.from_numpy(x).reshape(-1, qk)
    norm = blocks.double().square().sum(-1).sqrt().float()
    paper = norm[:, None].half().float() * centroids[reference._indices(blocks, norm, boundaries)]
    ours = reference.dequantize(torch.from_numpy(ggml.quantize(TYPES[bits, qk], x, "cpu")), bits, qk).reshape(-1, qk)
    err_paper = (blocks - paper).double().square().sum(-1)
    err_ours = (blocks - ours).double().square().sum(-1)
    assert (err_ours <= err_paper * (1 + 2e-3) + 1e-12).all()
    assert err_ours.sum() < (0.97 if bits == 4 else 0.995) * err_paper.sum()  # and it helps on average
