#!/usr/bin/env python3
"""How far can 2-bit values go? Value-cache distortion against the KL divergence it causes.

For each value type: the relative MSE of real, rotated V rows (the layers `tqkv parity` uses) and
the mean KLD of an f16 K / that V cache (`tqkv ppl --configs f16/q8_0 ... f16/tq2_0`, ctx 2048,
results/quality/v-only). Between tq3_0 and tq2_0, log KLD is close to linear in log MSE; at the
rate of tq2_0 (2.25 bits per value, scale included) no code can beat the Gaussian
rate-distortion bound D = 2^(-2R) on rotated (near-Gaussian) coordinates, so the KLD that slope
gives at D is an estimate of the best any 2.25-bit value cache could do. It is compared with the
rate-distortion line of the quality report at q8_0/tq2_0's bits.

    python scripts/v_rate_distortion.py [--real-cache FILE]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tqkv import parity, quality, reference
from tqkv.types import cache_type

ROOT = Path(__file__).resolve().parents[1]
V_TYPES = ["q8_0", "q5_0", "q4_0", "tq4_0", "tq3_0", "tq2_0"]
UPSTREAM = {"q8_0": GGMLQuantizationType.Q8_0, "q5_0": GGMLQuantizationType.Q5_0, "q4_0": GGMLQuantizationType.Q4_0}


def rel_mse(v: torch.Tensor, t: str) -> float:
    x = v.reshape(-1, 64).numpy().astype(np.float32)
    if t in UPSTREAM:
        y = dequantize(quantize(x, UPSTREAM[t]), UPSTREAM[t]).reshape(x.shape)
    else:
        y = reference.dequantize(reference.quantize(torch.from_numpy(x), int(t[2])), int(t[2])).reshape(x.shape).numpy()
    return float(((y - x) ** 2).sum() / (x ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-cache", type=Path, help="torch file of real layers (else captured now)")
    a = ap.parse_args()
    real = torch.load(a.real_cache, weights_only=False) if a.real_cache else parity.real_layers()
    real = [r if isinstance(r, dict) else vars(r) for r in real]
    r_bits = cache_type("tq2_0").bits_per_value
    d_bound = 2.0 ** (-2 * r_bits)
    print(f"Gaussian rate-distortion bound at {r_bits} bits per value: relative MSE {d_bound:.4f}\n")
    print("| model | V type | bits | V relative MSE | KLD f16/V | |\n|---|---|---:|---:|---:|---|")
    for model in ("smollm2", "gemma3"):
        v = torch.cat([r["v"].reshape(-1, 64) for r in real if r["model"] == model])
        kld = {s["config"].split("/")[1]: s["kld_mean"]
               for s in json.loads((ROOT / f"results/quality/v-only/{model}-alice29-c2048.json").read_text())}
        mse = {t: rel_mse(v, t) for t in V_TYPES}
        for t in V_TYPES:
            print(f"| {model} | {t} | {cache_type(t).bits_per_value:.2f} | {mse[t]:.4f} | {kld[t]:.4f} | |")
        slope = math.log(kld["tq2_0"] / kld["tq3_0"]) / math.log(mse["tq2_0"] / mse["tq3_0"])
        est = kld["tq3_0"] * (d_bound / mse["tq3_0"]) ** slope
        report = quality.load_report(ROOT / "results/quality", f"{model}-alice29-c2048")
        q8tq2 = next(s for s in report if s.config == "q8_0/tq2_0")
        line = quality.rd_line(report)(q8tq2.bits)
        print(f"| {model} | bound | {r_bits:.2f} | {d_bound:.4f} | {est:.4f} | slope {slope:.2f}; q8_0/tq2_0 "
              f"({q8tq2.bits:.2f} bits) KLD {q8tq2.kld_mean:.4f}, line {line:.4f}; bound at {est / line:.2f}x the line |")


if __name__ == "__main__":
    main()
