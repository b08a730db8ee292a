#!/usr/bin/env python3
"""KV-cache speed on an NVIDIA GPU: llama-bench -fa 1, pp512 and tg64 at several depths, per K/V type.

A benchmark, not a test. It writes a Llama-3.1-8B-shaped GGUF with random Q4_0 weights (speed does
not depend on weight values), runs llama-bench once per cache configuration, measures the GPU's
device-to-device copy bandwidth, and writes bench.md (the table with the fraction of the memory
bound each tg64 reaches, and the ceiling: tg64 with f16's step at depth 0 plus only this cache's
bytes read at copy bandwidth, over f16 at that depth), bench.json and bench.png under --out. Results are kept per configuration,
so an interrupted run resumes.

    python scripts/cuda_bench.py --bin "$(tqkv bin --cuda)" --out results/cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

CONFIGS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"),
           ("tq4_0", "tq4_0"), ("tq3_0", "tq2_0"), ("tq2_0", "tq2_0")]
DEPTHS = [0, 8192, 32768, 65536]
BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "tq2_0": 2.25, "tq3_0": 3.25, "tq4_0": 4.25}

# Llama-3.1-8B: layers, d_model, d_ff, heads, KV heads, vocabulary (32000: a smaller tokenizer table)
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 32, 4096, 14336, 32, 8, 32000
HEAD_DIM = N_EMBD // N_HEAD
Q4_0_BYTES = 18 / 32  # bytes per weight


def write_model(path: Path) -> None:
    """The Llama-3.1-8B shape with random Q4_0 weights (tqkv.synth)."""
    from tqkv import synth

    synth.write_llama(path, N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB, q4_0=True)


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read plus written per second (median of 20)."""
    import torch

    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n / float(np.median(times[5:]))


def weight_bytes_per_token() -> float:
    """Weights a decode step reads: every matrix but the token embeddings (one row of it)."""
    per_layer = (2 * N_EMBD * N_EMBD + 2 * N_HEAD_KV * HEAD_DIM * N_EMBD + 3 * N_FF * N_EMBD) * Q4_0_BYTES
    return N_LAYER * per_layer + N_VOCAB * N_EMBD * Q4_0_BYTES


def kv_bytes_per_token(k: str, v: str, depth: int) -> float:
    """Cache a decode step at this depth reads (tg64's mean position is depth + 32)."""
    return N_LAYER * N_HEAD_KV * HEAD_DIM * (depth + 32) * (BITS[k] + BITS[v]) / 8


def run_config(bench: Path, model: Path, k: str, v: str, reps: int, cache: Path) -> list[dict]:
    out = cache / f"{k}-{v}.json"
    if out.exists():
        return json.loads(out.read_text())
    cmd = [str(bench), "-m", str(model), "-fa", "1", "-ngl", "99", "-ctk", k, "-ctv", v, "-p", "512", "-n", "64",
           "-d", ",".join(map(str, DEPTHS)), "-r", str(reps), "-o", "json"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed for {k}/{v}:\n{r.stderr[-3000:]}")
    rows = json.loads(r.stdout)
    out.write_text(json.dumps(rows))
    print(f"  {k}/{v}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def table(results: dict[str, list[dict]], bw: float) -> str:
    gpu = next(iter(results.values()))[0]["gpu_info"]
    lines = [f"GPU: {gpu}; device-to-device copy {bw / 1e12:.2f} TB/s (read + write). Model: Llama-3.1-8B shape, "
             f"random Q4_0 weights ({weight_bytes_per_token() / 1e9:.2f} GB read per token). llama-bench -fa 1 -ngl 99 "
             "-p 512 -n 64; t/s as mean ± sd; 'bound' = tg64 t/s over copy bandwidth / (weights + KV bytes per token); "
             "'ceiling' = 1 / (f16's tg64 step at depth 0 + KV bytes / copy bandwidth) over f16's tg64 at that depth: "
             "the most a cache can gain over f16 if its decode costs nothing beyond reading its bytes.",
             "", "| K / V | bits/value | depth | pp512 t/s | tg64 t/s | tg64 vs f16 | pp512 vs f16 | bound | ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f16 = {(r["n_depth"], r["n_prompt"] > 0): r["avg_ts"] for r in results["f16/f16"]}
    for name, rows in results.items():
        k, v = name.split("/")
        by = {(r["n_depth"], r["n_prompt"] > 0): r for r in rows}
        for d in DEPTHS:
            pp, tg = by.get((d, True)), by.get((d, False))
            if pp is None or tg is None:
                continue
            bound = bw / (weight_bytes_per_token() + kv_bytes_per_token(k, v, d))
            ceiling = 1 / (1 / f16[(0, False)] + kv_bytes_per_token(k, v, d) / bw)
            lines.append(f"| {name} | {(BITS[k] + BITS[v]) / 2:.2f} | {d} | {pp['avg_ts']:.0f} ± {pp['stddev_ts']:.0f} | "
                         f"{tg['avg_ts']:.1f} ± {tg['stddev_ts']:.1f} | {tg['avg_ts'] / f16[(d, False)]:.2f}x | "
                         f"{pp['avg_ts'] / f16[(d, True)]:.2f}x | {tg['avg_ts'] / bound:.0%} | "
                         f"{ceiling / f16[(d, False)]:.2f}x |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        for ax, prompt in zip(axes, (False, True)):
            pts = sorted((r["n_depth"], r["avg_ts"]) for r in rows if (r["n_prompt"] > 0) == prompt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for ax, title in zip(axes, ("tg64", "pp512")):
        ax.set_xlabel("depth (tokens in the cache)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}, llama-bench -fa 1")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(next(iter(results.values()))[0]["gpu_info"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, help="the CUDA build's tools (default: tqkv bin --cuda)")
    ap.add_argument("--model", type=Path, help="the random-weight model (default: in the build folder)")
    ap.add_argument("--out", type=Path, default=Path("results/cuda"))
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    from tqkv import build

    a.bin = a.bin or build.bin_dir(cuda=True)
    a.model = a.model or build.Layout().root / "llama8b-q4_0-random.gguf"
    cache = a.out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    if not a.model.exists() and not all((cache / f"{k}-{v}.json").exists() for k, v in CONFIGS):
        print(f"writing {a.model}", flush=True)
        write_model(a.model)
    bw_file = cache / "copy_bandwidth.json"
    if not bw_file.exists():
        bw_file.write_text(json.dumps(copy_bandwidth()))
    bw = json.loads(bw_file.read_text())
    results = {f"{k}/{v}": run_config(a.bin / "llama-bench", a.model, k, v, a.reps, cache) for k, v in CONFIGS}
    text = table(results, bw)
    (a.out / "bench.md").write_text(text + "\n")
    (a.out / "bench.json").write_text(json.dumps({"copy_bandwidth": bw, "runs": results}, indent=1))
    print(text)
    try:
        plot(results, a.out / "bench.png")
    except ImportError as e:  # the GPU machine may lack matplotlib: plot from bench.json elsewhere
        print(f"no plot ({e}); run `python scripts/cuda_bench.py --out {a.out}` where matplotlib is installed")


if __name__ == "__main__":
    main()
