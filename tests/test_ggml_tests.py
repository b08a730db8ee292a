"""Upstream's own op tests, run on the patched build for the TurboQuant types."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

TQ = ("turbo2_0", "turbo3_0", "turbo4_0")


def test_quantize_fns(bin_dir: Path) -> None:
    r = subprocess.run([str(bin_dir / "test-quantize-fns"), "-v"], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for t in TQ:
        # quantization error, fast-vs-reference identity and vec_dot error, each "ok"
        lines = [line for line in out.splitlines() if line.strip().startswith(t)]
        assert len(lines) == 3 and all(" ok " in line + " " for line in lines), "\n".join(lines) or out[-2000:]


@pytest.mark.parametrize("op", ["SET_ROWS", "GET_ROWS", "CPY", "FLASH_ATTN_EXT"])
def test_backend_ops(bin_dir: Path, op: str) -> None:
    # without a GPU the only backend is the CPU, which test-backend-ops compares with itself: this
    # runs every TurboQuant case through the CPU support check and kernels (crash, abort, NaN);
    # on the GPU machine the same command compares CUDA with the CPU
    r = subprocess.run([str(bin_dir / "test-backend-ops"), "test", "-b", "CPU", "-o", op, "-p", "turbo"],
                       capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    passed = re.findall(r"^\s+" + op + r"\(.*turbo.*\): OK", out, re.M)
    assert passed, out[-4000:]
    assert "FAIL" not in out and "not supported" not in out, out[-4000:]
