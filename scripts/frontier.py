#!/usr/bin/env python3
"""The quality frontier of a model on a text: mean KLD against bits per value for bit-allocated
profiles (alloc:BITS), the uniform TurboQuant pairs, upstream's types and, with --peer-bin, another
llama.cpp build's cache types scored against that build's own f16 logits; one report and one plot.

    python scripts/frontier.py gemma3 --text alice29 --ctx 2048 --chunks 4 \
        --peer-bin /tmp/thetom-b/bin --peer-name fork --out results/quality

A peer's bits per value are what its cache really stores: the KV size its llama-perplexity reports
over the values the model's caches hold (a build that pads a head of 64 to 128 pays for the padding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

from tqkv import assets, profile, quality, runner

BUDGETS = ["2.5", "2.75", "3.25"]
OURS = ["tq2_0/tq2_0", "tq3_0/tq2_0", "tq3_0/tq3_0", "tq4_0/tq4_0"]
UPSTREAM = ["q8_0/q8_0", "q4_0/q4_0"]
PEER = ["turbo3/turbo2", "turbo3/turbo3", "turbo4/turbo4"]


def _run(binary: Path, args: list[str]) -> str:
    r = subprocess.run([str(binary), *args], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{binary} failed ({r.returncode}):\n{log[-3000:]}")
    return log


def peer_scores(bin_dir: Path, name: str, model: Path, text: Path, ctx: int, chunks: int, pairs: list[str],
                cache: Path) -> list[quality.Score]:
    """Score the peer build's K/V pairs against its own f16 logits (cached per binary and setting)."""
    ppl = bin_dir / "llama-perplexity"
    digest = hashlib.sha256(ppl.read_bytes()).hexdigest()[:12]
    tag = f"{name}-{digest}-{model.stem}-{profile.fingerprint(model)[:12]}-{text.stem}-c{ctx}-n{chunks}"
    base = cache / f"peer-base-{tag}.kld"
    if not base.exists():
        _run(ppl, ["-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                   "--kl-divergence-base", str(base), "-fa", "on", "-ctk", "f16", "-ctv", "f16"])
    layers = profile.read(profile.ensure(model)).layers.values()
    width = sum(k_mean.size for k_mean, _ in layers) // len(layers)  # values per K row (n_embd_k_gqa)
    scores = []
    for pair in pairs:
        out = cache / f"peer-score-{tag}-{pair.replace('/', '-')}.json"
        if out.exists():
            scores.append(quality.Score(**json.loads(out.read_text())))
            continue
        k, v = pair.split("/")
        log = _run(ppl, ["-m", str(model), "-c", str(ctx), "--kl-divergence-base", str(base), "--kl-divergence",
                         "-fa", "on", "-ctk", k, "-ctv", v, "-lv", "4"])
        vals = {f: float(re.search(p, log).group(1)) for f, p in quality._FIELDS.items()}
        s = quality.Score(f"{name}:{pair}", runner.kv_size(log).bits_per_value(width), **vals)
        out.write_text(json.dumps(asdict(s)))
        scores.append(s)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .gguf file or a built-in model")
    ap.add_argument("--text", default="alice29")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--budgets", nargs="*", default=BUDGETS)
    ap.add_argument("--peer-bin", type=Path, help="another llama.cpp build's bin folder")
    ap.add_argument("--peer-name", default="fork")
    ap.add_argument("--peer-pairs", nargs="*", default=PEER)
    ap.add_argument("--out", type=Path, default=Path("results/quality"))
    a = ap.parse_args()
    model, text = assets.model_arg(a.model), assets.text_arg(a.text)
    label = f"frontier-{assets.label(a.model)}-{assets.label(a.text)}"
    configs = [f"alloc:{b}" for b in a.budgets] + OURS + UPSTREAM
    scores = quality.run(model, text, a.ctx, a.chunks, configs, a.out, label=label)
    if a.peer_bin:
        cache = assets.cache_dir() / "ppl"
        peers = peer_scores(a.peer_bin, a.peer_name, model, text, a.ctx, a.chunks, a.peer_pairs, cache)
        stem = f"{label}-c{a.ctx}"
        quality.write_report(quality.merge(quality.load_report(a.out, stem), peers), a.out, stem)
        scores += peers
    print(quality.table(scores))


if __name__ == "__main__":
    main()
