"""llama.cpp's RPC backend with a TurboQuant cache (tq3_0 keys, tq2_0 values, flash attention):
SmolLM2's 30 layers split over the local CPU and two ggml-rpc-server processes on 127.0.0.1, 10
layers each, give the same perplexity and the same greedy text as one process, and each remote
process holds its layers' TurboQuant cache and runs their key transform, cache stores and
attention (no silent fallback: the RPC backend accepts every op, and nothing of the cache is
copied back)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from tqkv import runner

QUESTION = "What is the capital of France? Answer in one sentence."
# -ngl 21: the output layer and the last 20 of the 30 layers leave the local CPU; -ts 10,11 gives
# the first remote device 10 of those 21 and the second the other 10 plus the output layer
SPLIT = ("-ngl", "21", "-ts", "10,11")
KV_BUF = re.compile(r"llama_kv_cache: +(\S+) KV buffer size = +([0-9.]+) MiB")
_SPLIT_HDR = re.compile(r"## SPLIT #(\d+): (\S+) #")
_NODE = re.compile(r"node # *\d+ \( *([A-Z_]+)\): +(\S+)")


def split_args(a: runner.RpcServer, b: runner.RpcServer) -> tuple[str, ...]:
    return ("--rpc", f"{a.endpoint},{b.endpoint}", *SPLIT)


@pytest.fixture(scope="module")
def rpc_pair():
    # GGML_RPC_DEBUG: each server logs the commands it serves
    env = {"GGML_RPC_DEBUG": "1"}
    with runner.RpcServer(env=env) as a, runner.RpcServer(env=env) as b:
        yield a, b


def ops_by_device(log: str) -> dict[str, collections.Counter]:
    """The TurboQuant cache's ops in the first graph the scheduler split (GGML_SCHED_DEBUG=2), by
    the device that runs them: the fused key/value transform, stores into the cache, attention."""
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    device = None
    for line in log.splitlines():
        if m := _SPLIT_HDR.search(line):
            if m.group(1) == "0" and device is not None:
                break
            device = m.group(2)
        elif (m := _NODE.search(line)) and device:
            op, name = m.groups()
            if op in ("FLASH_ATTN", "TURBO_K_RO") or (op == "SET_ROWS" and name.startswith("cache_")):
                found[device][op] += 1
    return found


def test_split_perplexity_equals_one_process(smollm2: Path, alice: Path, rpc_pair, monkeypatch) -> None:
    a, b = rpc_pair
    one = runner.perplexity(smollm2, alice, "tq3_0", "tq2_0", ctx=256, chunks=3, threads=2)
    monkeypatch.setenv("GGML_SCHED_DEBUG", "2")  # (printed at -v) each node of each split graph and its device
    split = runner.perplexity(smollm2, alice, "tq3_0", "tq2_0", ctx=256, chunks=3, threads=2,
                              extra=(*split_args(a, b), "-v"))
    assert split.ppl == one.ppl, (split.ppl, one.ppl)
    assert "offloaded 21/31 layers" in split.log, split.log[-3000:]
    # each device holds its 10 layers' cache (a remote device is RPC0 of its own endpoint)
    kv = {dev: float(mib) for dev, mib in KV_BUF.findall(split.log)}
    remote = {f"RPC0[{s.endpoint}]" for s in (a, b)}
    assert set(kv) == {"CPU", *remote} and len(set(kv.values())) == 1, kv
    one_kv = [float(mib) for _, mib in KV_BUF.findall(one.log)]
    assert abs(sum(kv.values()) - sum(one_kv)) < 0.02, (kv, one_kv)
    # and runs its 10 layers' TurboQuant ops: per layer one attention, a store into the K and the V
    # cache, the key and the query transform and the value rotation
    ops = ops_by_device(split.log)
    want = collections.Counter({"FLASH_ATTN": 10, "SET_ROWS": 20, "TURBO_K_RO": 30})
    assert {dev: ops[dev] for dev in remote | {"CPU"}} == dict.fromkeys(remote | {"CPU"}, want), dict(ops)
    # the remote processes computed graphs
    for s in (a, b):
        assert "[graph_compute] device: 0" in s.output(), s.output()[-2000:]


def test_split_greedy_text_equals_one_process(smollm2: Path, rpc_pair) -> None:
    a, b = rpc_pair
    args = [*runner.cache_args("tq3_0", "tq2_0"), "-t", "2"]
    with runner.Server(smollm2, args) as srv:
        one = srv.chat(QUESTION)
    with runner.Server(smollm2, [*args, *split_args(a, b)]) as srv:
        split = srv.chat(QUESTION)
    assert split == one and "Paris" in one, (split, one)
