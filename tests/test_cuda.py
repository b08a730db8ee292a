"""The CUDA backend against the CPU and the reference (needs `tqkv build --cuda` and an NVIDIA GPU).

Skipped on machines without both, CI among them; run on the GPU machine (README, "CUDA").
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tqkv import build, parity
from tqkv.ggml_lib import Backend

from test_ggml_tests import CASES, SMALL_CASES, run_backend_ops
from test_parity import K_ROT_CASES, check_k_rot

CUDA_BIN = build.Layout().bin_dir(cuda=True)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and (CUDA_BIN / "test-backend-ops").exists()),
                                reason="needs an NVIDIA GPU and `tqkv build --cuda`")


@pytest.mark.parametrize("op", CASES)
def test_backend_ops_cuda_vs_cpu(op: str) -> None:
    out = run_backend_ops(CUDA_BIN, "CUDA0", op, CASES[op])
    # the smaller blocks' forms have no CUDA kernels: said, not run (llama refuses such a cache on CUDA)
    unsupported = [line for line in out.splitlines() if "not supported" in line]
    assert len(unsupported) == SMALL_CASES.get(op, 0), out[-4000:]
    assert all("_b16" in line or "_b32" in line for line in unsupported), out[-4000:]


def test_parity_cuda() -> None:
    checks = parity.run(CUDA_BIN, ["CUDA0"], real=False)
    assert checks and all(c.status == ("unsupported" if "_b" in c.types else "pass") for c in checks), \
        parity.report(checks)


@pytest.mark.parametrize("n, nrot, n_head, n_head_kv, mode", K_ROT_CASES)
def test_fused_key_rotation_cuda(n: int, nrot: int, n_head: int, n_head_kv: int, mode: int) -> None:
    be = Backend(CUDA_BIN, "CUDA0")
    try:
        check_k_rot(be, n, nrot, n_head, n_head_kv, mode)
    finally:
        be.close()


@pytest.mark.parametrize("k,v", [("tq3_0", "tq2_0"), ("tq4_0", "tq4_0"), ("q8_0", "tq3_0")])
def test_llama_cpp_python_on_cuda(smollm2: Path, k: str, v: str) -> None:
    """Llama(n_gpu_layers=-1, type_k/type_v=TQ) from the install of `tqkv build --cuda`: the KV cache
    is on the GPU in the TQ types and the greedy answer is right (SmolLM2: the head-size-64 kernel,
    and upstream's vector kernel for the q8_0 key). In a fresh interpreter, whose stderr is llama.cpp's
    log of this model alone; this one already holds other ggml and CUDA libraries (ggml_lib's, torch's)."""
    script = (
        "import sys, llama_cpp; from pathlib import Path; from tqkv import demo\n"
        "assert llama_cpp.llama_supports_gpu_offload(), 'llama-cpp-python is a CPU build: run `tqkv build --cuda`'\n"
        "print(demo.generate(Path(sys.argv[1]), sys.argv[2], sys.argv[3], "
        "'What is the capital of France? Answer in one word.', max_tokens=12, n_gpu_layers=-1, verbose=True))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(smollm2), k, v], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    buffers = re.findall(r"(\S+) KV buffer size", r.stderr)
    assert buffers and set(buffers) == {"CUDA0"}, r.stderr[-4000:]
    ggml_name = {t: t.replace("tq", "turbo") for t in (k, v)}  # ggml's type names: turbo3_0, q8_0
    assert re.search(rf"K \({ggml_name[k]}\): .* V \({ggml_name[v]}\)", r.stderr), r.stderr[-4000:]
    assert "Paris" in r.stdout, r.stdout
