"""Upstream's own op tests, run on the patched build for the TurboQuant types."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

TQ = tuple(f"turbo{b}_0{form}" for form in ("", "_b32", "_b16") for b in (2, 3, 4))


def test_quantize_fns(bin_dir: Path) -> None:
    r = subprocess.run([str(bin_dir / "test-quantize-fns"), "-v"], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for t in TQ:
        # quantization error, fast-vs-reference identity and vec_dot error, each "ok"
        lines = [line for line in out.splitlines() if line.split()[:1] == [t]]
        assert len(lines) == 3 and all(" ok " in line + " " for line in lines), "\n".join(lines) or out[-2000:]


# TurboQuant cases registered by patches/0004: 3 types x head sizes 64/128/256 (plus the encoder's
# many-block path), and for FLASH_ATTN_EXT 3 batch sizes x (TQ/TQ + TQ mixed both ways with f16 and
# q8_0) plus the GQA decode kernel's head groups, mixes and feature flags; and the fused key
# scale/rotation/offset op (patches/0010), its store into the cache (fused on CUDA, patches/0012) and
# a decode step's attention with the query's transform and the output rotation (fused on CUDA,
# patches/0015), every case of which is ours
CASES = {"SET_ROWS": 21, "GET_ROWS": 9, "CPY": 30, "FLASH_ATTN_EXT": 207, "TURBO_K_ROT": 28, "TURBO_K_ROT_SET_ROWS": 30,
         "TURBO_FATTN_FUSED": 24}
# and the forms in blocks of 16 (head sizes 80/96/112) and 32 (96), with the key rotation in runs of
# 16 and 32 at those head sizes
SMALL_CASES = {"SET_ROWS": 24, "GET_ROWS": 12, "CPY": 36, "FLASH_ATTN_EXT": 156, "TURBO_K_ROT": 15}


def run_backend_ops(bin_dir: Path, backend: str, op: str, n: int, env: dict[str, str] | None = None) -> str:
    """test-backend-ops on the TurboQuant cases of op (env: extra environment); asserts that n of
    them ran and all passed."""
    only_tq = [] if op.startswith("TURBO_K_ROT") else ["-p", "turbo"]
    r = subprocess.run([str(bin_dir / "test-backend-ops"), "test", "-b", backend, "-o", op, *only_tq],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, **(env or {})})
    out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    assert r.returncode == 0, out[-4000:]
    assert f"{n}/{n} tests passed" in out, out[-4000:]
    return out


@pytest.mark.parametrize("op", CASES)
def test_backend_ops(bin_dir: Path, op: str) -> None:
    # without a GPU the only backend is the CPU, which test-backend-ops compares with itself: this
    # runs every TurboQuant case through the CPU support check and kernels (crash, abort, NaN);
    # on the GPU machine the same command compares CUDA with the CPU
    n = CASES[op] + SMALL_CASES.get(op, 0)
    out = run_backend_ops(bin_dir, "CPU", op, n)
    assert len(re.findall(rf"^\s+{op}\(.*\): OK$", out, re.M)) == n, out[-4000:]
