#!/usr/bin/env python3
"""A trellis code for 2-bit values: does a QTIP-style bitshift trellis beat tq2_0 at the same rate?

tq2_0 stores a 64-value block of a rotated V row as one fp16 scale and 64 two-bit Lloyd-Max
indices (2.25 bits per value). This script compares, at exactly that budget (fp16 scale + 128
code bits per block), on the real rotated V rows that `tqkv parity` uses and on i.i.d. Gaussian
blocks:

* tq2_0 itself (tqkv.reference, the bytes ggml stores);
* a bitshift trellis (Tseng et al. 2024, QTIP): an L-bit state that shifts in 2 bits per value,
  s_t = ((s_{t-1} << 2) | b_t) mod 2^L, value t reconstructed as d * code[s_t]; the encoder is a
  Viterbi search of the path with least squared error. The 128 stored bits are the 64 symbols b_t.
  The state of value t is the window of the last L/2 symbols, so a decoder reads every value
  independently. Block start: `tailbite` reads the window circularly (the windows of the first
  L/2-1 values wrap around to the block's last symbols; no extra bits; encoded with QTIP's two-pass
  approximation: Viterbi on the block rotated by 32 values with a free start, then a Viterbi on the
  block whose start and end are tied to the overlap that pass chose), or `zero` (symbols before
  the block are zero bits; one Viterbi). Codes over the 2^L states, each scaled to unit RMS over
  the states: `lut`, the 2^L Gaussian quantiles in a fixed pseudo-random order (a table of 2^L
  fp16); `1mad` and `3inst`, QTIP's computed codes (a hash of the state, no table);
* optionally (--vq) a 4-dimensional vector quantizer of 256 entries (8 bits per 4 values), trained
  by k-means on Gaussian vectors.

Every code picks its scale as tq2_0 does: for each candidate s = f * rms(block) it quantizes
x / s, fits d = <x,c>/<c,c> by least squares and keeps the candidate with the least residual;
d is stored as fp16. The relative MSE (sum of squared errors / sum of squares over the blocks)
then gives an estimated KLD by the fit of results/experiments.md section 6: log KLD linear in
log MSE between tq3_0 and tq2_0 values (f16 K, results/quality/v-only), anchored at tq2_0. The
ratio to tq2_0 also estimates the change of q8_0/tq2_0 (K near lossless; results/quality).

    python scripts/v_trellis_experiment.py --real-cache FILE [--L 4 6 8 10 12] [--codes lut 1mad 3inst]
        [--start tailbite zero] [--blocks N] [--gaussian N] [--scales LO HI N] [--vq]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tqkv import parity, quality, reference

ROOT = Path(__file__).resolve().parents[1]
QK = reference.QK
SYMBOL_BITS = 2
MODELS = {"smollm2": "SmolLM2", "gemma3": "Gemma-3-270M"}

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # x / s [B, 64] -> unit-scale reconstruction c


# --- data ---

def real_blocks(real: list[dict], model: str, n: int, seed: int) -> torch.Tensor:
    """The model's rotated V rows as 64-value blocks; a seeded random subset of n if n > 0."""
    x = torch.cat([r["v"].reshape(-1, QK) for r in real if r["model"] == model]).float()
    if 0 < n < x.shape[0]:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]
    return x


def rel_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((y.double() - x.double()).square().sum() / x.double().square().sum())


def tq_store(x: torch.Tensor, bits: int) -> torch.Tensor:
    return reference.dequantize(reference.quantize(x, bits), bits).reshape(x.shape)


# --- codes over the trellis states ---

def _unit_rms(c: torch.Tensor) -> torch.Tensor:
    return (c / c.square().mean().sqrt()).float()


def code_lut(L: int) -> torch.Tensor:
    """Gaussian quantiles Phi^-1((i + 1/2) / 2^L) in the order of a fixed random permutation."""
    n = 1 << L
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).double()
    return _unit_rms(math.sqrt(2) * torch.erfinv(2 * (perm + 0.5) / n - 1))


def code_1mad(L: int) -> torch.Tensor:
    """QTIP's 1MAD: x = 34038481 * s + 76625530 mod 2^32, the sum of its four bytes, centred."""
    x = (np.arange(1 << L, dtype=np.uint64) * 34038481 + 76625530) & 0xFFFFFFFF
    y = sum((x >> np.uint64(8 * i)) & np.uint64(255) for i in range(4)).astype(np.float64) - 510
    return _unit_rms(torch.from_numpy(y))


