#!/usr/bin/env python3
"""KV-cache speed on the CPU: llama-bench -fa 1, prefill and decode at depth 0 and 4k, per K/V type.

A benchmark, not a test; run it alone (ggml's worker threads spin while they wait, so two ggml
processes at once each run many times slower). Two models: SmolLM2-135M (head 64) and a slice of
the Llama-3.1-8B shape (head 128, GQA 4; random Q4_0 weights, --layers of its 32 layers: every
layer has the full model's shapes, so the attention-to-weights ratio per layer is the 8B one, and a
4k-deep prompt fits a short run). Writes a markdown table with each type's speed against q4_0's
and f16's to --out; each llama-bench result is kept (in the build folder) until --fresh, so an
interrupted run resumes.

    python scripts/cpu_bench.py --out results/cpu-bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from cuda_bench import cached_bench  # scripts/ is on the path when run as a script

CONFIGS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("tq4_0", "tq4_0"), ("tq3_0", "tq2_0")]
DEPTHS = (0, 4096)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(bench: Path, model: Path, k: str, v: str, p: int, n: int, reps: int, threads: int, out: Path) -> list[dict]:
    cmd = [str(bench), "-m", str(model), "-fa", "1", "-ngl", "0", "-t", str(threads), "-ctk", k, "-ctv", v,
           "-p", str(p), "-n", str(n), "-d", ",".join(map(str, DEPTHS)), "-r", str(reps), "-o", "json"]
    return cached_bench(cmd, out, f"{k}/{v}")


def table(title: str, results: dict[str, list[dict]]) -> list[str]:
    key = lambda r: (r["n_depth"], r["n_prompt"] > 0)  # noqa: E731
    base = {name: {key(r): r["avg_ts"] for r in rows} for name, rows in results.items()}
    lines = [f"### {title}", "", "| K / V | depth | prefill t/s | decode t/s | prefill vs q4_0 | decode vs q4_0 | "
             "prefill vs f16 | decode vs f16 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        by = {key(r): r for r in rows}
        for d in DEPTHS:
            pp, tg = by[(d, True)], by[(d, False)]
            lines.append(
                f"| {name} | {d} | {pp['avg_ts']:.1f} ± {pp['stddev_ts']:.1f} | {tg['avg_ts']:.2f} ± "
                f"{tg['stddev_ts']:.2f} | {pp['avg_ts'] / base['q4_0/q4_0'][(d, True)]:.2f}x | "
                f"{tg['avg_ts'] / base['q4_0/q4_0'][(d, False)]:.2f}x | "
                f"{pp['avg_ts'] / base['f16/f16'][(d, True)]:.2f}x | {tg['avg_ts'] / base['f16/f16'][(d, False)]:.2f}x |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, help="the CPU build's tools (default: tqkv bin)")
    ap.add_argument("--out", type=Path, default=Path("results/cpu-bench.md"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--layers", type=int, default=2, help="layers of the 8B shape (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="forget kept results (after a rebuild)")
    a = ap.parse_args()
    from tqkv import assets, build, synth

    a.bin = a.bin or build.bin_dir(cuda=False)
    runs = build.Layout().root / "cpu-bench-runs"
    runs.mkdir(parents=True, exist_ok=True)
    if a.fresh:
        for f in runs.glob("*.json"):
            f.unlink()
    shape = build.Layout().root / f"llama8b-{a.layers}layers-q4_0-random-spread.gguf"
    if not shape.exists():
        print(f"writing {shape}", flush=True)
        synth.write_llama(shape, a.layers, 4096, 32, 8, 128, 14336, 32000, q4_0=True, qk_scale=0.004)
    models = [("SmolLM2-135M-Instruct Q4_1 (head 64, 9 Q / 3 KV heads, 30 layers)", "smollm2",
               assets.model("smollm2"), 512, 64),
              (f"Llama-3.1-8B shape, {a.layers} of its 32 layers, random Q4_0 (head 128, 32 Q / 8 KV heads)",
               f"llama8b-{a.layers}", shape, 256, 32)]
    lines = ["# KV-cache speed on the CPU", "",
             f"CPU: {cpu_name()}, {os.cpu_count()} cores, `-t {a.threads}`. Build: `tqkv build` (AVX2/FMA/F16C, "
             f"`GGML_NATIVE=OFF`). llama-bench -fa 1 -ngl 0, depth {' and '.join(map(str, DEPTHS))}, "
             f"{a.reps} repetitions; t/s as mean ± sd. Command: `python scripts/cpu_bench.py`.", ""]
    for title, tag, model, p, n in models:
        results = {f"{k}/{v}": run(a.bin / "llama-bench", model, k, v, p, n, a.reps, a.threads,
                                   runs / f"{tag}-{k}-{v}.json") for k, v in CONFIGS}
        lines += table(f"{title}: pp{p}, tg{n}", results)
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
