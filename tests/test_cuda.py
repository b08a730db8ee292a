"""The CUDA backend against the CPU and the reference (needs `tqkv build --cuda` and an NVIDIA GPU).

Skipped on machines without both, CI among them; run on the GPU machine (README, "CUDA").
"""

from __future__ import annotations

import pytest
import torch

from tqkv import build, parity
from tqkv.ggml_lib import Backend

from test_ggml_tests import CASES, run_backend_ops
from test_parity import K_ROT_CASES, check_k_rot

CUDA_BIN = build.Layout().bin_dir(cuda=True)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and (CUDA_BIN / "test-backend-ops").exists()),
                                reason="needs an NVIDIA GPU and `tqkv build --cuda`")


@pytest.mark.parametrize("op", CASES)
def test_backend_ops_cuda_vs_cpu(op: str) -> None:
    out = run_backend_ops(CUDA_BIN, "CUDA0", op)
    assert "not supported" not in out, out[-4000:]


def test_parity_cuda() -> None:
    checks = parity.run(CUDA_BIN, ["CUDA0"], real=False)
    assert checks and all(c.status == "pass" for c in checks), parity.report(checks)


@pytest.mark.parametrize("n, nrot, n_head, n_head_kv, mode", K_ROT_CASES)
def test_fused_key_rotation_cuda(n: int, nrot: int, n_head: int, n_head_kv: int, mode: int) -> None:
    be = Backend(CUDA_BIN, "CUDA0")
    try:
        check_k_rot(be, n, nrot, n_head, n_head_kv, mode)
    finally:
        be.close()
