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

from tqkv import build, parity, runner, synth, types
from tqkv.ggml_lib import Backend

from test_ggml_tests import CASES, SMALL_CASES, run_backend_ops
from test_head_sizes import kld_run
from test_parity import K_ROT_CASES, check_k_rot
from test_rpc import KV_BUF, ops_by_device

CUDA_BIN = build.Layout().bin_dir(cuda=True)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and (CUDA_BIN / "test-backend-ops").exists()),
                                reason="needs an NVIDIA GPU and `tqkv build --cuda`")

@pytest.mark.parametrize("op", CASES)
def test_backend_ops_cuda_vs_cpu(op: str) -> None:
    # every case runs on CUDA, the smaller blocks' forms among them (none is "not supported")
    out = run_backend_ops(CUDA_BIN, "CUDA0", op, CASES[op] + SMALL_CASES.get(op, 0))
    assert "not supported" not in out, out[-4000:]


@pytest.mark.parametrize("op", ["FLASH_ATTN_EXT", "TURBO_FATTN_FUSED"])
def test_float_decode_kernel_cuda_vs_cpu(op: str) -> None:
    # GPUs older than Ampere decode on the float kernel, which newer ones take only when told to
    run_backend_ops(CUDA_BIN, "CUDA0", op, CASES[op] + SMALL_CASES.get(op, 0), env={"GGML_TQ_CUDA_NO_MMA": "1"})


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


@pytest.mark.parametrize("hd", [80, 96, 112])
def test_head_sizes_on_cuda(hd: int, alice: Path, tmp_path: Path) -> None:
    """A head size that is not a multiple of 64 keeps its TurboQuant cache on the GPU, in the form in
    blocks of 32 (96) or 16 (80, 112), and diverges from f16 as much as the same cache in host memory
    (-nkvo: the CPU's attention on the same stored bytes)."""
    model = synth.write_llama(tmp_path / f"head{hd}.gguf", n_embd=4 * hd, n_head=4, n_head_kv=2)
    base = tmp_path / "f16.kld"
    kld_run(model, alice, base, "f16", "f16", cuda=True, extra=("-ngl", "99"))
    gpu, _, log = kld_run(model, alice, base, "tq3_0", "tq2_0", cuda=True, extra=("-ngl", "99"))
    host, _, _ = kld_run(model, alice, base, "tq3_0", "tq2_0", cuda=True, extra=("-ngl", "99", "-nkvo"))
    buffers = re.findall(r"(\S+) KV buffer size", log)
    assert buffers and set(buffers) == {"CUDA0"}, log[-3000:]
    form_k, form_v = (types.for_head(t, hd).replace("tq", "turbo") for t in ("tq3_0", "tq2_0"))
    assert f"K ({form_k})" in log and f"V ({form_v})" in log, log[-3000:]
    assert 0 < gpu < 0.3 and gpu == pytest.approx(host, rel=0.05), (gpu, host)


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


def test_rpc_split_on_cuda(alice: Path, tmp_path: Path, monkeypatch) -> None:
    """llama.cpp's RPC backend on the GPU: a model's 6 layers split over two CUDA ggml-rpc-server
    processes and the local GPU (one card, three processes) give the perplexity of one process to
    the last digit, each device holds its layers' TurboQuant cache, and each server runs their key
    transform, stores and attention on CUDA."""
    model = synth.write_llama(tmp_path / "m.gguf", n_layer=6, n_embd=512, n_head=4, n_head_kv=2)
    args = ("-ngl", "99")
    one = runner.perplexity(model, alice, "tq3_0", "tq2_0", ctx=256, chunks=3, extra=args, cuda=True)
    env = {"GGML_RPC_DEBUG": "1"}
    with runner.RpcServer(env=env, cuda=True) as a, runner.RpcServer(env=env, cuda=True) as b:
        monkeypatch.setenv("GGML_SCHED_DEBUG", "2")
        # llama.cpp puts the RPC devices first: a third of the layers each, the rest and the output here
        split = runner.perplexity(model, alice, "tq3_0", "tq2_0", ctx=256, chunks=3, cuda=True,
                                  extra=(*args, "--rpc", f"{a.endpoint},{b.endpoint}", "-ts", "1,1,1", "-v"))
        served = [s.output() for s in (a, b)]
    assert split.ppl == one.ppl, (split.ppl, one.ppl)
    remote = {f"RPC0[{s.endpoint}]" for s in (a, b)}
    kv = {dev: float(mib) for dev, mib in KV_BUF.findall(split.log)}
    assert set(kv) == {"CUDA0", *remote}, kv
    one_kv = [float(mib) for _, mib in KV_BUF.findall(one.log)]
    assert abs(sum(kv.values()) - sum(one_kv)) < 0.02, (kv, one_kv)
    ops = ops_by_device(split.log)
    for dev in remote:
        n = ops[dev]["FLASH_ATTN"]
        assert n >= 1 and ops[dev] == {"FLASH_ATTN": n, "SET_ROWS": 2 * n, "TURBO_K_RO": 3 * n}, dict(ops)
    assert sum(ops[dev]["FLASH_ATTN"] for dev in ops) == 6, dict(ops)
    # a CUDA build's server serves the GPUs it finds (its CPU only where it finds none)
    for out in served:
        assert "ggml_cuda_init: found" in out and "[graph_compute] device: 0" in out, out[-2000:]
