import json
from pathlib import Path

import numpy as np
import pytest

from tqkv import codebooks

REPO = Path(__file__).resolve().parents[1]
# The paper's D_mse for unit vectors, quoted to 1-3 significant digits.
PAPER_D_MSE = {2: 0.117, 3: 0.03, 4: 0.009}


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads((REPO / codebooks.JSON_PATH).read_text())["bits"]


def test_committed_files_match_generator() -> None:
    for rel, data in codebooks.render().items():
        committed = (REPO / rel).read_bytes()
        assert committed == data, f"{rel} is stale: run `python -m tqkv codebooks`"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_shape(table: dict, bits: int) -> None:
    c = np.array(table[str(bits)]["centroids"], dtype=np.float32)
    b = np.array(table[str(bits)]["boundaries"], dtype=np.float32)
    assert len(c) == 2**bits and len(b) == 2**bits - 1
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    np.testing.assert_allclose(b, (c[:-1] + c[1:]) / 2, rtol=0, atol=1e-8)


def test_d_mse_matches_paper(table: dict) -> None:
    d_mse = {b: table[str(b)]["d_mse"] for b in (2, 3, 4)}
    # Measured: 0.1145, 0.0334, 0.00913 (b=3 is 11% above the paper's one-digit 0.03).
    for bits, quoted in PAPER_D_MSE.items():
        assert d_mse[bits] == pytest.approx(quoted, rel=0.15)
        # The exact d=64 law is slightly more concentrated than its Gaussian limit.
        gaussian = table[str(bits)]["gaussian"]["d_mse"]
        assert 0.95 * gaussian < d_mse[bits] < gaussian
    # Each extra bit divides the distortion by about 4 (measured 3.43 and 3.66).
    for bits in (2, 3):
        assert 3.0 < d_mse[bits] / d_mse[bits + 1] < 4.5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_monte_carlo_distortion(table: dict, bits: int) -> None:
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((20000, codebooks.BLOCK_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = np.array(table[str(bits)]["centroids"])
    nearest = c[np.abs(x[..., None] - c).argmin(axis=-1)]
    empirical = ((x - nearest) ** 2).sum(axis=1).mean()
    # Measured within 0.4% (about 2 standard errors) of the analytic value.
    assert empirical == pytest.approx(table[str(bits)]["d_mse"], rel=0.02)