def code_3inst(L: int) -> torch.Tensor:
    """QTIP's 3INST: x = 89226354 * s + 64248484 mod 2^32, (x & 0x8FFF8FFF) ^ 0x3B603B60 read as
    two fp16 halves, summed."""
    x = (np.arange(1 << L, dtype=np.uint64) * 89226354 + 64248484) & 0xFFFFFFFF
    h = ((x & 0x8FFF8FFF) ^ 0x3B603B60).astype(np.uint32).view(np.float16).reshape(-1, 2)
    return _unit_rms(torch.from_numpy(h.astype(np.float64).sum(1)))


CODES: dict[str, Callable[[int], torch.Tensor]] = {"lut": code_lut, "1mad": code_1mad, "3inst": code_3inst}


# --- bitshift trellis ---

def viterbi(z: torch.Tensor, code: torch.Tensor, L: int, first: torch.Tensor | None,
            last: torch.Tensor | None) -> torch.Tensor:
    """States [B, T] of the path of least sum_t (z_t - code[s_t])^2, s_t = (s_{t-1} << 2 | b_t) mod 2^L.

    first [B]: the low L-2 bits of the state before step 0 (the bits s_0 keeps), None for a free
    start; last [B]: the low L-2 bits the last state must have, None for a free end.
    """
    B, T = z.shape
    S = 1 << L
    Q = S >> SYMBOL_BITS  # the predecessors of state s are (s >> 2) + c*Q, c = 0..3
    code2 = code * code
    if first is None:
        D = torch.zeros(B, S)
    else:
        D = torch.full((B, S), math.inf).scatter_(1, first[:, None] + torch.arange(4)[None] * Q, 0.0)
    back = torch.empty(T, B, Q, dtype=torch.uint8)
    for t in range(T):
        m, back[t] = D.view(B, 4, Q).min(1)
        D = (torch.addcmul(code2, z[:, t:t + 1], code[None], value=-2).view(B, Q, 4) + m[:, :, None]).view(B, S)
    if last is not None:
        ends = last[:, None] + torch.arange(4)[None] * Q
        D = torch.full_like(D, math.inf).scatter_(1, ends, D.gather(1, ends))
    states = torch.empty(B, T, dtype=torch.int64)
    states[:, -1] = D.argmin(1)
    for t in range(T - 1, 0, -1):
        r = states[:, t] >> SYMBOL_BITS
        states[:, t - 1] = back[t].gather(1, r[:, None])[:, 0].long() * Q + r
    return states


def trellis_states(z: torch.Tensor, code: torch.Tensor, L: int, start: str) -> torch.Tensor:
    """The encoder: the states of each block of z ([B, 64]) under the block-start rule."""
    if start == "zero":
        return viterbi(z, code, L, torch.zeros(z.shape[0], dtype=torch.int64), None)
    half = z.shape[1] // 2
    rotated = viterbi(torch.roll(z, -half, 1), code, L, None, None)  # free start, mid-block seam
    tie = rotated[:, half - 1] & ((1 << (L - SYMBOL_BITS)) - 1)       # its state at the last value
    return viterbi(z, code, L, tie, tie)


def decode_states(symbols: torch.Tensor, L: int, start: str) -> torch.Tensor:
    """The decoder: the state of value t is its last L/2 symbols (read circularly for tailbite,
    zeros before the block for zero); every value on its own, no sequential dependency."""
    h, T = L // SYMBOL_BITS, symbols.shape[1]
    before = symbols[:, T - (h - 1):] if start == "tailbite" else torch.zeros_like(symbols[:, :h - 1])
    padded = torch.cat([before, symbols], 1)
    states = torch.zeros_like(symbols)
    for j in range(h):
        states |= padded[:, h - 1 - j:h - 1 - j + T] << (SYMBOL_BITS * j)
    return states


