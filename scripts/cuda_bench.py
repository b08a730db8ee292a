#!/usr/bin/env python3
"""KV-cache speed on an NVIDIA GPU: llama-bench -fa 1, pp512 and tg64 at several depths, per K/V type.

A benchmark, not a test. It writes a Llama-3.1-8B-shaped GGUF with random Q4_0 weights (speed does
not depend on weight values), runs llama-bench once per cache configuration, measures the GPU's
device-to-device copy bandwidth, and writes bench.md (the table with the fraction of the memory
bound each tg64 reaches, and the ceiling: tg64 with f16's step at depth 0 plus only this cache's
bytes read at copy bandwidth, over f16 at that depth), bench.json and bench.png under --out. Results are kept per
configuration, so an interrupted run resumes.

`--peer NAME=DIR` benches another llama.cpp build's llama-bench (DIR holds it) in the same run, on the same model,
for `--peer-configs` (its own cache type names): its rows carry NAME, and every row is also compared with the
fastest f16/f16 of all builds at that depth ("vs best f16"), so a gain is never measured against a slow base.

    python scripts/cuda_bench.py --bin "$(tqkv bin --cuda)" --out results/cuda
    python scripts/cuda_bench.py --peer fork=/tmp/thetom-b/bin --peer-configs f16/f16 turbo3/turbo2 turbo4/turbo4
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
# bits per value, scales included; turbo2/3/4 are TheTom/llama-cpp-turboquant's types (blocks of 128)
BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "tq2_0": 2.25, "tq3_0": 3.25, "tq4_0": 4.25,
        "turbo2": 2.125, "turbo3": 3.125, "turbo4": 4.25}

# Llama-3.1-8B: layers, d_model, d_ff, heads, KV heads, vocabulary (32000: a smaller tokenizer table)
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 32, 4096, 14336, 32, 8, 32000
HEAD_DIM = N_EMBD // N_HEAD
Q4_0_BYTES = 18 / 32  # bytes per weight


def write_model(path: Path) -> None:
    """The Llama-3.1-8B shape with random Q4_0 weights (tqkv.synth), attention spread as in a real
    model: a kernel that skips value rows of negligible weight must not gain from one-hot softmax."""
    from tqkv import synth

    synth.write_llama(path, N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB, q4_0=True, qk_scale=0.004)


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


def cached_bench(cmd: list[str], out: Path, label: str) -> list[dict]:
    """llama-bench's JSON rows for cmd, kept in out: an interrupted run resumes where it stopped."""
    if out.exists():
        return json.loads(out.read_text())
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed for {label}:\n{r.stderr[-3000:]}")
    rows = json.loads(r.stdout)
    out.write_text(json.dumps(rows))
    print(f"  {label}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def run_config(bench: Path, model: Path, k: str, v: str, reps: int, cache: Path, build: str = "") -> list[dict]:
    cmd = [str(bench), "-m", str(model), "-fa", "1", "-ngl", "99", "-ctk", k, "-ctv", v, "-p", "512", "-n", "64",
           "-d", ",".join(map(str, DEPTHS)), "-r", str(reps), "-o", "json"]
    return cached_bench(cmd, cache / f"{build + '-' if build else ''}{k}-{v}.json", f"{build or 'this build'} {k}/{v}")


def split(name: str) -> tuple[str, str, str]:
    """"fork: f16/f16" -> ("fork", "f16", "f16"); this build's rows carry no build name."""
    build, _, kv = name.rpartition(": ")
    k, v = kv.split("/")
    return build, k, v


def table(results: dict[str, list[dict]], bw: float) -> str:
    gpu = next(iter(results.values()))[0]["gpu_info"]
    peers = sorted({split(n)[0] for n in results} - {""})
    lines = [f"GPU: {gpu}; device-to-device copy {bw / 1e12:.2f} TB/s (read + write). Model: Llama-3.1-8B shape, "
             f"random Q4_0 weights ({weight_bytes_per_token() / 1e9:.2f} GB read per token). llama-bench -fa 1 -ngl 99 "
             "-p 512 -n 64; t/s as mean ± sd; 'bound' = tg64 t/s over copy bandwidth / (weights + KV bytes per token); "
             "'ceiling' = 1 / (f16's tg64 step at depth 0 + KV bytes / copy bandwidth) over f16's tg64 at that depth: "
             "the most a cache can gain over f16 if its decode costs nothing beyond reading its bytes. 'vs f16' is "
             "against this build's f16/f16" + (f"; 'vs best f16' against the faster f16/f16 of this build and "
                                              f"{', '.join(peers)} at that depth." if peers else "."),
             "", "| K / V | bits/value | depth | pp512 t/s | tg64 t/s | tg64 vs f16 | pp512 vs f16 | "
             + ("tg64 vs best f16 | pp512 vs best f16 | " if peers else "") + "bound | ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if peers else "") + "---:|---:|"]
    f16 = {(r["n_depth"], r["n_prompt"] > 0): r["avg_ts"] for r in results["f16/f16"]}
    best = dict(f16)
    for name, rows in results.items():
        if split(name)[1:] == ("f16", "f16"):
            for r in rows:
                key = (r["n_depth"], r["n_prompt"] > 0)
                best[key] = max(best.get(key, 0.0), r["avg_ts"])
    for name, rows in results.items():
        _, k, v = split(name)
        by = {(r["n_depth"], r["n_prompt"] > 0): r for r in rows}
        for d in DEPTHS:
            pp, tg = by.get((d, True)), by.get((d, False))
            if pp is None or tg is None:
                continue
            bound = bw / (weight_bytes_per_token() + kv_bytes_per_token(k, v, d))
            ceiling = 1 / (1 / f16[(0, False)] + kv_bytes_per_token(k, v, d) / bw)
            vs_best = (f"{tg['avg_ts'] / best[(d, False)]:.2f}x | {pp['avg_ts'] / best[(d, True)]:.2f}x | "
                       if peers else "")
            lines.append(f"| {name} | {(BITS[k] + BITS[v]) / 2:.2f} | {d} | {pp['avg_ts']:.0f} ± {pp['stddev_ts']:.0f} | "
                         f"{tg['avg_ts']:.1f} ± {tg['stddev_ts']:.1f} | {tg['avg_ts'] / f16[(d, False)]:.2f}x | "
                         f"{pp['avg_ts'] / f16[(d, True)]:.2f}x | {vs_best}{tg['avg_ts'] / bound:.0%} | "
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
    ap.add_argument("--depths", nargs="+", type=int, default=DEPTHS, help="KV depths (default: %(default)s)")
    ap.add_argument("--configs", nargs="+", metavar="K/V", help="this build's cache pairs (default: "
                    + " ".join(f"{k}/{v}" for k, v in CONFIGS) + ")")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=DIR",
                    help="another llama.cpp build whose llama-bench is in DIR, benched in the same run")
    ap.add_argument("--peer-configs", nargs="+", default=["f16/f16"], metavar="K/V",
                    help="the cache pairs to bench on each peer build, in its own type names")
    a = ap.parse_args()
    DEPTHS[:] = a.depths
    configs = [tuple(c.split("/")) for c in a.configs] if a.configs else CONFIGS
    if ("f16", "f16") not in configs:
        configs.insert(0, ("f16", "f16"))
    peers = []
    for p in a.peer:
        name, _, d = p.partition("=")
        if not name or not (Path(d) / "llama-bench").is_file():
            raise SystemExit(f"--peer {p}: expected NAME=DIR with DIR/llama-bench")
        peers.append((name, Path(d)))
    for c in [*(a.configs or []), *(a.peer_configs if peers else [])]:
        k, _, v = c.partition("/")
        if k not in BITS or v not in BITS:
            raise SystemExit(f"unknown cache pair {c}: the types are {', '.join(BITS)}")
    from tqkv import build

    a.bin = a.bin or build.bin_dir(cuda=True)
    a.model = a.model or build.Layout().root / "llama8b-q4_0-random-spread.gguf"
    cache = a.out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    cached = [cache / f"{k}-{v}.json" for k, v in configs]
    cached += [cache / f"{n}-{c.replace('/', '-')}.json" for n, _ in peers for c in a.peer_configs]
    if not a.model.exists() and not all(f.exists() for f in cached):
        print(f"writing {a.model}", flush=True)
        write_model(a.model)
    bw_file = cache / "copy_bandwidth.json"
    if not bw_file.exists():
        bw_file.write_text(json.dumps(copy_bandwidth()))
    bw = json.loads(bw_file.read_text())
    results = {f"{k}/{v}": run_config(a.bin / "llama-bench", a.model, k, v, a.reps, cache) for k, v in configs}
    for name, d in peers:
        for c in a.peer_configs:
            k, v = c.split("/")
            results[f"{name}: {k}/{v}"] = run_config(d / "llama-bench", a.model, k, v, a.reps, cache, name)
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
