"""Measurements behind docs/calibration.md: server reproducibility, KLD by ubatch size, and how well
a profile made on one text serves another. Prints markdown tables.

    python scripts/calibration_report.py [--starts 3] [--ctx 2048] [--chunks 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqkv import assets, profile, quality, repro

CONFIGS = ("tq4_0/tq4_0", "tq3_0/tq3_0", "tq3_0/tq2_0")
UBATCHES = (64, 128, 512)


def reproducibility(starts: int) -> str:
    model = assets.model("smollm2")
    profile.ensure(model)
    rows = ["| K / V | differing answers, each pair of starts (of 40) | keyword hits per start |", "|---|---|---|"]
    for k, v in (("f16", "f16"), ("tq3_0", "tq2_0")):
        s = repro.run(model, k, v, starts=starts)
        rows.append(f"| {k}/{v} | {', '.join(map(str, repro.differing(s)))} | {', '.join(str(x.keyword_hits) for x in s)} |")
    return "\n".join(rows)


def ubatch_table(model_name: str, ctx: int, chunks: int, cache: Path) -> str:
    model, text = assets.model(model_name), assets.text("alice29")
    prof = profile.ensure(model)
    base = quality.base_logits(model, text, ctx, chunks, cache)
    head = "| K / V | " + " | ".join(f"-ub {u}" for u in UBATCHES) + " | no profile (-ub 512) |"
    rows = [head, "|---" * (len(UBATCHES) + 2) + "|"]
    for c in CONFIGS:
        cfg = quality.Config.parse(c)
        kld = [quality.score(model, base, cfg, cache, ctx, prof, ("-ub", str(u))).kld_mean for u in UBATCHES]
        none = quality.score(model, base, quality.Config.parse(c + ":noprof"), cache, ctx, prof).kld_mean
        rows.append(f"| {c} | " + " | ".join(f"{x:.4f}" for x in kld) + f" | {none:.4f} |")
    return "\n".join(rows)


def generalization(model_name: str, ctx: int, chunks: int, cache: Path) -> str:
    """Scored on alice29: calibrated on lcet10 (the default) against calibrated on alice29 itself."""
    model, text = assets.model(model_name), assets.text("alice29")
    base = quality.base_logits(model, text, ctx, chunks, cache)
    profiles = {}
    for name in ("lcet10", "alice29"):
        t = time.perf_counter()
        profiles[name] = profile.calibrate(model, [assets.text(name)], out=cache / f"{model_name}-{name}.tqkv.gguf")
        print(f"[calibration_report] {model_name} calibrated on {name} in {time.perf_counter() - t:.1f} s", flush=True)
    rows = ["| K / V | calibrated on lcet10 | on alice29 (the scored text) | ratio |", "|---|---|---|---|"]
    for c in ("tq3_0/tq3_0", "tq3_0/tq2_0"):
        cfg = quality.Config.parse(c)
        kld = {n: quality.score(model, base, cfg, cache, ctx, p).kld_mean for n, p in profiles.items()}
        rows.append(f"| {c} | {kld['lcet10']:.4f} | {kld['alice29']:.4f} | {kld['lcet10'] / kld['alice29']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=4)
    a = p.parse_args()
    cache = assets.cache_dir() / "calibration-report"
    cache.mkdir(parents=True, exist_ok=True)
    print("## Reproducibility (SmolLM2, llama-server --parallel 4 -c 8192, 8 clients, 40 greedy chats)\n")
    print(reproducibility(a.starts), flush=True)
    for m in ("smollm2", "gemma3"):
        print(f"\n## Mean KLD by ubatch size ({m}, alice29, ctx {a.ctx}, {a.chunks} chunks)\n")
        print(ubatch_table(m, a.ctx, a.chunks, cache), flush=True)
    for m in ("smollm2", "gemma3"):
        print(f"\n## Generalization ({m}, scored on alice29, ctx {a.ctx}, {a.chunks} chunks)\n")
        print(generalization(m, a.ctx, a.chunks, cache), flush=True)


if __name__ == "__main__":
    main()