def trellis_quantizer(code: torch.Tensor, L: int, start: str, chunk: int) -> Quantizer:
    """Viterbi-encode, keep only the 2-bit symbols, decode them (checked against the encoder)."""
    def quantize(z: torch.Tensor) -> torch.Tensor:
        states = torch.cat([trellis_states(c, code, L, start) for c in z.split(chunk)])
        symbols = states & ((1 << SYMBOL_BITS) - 1)
        decoded = decode_states(symbols, L, start)
        if not torch.equal(decoded, states):
            raise AssertionError("the stored symbols do not decode to the encoder's states")
        return code[decoded]
    return quantize


# --- 4-dimensional vector quantizer ---

VQ_DIM, VQ_ENTRIES = 4, 256


def _nearest(v: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    return (book.square().sum(1)[None] - 2 * v @ book.T).argmin(1)


def train_vq(n: int = 1 << 18, iters: int = 40) -> torch.Tensor:
    """k-means (Lloyd) on n standard Gaussian 4-vectors, started from 256 of them."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(n, VQ_DIM, generator=g)
    book = data[torch.randperm(n, generator=g)[:VQ_ENTRIES]].clone()
    for _ in range(iters):
        idx = _nearest(data, book)
        counts = torch.bincount(idx, minlength=VQ_ENTRIES)[:, None]
        sums = torch.zeros_like(book).index_add_(0, idx, data)
        book = torch.where(counts > 0, sums / counts.clamp_min(1), book)
    return book


def vq_quantizer(book: torch.Tensor) -> Quantizer:
    def quantize(z: torch.Tensor) -> torch.Tensor:
        return book[_nearest(z.reshape(-1, VQ_DIM), book)].reshape(z.shape)
    return quantize


# --- scale, as tq2_0 picks it ---

def store_scaled(x: torch.Tensor, quantize: Quantizer, factors: torch.Tensor) -> torch.Tensor:
    """Per block: for s = f * rms(x), c = quantize(x / s) and d = <x,c>/<c,c>; the candidate with
    the least residual wins (ties to the first); returns float(fp16(d)) * c."""
    x64 = x.double()
    xx = x64.square().sum(1)
    rms = (xx / QK).sqrt().float().clamp_min(torch.finfo(torch.float32).tiny)
    best = torch.full_like(xx, math.inf)
    d = torch.zeros_like(xx)
    c = torch.zeros_like(x64)
    for f in factors:
        ck = quantize(x / (rms * f)[:, None]).double()
        xc = (x64 * ck).sum(1)
        dk = xc / ck.square().sum(1).clamp_min(1e-300)
        res = xx - xc * dk
        better = res < best
        best, d, c = torch.where(better, res, best), torch.where(better, dk, d), torch.where(better[:, None], ck, c)
    d16 = d.float().clamp(-reference.FP16_MAX, reference.FP16_MAX).half().float()
    return (d16[:, None] * c).float()


# --- the KLD fit of section 6 ---

def kld_fit(model: str, x: torch.Tensor, mse_tq2: float) -> tuple[float, float, float]:
    """(slope of log KLD in log MSE between tq3_0 and tq2_0 values, KLD f16/tq2_0, KLD q8_0/tq2_0)."""
    kld = {s["config"]: s["kld_mean"]
           for s in json.loads((ROOT / f"results/quality/v-only/{model}-alice29-c2048.json").read_text())}
    slope = math.log(kld["f16/tq2_0"] / kld["f16/tq3_0"]) / math.log(mse_tq2 / rel_mse(x, tq_store(x, 3)))
    q8 = next(s.kld_mean for s in quality.load_report(ROOT / "results/quality", f"{model}-alice29-c2048")
              if s.config == "q8_0/tq2_0")
    return slope, kld["f16/tq2_0"], q8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-cache", type=Path, help="torch file of real layers (else captured now)")
    ap.add_argument("--L", type=int, nargs="+", default=[4, 6, 8, 10, 12], help="trellis state bits (even)")
    ap.add_argument("--codes", nargs="+", choices=sorted(CODES), default=["lut", "1mad", "3inst"])
    ap.add_argument("--start", nargs="+", choices=["tailbite", "zero"], default=["tailbite"])
    ap.add_argument("--blocks", type=int, default=0, help="random blocks per model (0: all)")
    ap.add_argument("--gaussian", type=int, default=2048, help="i.i.d. Gaussian blocks")
    ap.add_argument("--scales", type=float, nargs=3, default=[0.80, 1.20, 9], metavar=("LO", "HI", "N"),
                    help="scale candidates f * rms(block), N of them from LO to HI (trellis and VQ)")
    ap.add_argument("--vq", action="store_true", help="add the 4-dim, 256-entry k-means VQ")
    ap.add_argument("--chunk", type=int, default=1024, help="blocks per Viterbi batch (memory)")
    a = ap.parse_args()
    if any(L % SYMBOL_BITS or L < 4 for L in a.L):
        ap.error("--L: even numbers of at least 4")
    torch.set_num_threads(1)

    real = torch.load(a.real_cache, weights_only=False) if a.real_cache else parity.real_layers()
    real = [r if isinstance(r, dict) else vars(r) for r in real]
    sets = {m: real_blocks(real, m, a.blocks, seed=0) for m in MODELS}
    sets["gaussian"] = torch.randn(a.gaussian, QK, generator=torch.Generator().manual_seed(0))
    factors = torch.linspace(a.scales[0], a.scales[1], int(a.scales[2]))
    n_f = len(factors)

    # (name, L or "", start or "", encode work per value, decode per value, the store)
    rows: list[tuple[str, str, str, str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("tq2_0 (Lloyd-Max)", "", "", f"{reference.SCALE_STEPS} x 3 compares", "2-bit field, 4-entry table",
         lambda x: tq_store(x, 2))]
    for name in a.codes:
        for L in a.L:
            code = CODES[name](L)
            decode = {"lut": f"{L}-bit window, {1 << L}-entry fp16 table ({(1 << L) * 2} B)",
                      "1mad": f"{L}-bit window, IMAD + byte sum (dp4a) + I2F",
                      "3inst": f"{L}-bit window, IMAD + LOP3 + 1 fp16 add"}[name]
            for start in a.start:
                passes = 2 if start == "tailbite" else 1
                q = trellis_quantizer(code, L, start, a.chunk)
                rows.append((f"trellis {name}", str(L), start, f"{n_f} x {passes} x {1 << L} states", decode,
                             lambda x, q=q: store_scaled(x, q, factors)))
    if a.vq:
        q = vq_quantizer(train_vq())
        rows.append(("VQ 4-dim k-means", "", "", f"{n_f} x 64 distances", "8-bit field per 4 values, 256x4 fp16 table (2048 B)",
                     lambda x: store_scaled(x, q, factors)))

    mse: list[dict[str, float]] = []
    seconds: list[float] = []
    for row in rows:
        t0 = time.process_time()
        mse.append({k: rel_mse(x, row[5](x)) for k, x in sets.items()})
        seconds.append(time.process_time() - t0)
    fits = {m: kld_fit(m, sets[m], mse[0][m]) for m in MODELS}

    blocks = ", ".join(f"{k} {x.shape[0]}" for k, x in sets.items())
    print(f"Blocks of 64 values: {blocks}. Trellis/VQ scale candidates: {n_f} from {a.scales[0]:g} to "
          f"{a.scales[1]:g} x rms. Gaussian rate-distortion bound at 2.25 bits: {2 ** -4.5:.4f}.")
    for m, (slope, k2, q8) in fits.items():
        print(f"{MODELS[m]}: slope {slope:.2f}, anchored at tq2_0 MSE {mse[0][m]:.4f}, KLD f16/tq2_0 {k2:.4f}, "
              f"q8_0/tq2_0 {q8:.4f}.")
    print("\n| V code | L | start | encode work per value | decode per value | encode CPU s | SmolLM2 MSE "
          "| Gemma MSE | Gaussian MSE | KLD f16/V SmolLM2 (fit) | KLD f16/V Gemma (fit) | KLD q8_0/V Gemma (fit) "
          "| Gemma KLD vs tq2_0 |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, e, s in zip(rows, mse, seconds):
        ratio = {m: (e[m] / mse[0][m]) ** fits[m][0] for m in MODELS}
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {s:.0f} | {e['smollm2']:.4f} "
              f"| {e['gemma3']:.4f} | {e['gaussian']:.4f} | {fits['smollm2'][1] * ratio['smollm2']:.4f} "
              f"| {fits['gemma3'][1] * ratio['gemma3']:.4f} | {fits['gemma3'][2] * ratio['gemma3']:.4f} "
              f"| {100 * (ratio['gemma3'] - 1):+.0f}% |")


if __name__ == "__main__":
    main()
