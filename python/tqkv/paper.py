"""The paper's claims (arXiv 2504.19874) checked on its own algorithms and on our block format.

TurboQuant_mse (Algorithm 1): rotate x by a random orthogonal Π, round every coordinate to the
Lloyd-Max codebook of the coordinate law of a random unit vector in R^d, rotate back.
TurboQuant_prod (Algorithm 2): (b-1)-bit TurboQuant_mse, then a 1-bit QJL sketch sign(S r) of the
residual r with S i.i.d. N(0, 1) and the stored ||r||; its inner products are unbiased.

Claims checked (unit vectors, ||y|| = 1):
  Theorem 1   1/4^b <= D_mse = E||x - x~||^2 <= sqrt(3)π/2 · 4^-b, ≈ 0.117, 0.03, 0.009 for b = 2, 3, 4
  Theorem 2   prod: E<y,x~> = <y,x> and D_prod = E(<y,x> - <y,x~>)^2 <= sqrt(3)π^2/d · 4^-b,
              ≈ 0.56/d, 0.18/d, 0.047/d
  and the mse quantizer's multiplicative inner-product bias, E<y,x~> = (1 - D_mse)<y,x> (the
  centroid condition E[Y Q(Y)] = E[Q(Y)^2] summed over the d coordinates).

`python -m tqkv.paper` prints report(), the source of results/paper-claims.md.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
from tqdm import tqdm

from . import codebooks, reference

BITS = (2, 3, 4)
DIMS = (64, 128, 256)
PAPER_D_MSE = {2: 0.117, 3: 0.03, 4: 0.009}
PAPER_D_PROD_X_D = {2: 0.56, 3: 0.18, 4: 0.047}  # the paper's D_prod · d for ||y|| = 1
Z95 = 1.959964


# --- codebooks ---

@cache
def codebook(bits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, boundaries) in float64 for one coordinate of a random unit vector in R^d."""
    centroids, boundaries, _ = codebooks.solve(bits, d, "beta")
    return torch.from_numpy(centroids), torch.from_numpy(boundaries)


@cache
def d_mse_exact(bits: int, d: int) -> float:
    """Algorithm 1's D_mse from the codebook: d · E[(Y - Q(Y))^2] for one coordinate Y."""
    return d * codebooks.solve(bits, d, "beta")[2]


@cache
def gaussian_centroids(bits: int) -> torch.Tensor:
    """Lloyd-Max centroids of N(0, 1): the large-d limit of sqrt(d) · codebook(bits, d)."""
    return torch.from_numpy(codebooks.solve(bits, 1, "gaussian")[0])


def upper_bound(bits: int) -> float:
    return math.sqrt(3) * math.pi / 2 * 4.0**-bits


def lower_bound(bits: int) -> float:
    return 4.0**-bits


def prod_bound_x_d(bits: int) -> float:
    """Theorem 2's bound on D_prod times d, for ||y|| = 1."""
    return math.sqrt(3) * math.pi**2 * 4.0**-bits


# --- Algorithms 1 and 2; leading dimensions of rotation/projection are independent draws ---

def random_rotation(d: int, gen: torch.Generator, draws: tuple[int, ...] = ()) -> torch.Tensor:
    """Haar-random orthogonal matrices: QR of a Gaussian, with R's diagonal made positive."""
    q, r = torch.linalg.qr(torch.randn(*draws, d, d, generator=gen, dtype=torch.float64))
    return q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)


def _mv(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m @ v for row vectors v [..., d], broadcasting m [..., d, d]."""
    return torch.einsum("...ij,...j->...i", m, v)


def _mtv(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m^T @ v for row vectors v [..., d]."""
    return torch.einsum("...ji,...j->...i", m, v)


@dataclass(frozen=True)
class TurboQuantMse:
    """Algorithm 1 for unit vectors: idx = nearest centroid of Π x, x~ = Π^T c[idx]."""

    rotation: torch.Tensor    # Π [..., d, d]
    centroids: torch.Tensor   # [2^b]
    boundaries: torch.Tensor  # [2^b - 1] midpoints: bucketize = nearest centroid

    @classmethod
    def create(cls, bits: int, rotation: torch.Tensor) -> TurboQuantMse:
        return cls(rotation, *codebook(bits, rotation.shape[-1]))

    def quant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(_mv(self.rotation, x), self.boundaries)

    def dequant(self, idx: torch.Tensor) -> torch.Tensor:
        return _mtv(self.rotation, self.centroids[idx])

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.quant(x))


@dataclass(frozen=True)
class TurboQuantProd:
    """Algorithm 2 for unit vectors: b bits = (b-1)-bit TurboQuant_mse + a 1-bit QJL of the residual."""

    mse: TurboQuantMse        # at b - 1 bits
    projection: torch.Tensor  # S [..., d, d], i.i.d. N(0, 1)

    @classmethod
    def create(cls, bits: int, rotation: torch.Tensor, projection: torch.Tensor) -> TurboQuantProd:
        return cls(TurboQuantMse.create(bits - 1, rotation), projection)

    def quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx, qjl in {-1, +1}, gamma = ||r||)."""
        idx = self.mse.quant(x)
        r = x - self.mse.dequant(idx)
        qjl = torch.where(_mv(self.projection, r) >= 0, 1.0, -1.0).double()
        return idx, qjl, r.norm(dim=-1)

    def dequant(self, idx: torch.Tensor, qjl: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        d = qjl.shape[-1]
        # E[S^T sign(S r)] = sqrt(2/π) · d · r/||r||, hence the sqrt(π/2)/d factor
        return self.mse.dequant(idx) + math.sqrt(math.pi / 2) / d * gamma.unsqueeze(-1) * _mtv(self.projection, qjl)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(*self.quant(x))


def roundtrip_scaled(quantizer: TurboQuantMse | TurboQuantProd, x: torch.Tensor) -> torch.Tensor:
    """Vectors of any norm: quantize the direction, keep the norm exact (the paper stores it apart)."""
    norm = x.norm(dim=-1, keepdim=True)
    return norm * quantizer.roundtrip(x / norm.clamp_min(1e-30))


def shipped_roundtrip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Our ggml tq{bits}_0 rows (64-value blocks, fp16 scale, scale search, d=64 codebook)."""
    return reference.store(x.float(), f"tq{bits}_0").double()


def random_unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


# --- 1. codebooks against their Gaussian limit ---

def codebook_table(bits: Iterable[int] = BITS, dims: Iterable[int] = DIMS) -> str:
    """Positive centroids in units of 1/sqrt(d), each with its difference from the Gaussian value."""
    lines = []
    for b in bits:
        gauss = gaussian_centroids(b)[2 ** (b - 1):]
        lines += [f"**b = {b}**", "", "| d | " + " | ".join(f"c{i + 1}" for i in range(len(gauss))) + " |",
                  "|---" * (len(gauss) + 1) + "|"]
        for d in dims:
            c = codebook(b, d)[0][2 ** (b - 1):] * math.sqrt(d)
            lines.append(f"| {d} | " + " | ".join(f"{v:.4f} ({v - g:+.4f})" for v, g in zip(c, gauss)) + " |")
        lines += ["| Gaussian (d→∞) | " + " | ".join(f"{g:.4f}" for g in gauss) + " |", ""]
    return "\n".join(lines)


# --- 2. D_mse: Algorithm 1 and the shipped format on the same vectors ---

@dataclass(frozen=True)
class Distortion:
    bits: int
    d: int
    paper: float       # Algorithm 1, measured
    paper_se: float
    exact: float       # Algorithm 1, from the codebook
    shipped: float     # our block format on the rotated vectors
    shipped_se: float


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def mse_distortion(bits: int, d: int, n: int, seed: int = 0, chunk: int = 1024) -> Distortion:
    gen = torch.Generator().manual_seed(seed)
    rotation = random_rotation(d, gen)
    x = random_unit(n, d, gen)
    quantizer = TurboQuantMse.create(bits, rotation)
    paper = (x - quantizer.roundtrip(x)).square().sum(-1)
    y = _mv(rotation, x)  # the shipped format sees the same rotated rows; chunks bound its memory
    y_hat = torch.cat([shipped_roundtrip(part, bits) for part in y.split(chunk)])
    shipped = (x - _mtv(rotation, y_hat)).square().sum(-1)
    return Distortion(bits, d, *_mean_se(paper), d_mse_exact(bits, d), *_mean_se(shipped))


def distortion_table(results: Sequence[Distortion]) -> str:
    by_key = {(r.bits, r.d): r for r in results}
    lines = [
        "| b | d | bits/value (paper) | D_mse Alg. 1 (±SE) | exact | paper | rel. dev. "
        "| bounds [1/4^b, √3π/2·4^-b] | D(b-1)/D(b) | bits/value (ours) | D_mse ours (±SE) | D(b-1)/D(b) ours |",
        "|---" * 12 + "|",
    ]
    for r in results:
        prev = by_key.get((r.bits - 1, r.d))
        ratio = f"{prev.paper / r.paper:.2f}" if prev else "–"
        ratio_ours = f"{prev.shipped / r.shipped:.2f}" if prev else "–"
        inside = "inside" if lower_bound(r.bits) <= r.paper <= upper_bound(r.bits) else "**OUTSIDE**"
        lines.append(
            f"| {r.bits} | {r.d} | {r.bits} | {r.paper:.5f} ± {r.paper_se:.5f} | {r.exact:.5f} "
            f"| {PAPER_D_MSE[r.bits]} | {r.paper / PAPER_D_MSE[r.bits] - 1:+.1%} "
            f"| [{lower_bound(r.bits):.4f}, {upper_bound(r.bits):.4f}] {inside} | {ratio} "
            f"| {r.bits + 16 / reference.QK:.2f} | {r.shipped:.5f} ± {r.shipped_se:.5f} | {ratio_ours} |")
    return "\n".join(lines)


# --- 3./4. inner products: fresh quantizer draws for one fixed pair (x, y) ---

@dataclass(frozen=True)
class InnerProduct:
    bits: int
    d: int
    rho: float                # <x, y>
    draws: int
    mse_mean: float           # mean of <y,x~> - <y,x>, b-bit TurboQuant_mse
    mse_half_ci: float
    mse_sq: float             # mean of its square
    prod_mean: float          # the same for b-bit TurboQuant_prod
    prod_half_ci: float
    prod_sq: float
    prod_var: float

    @property
    def mse_slope(self) -> float:
        """E<y,x~> / <y,x>: the paper predicts 1 - D_mse."""
        return 1 + self.mse_mean / self.rho


def fixed_pair(d: int, rho: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit x and y with <x, y> = rho."""
    x, w = random_unit(2, d, gen)
    w = w - (w @ x) * x
    return x, rho * x + math.sqrt(1 - rho**2) * w / w.norm()


def inner_product_errors(bits: Sequence[int], d: int, draws: int, rho: float = 0.5, seed: int = 0,
                         chunk: int = 250) -> list[InnerProduct]:
    """Theorem 2 is about the quantizer's randomness: every draw gets a fresh Π and S."""
    gen = torch.Generator().manual_seed(seed)
    x, y = fixed_pair(d, rho, gen)
    errors: dict[str, list[torch.Tensor]] = {f"{kind}{b}": [] for b in bits for kind in ("mse", "prod")}
    for start in range(0, draws, chunk):
        g = min(chunk, draws - start)
        rotation = random_rotation(d, gen, (g,))
        projection = torch.randn(g, d, d, generator=gen, dtype=torch.float64)
        xs = x.expand(g, d)
        for b in bits:
            for kind, q in (("mse", TurboQuantMse.create(b, rotation)),
                            ("prod", TurboQuantProd.create(b, rotation, projection))):
                errors[f"{kind}{b}"].append(q.roundtrip(xs) @ y - x @ y)
    out = []
    for b in bits:
        mse, prod = torch.cat(errors[f"mse{b}"]), torch.cat(errors[f"prod{b}"])
        out.append(InnerProduct(
            b, d, rho, draws,
            mse.mean().item(), Z95 * mse.std().item() / math.sqrt(draws), mse.square().mean().item(),
            prod.mean().item(), Z95 * prod.std().item() / math.sqrt(draws), prod.square().mean().item(),
            prod.var().item()))
    return out


def inner_product_table(results: Sequence[InnerProduct]) -> str:
    lines = [
        "| b | d | mse: mean err (95% CI) | z | mse slope | 1 - D_mse | mse: d·E[err²] "
        "| prod: mean err (95% CI) | z | prod: d·Var | prod: d·E[err²] | paper d·D_prod | bound √3π²·4^-b |",
        "|---" * 13 + "|",
    ]
    for r in results:
        lines.append(
            f"| {r.bits} | {r.d} | {r.mse_mean:+.5f} ± {r.mse_half_ci:.5f} | {Z95 * r.mse_mean / r.mse_half_ci:+.1f} "
            f"| {r.mse_slope:.4f} | {1 - d_mse_exact(r.bits, r.d):.4f} | {r.d * r.mse_sq:.4f} "
            f"| {r.prod_mean:+.5f} ± {r.prod_half_ci:.5f} | {Z95 * r.prod_mean / r.prod_half_ci:+.1f} "
            f"| {r.d * r.prod_var:.4f} | {r.d * r.prod_sq:.4f} | {PAPER_D_PROD_X_D[r.bits]} "
            f"| {prod_bound_x_d(r.bits):.4f} |")
    return "\n".join(lines)


# --- 5. real attention: K as b-bit mse or as (b-1)-bit mse + QJL, V as b-bit mse ---

class Layer(Protocol):
    """What capture.LayerQKV provides."""

    q: torch.Tensor      # [n_tokens, n_head, head_dim]
    k: torch.Tensor      # [n_tokens, n_head_kv, head_dim]
    v: torch.Tensor      # [n_tokens, n_head_kv, head_dim_v]
    mask: torch.Tensor   # [n_tokens, n_tokens] additive, 0 or -inf
    scale: float
    softcap: float


METHODS = ("mse", "prod", "mse mean", "shipped")


@dataclass
class AttentionError:
    """Sums over layers, heads and queries; the properties are the reported averages."""

    kl_sum: float = 0.0
    rows: int = 0
    out_err_sq: float = 0.0
    out_sq: float = 0.0
    logit_err_sq: float = 0.0
    logit_cross: float = 0.0
    logit_sq: float = 0.0
    logits: int = 0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.rows

    @property
    def rel_l2(self) -> float:
        return math.sqrt(self.out_err_sq / self.out_sq)

    @property
    def logit_rmse(self) -> float:
        return math.sqrt(self.logit_err_sq / self.logits)

    @property
    def logit_slope(self) -> float:
        """Least-squares slope of quantized on exact logits: below 1 means shrunk logits."""
        return self.logit_cross / self.logit_sq


@dataclass(frozen=True)
class AttentionRow:
    model: str
    head_dim: int
    bits: int
    errors: dict[str, AttentionError]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Layer
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, log-weights [n_head, n_q, n_kv], output [n_q, n_head, Dv]) as FLASH_ATTN_EXT, float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * layer.scale
    if layer.softcap:
        s = layer.softcap * torch.tanh(s / layer.softcap)
    log_w = torch.log_softmax(s + layer.mask.double(), -1)
    return s, log_w, torch.einsum("hqk,khd->qhd", log_w.exp(), v.double())


def quantized_kv(layer: Layer, bits: int, method: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as attention reads them back (float64, original basis)."""
    if method == "shipped":  # llama.cpp's Hadamard rotations (H = H^-1) around our blocks, no K offset
        n, nv = reference.k_rotation_size(layer.k.shape[-1]), reference.V_ROTATION_SIZE
        return (reference.rotate(shipped_roundtrip(reference.rotate(layer.k, n), bits), n),
                reference.rotate(shipped_roundtrip(reference.rotate(layer.v, nv), bits), nv))
    gen = torch.Generator().manual_seed(seed)
    rot_k, rot_v = random_rotation(layer.k.shape[-1], gen), random_rotation(layer.v.shape[-1], gen)
    v = roundtrip_scaled(TurboQuantMse.create(bits, rot_v), layer.v.double())
    if method == "mse":
        return roundtrip_scaled(TurboQuantMse.create(bits, rot_k), layer.k.double()), v
    if method == "prod":
        projection = torch.randn(rot_k.shape, generator=gen, dtype=torch.float64)
        return roundtrip_scaled(TurboQuantProd.create(bits, rot_k, projection), layer.k.double()), v
    # "mse mean": K~ replaced by its expectation (1 - D_mse) K, the mse quantizer's bias without its variance
    return (1 - d_mse_exact(bits, rot_k.shape[-1])) * layer.k.double(), v


def attention_errors(layers: Sequence[Layer], bits: int, seed: int = 0) -> dict[str, AttentionError]:
    """Every method against exact float64 attention under the layer's mask; a fresh Π, S per layer."""
    errors = {m: AttentionError() for m in METHODS}
    for i, layer in enumerate(layers):
        s, log_w, out = attention(layer.q, layer.k, layer.v, layer)
        seen = (layer.mask == 0).expand_as(s)
        for method in METHODS:
            k, v = quantized_kv(layer, bits, method, seed + 1000 * i)
            s_hat, log_w_hat, out_hat = attention(layer.q, k, v, layer)
            e = errors[method]
            e.kl_sum += torch.where(seen, log_w.exp() * (log_w - log_w_hat), 0.0).sum().item()
            e.rows += s.shape[0] * s.shape[1]
            e.out_err_sq += (out_hat - out).square().sum().item()
            e.out_sq += out.square().sum().item()
            e.logit_err_sq += (s_hat - s)[seen].square().sum().item()
            e.logit_cross += (s_hat * s)[seen].sum().item()
            e.logit_sq += s[seen].square().sum().item()
            e.logits += int(seen.sum())
    return errors


def attention_table(rows: Sequence[AttentionRow]) -> str:
    lines = [
        "| model | b | K as | K bits/value | KL(p‖p~) | rel. L2 of output | logit RMSE | logit slope |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        k_bits = {"mse": f"{r.bits} (+16/{r.head_dim} norm)", "prod": f"{r.bits - 1}+1 (+32/{r.head_dim} norms)",
                  "mse mean": "–", "shipped": f"{r.bits + 16 / reference.QK:.2f}"}
        for method in METHODS:
            e = r.errors[method]
            lines.append(f"| {r.model} | {r.bits} | {method} | {k_bits[method]} | {e.kl:.5f} | {e.rel_l2:.4f} "
                         f"| {e.logit_rmse:.4f} | {e.logit_slope:.4f} |")
    return "\n".join(lines)


def _span(values: Iterable[float], fmt: str = ".2f") -> str:
    ordered = sorted(values)
    return f"{ordered[0]:{fmt}}–{ordered[-1]:{fmt}}"


def attention_finding(rows: Sequence[AttentionRow]) -> str:
    """The prod-vs-mse verdict at equal bits, in numbers."""
    mse_wins = sum(r.errors["mse"].kl < r.errors["prod"].kl for r in rows)
    kl_ratio = _span(r.errors["prod"].kl / r.errors["mse"].kl for r in rows)
    out_ratio = _span(r.errors["prod"].rel_l2 / r.errors["mse"].rel_l2 for r in rows)
    rmse_ratio = _span(r.errors["prod"].logit_rmse / r.errors["mse"].logit_rmse for r in rows)
    text = (f"At equal bits per value, K as TurboQuant_mse gives the lower attention-weight KL in {mse_wins} of "
            f"{len(rows)} (model, b) cases. prod/mse ratios: KL {kl_ratio}, output error {out_ratio}, logit RMSE "
            f"{rmse_ratio}. Logit slopes: prod {_span((r.errors['prod'].logit_slope for r in rows), '.3f')}, "
            f"mse {_span((r.errors['mse'].logit_slope for r in rows), '.3f')}")
    bias_share = _span((r.errors["mse mean"].kl / r.errors["mse"].kl for r in rows), ".0%")
    text += f"; the mse bias alone (K → (1 - D_mse)K) gives {bias_share} of mse's KL"
    if mse_wins == len(rows):
        return text + (". QJL removes a logit shrink that softmax barely notices and pays for it with more "
                       "logit variance than the extra mse bit removes: here QJL hurts softmax attention.")
    if mse_wins == 0:
        return text + ". The unbiased prod quantizer wins in every case here."
    return text + ". Mixed: see the table."


# --- the report ---

def report(n_vectors: int = 10000, n_draws: int = 4000, rho: float = 0.5, n_tokens: int = 512,
           models: Sequence[str] = ("smollm2", "gemma3"), text: str = "alice29", seed: int = 0) -> str:
    """The whole comparison as markdown; deterministic for fixed arguments."""
    cases = [(d, b) for d in DIMS for b in BITS]
    distortions = sorted((mse_distortion(b, d, n_vectors, seed) for d, b in tqdm(cases, desc="tqkv paper: D_mse")),
                         key=lambda r: (r.bits, r.d))
    products = sorted((r for d in tqdm(DIMS, desc="tqkv paper: inner products")
                       for r in inner_product_errors(BITS, d, n_draws, rho, seed)), key=lambda r: (r.bits, r.d))
    real = f" Real Q/K/V (section 5): {', '.join(models)}, first {n_tokens} tokens of {text}.txt." if models else ""
    parts = [
        f"Sample sizes: {n_vectors} random unit vectors per d for D_mse (one Haar rotation per d, seed {seed}); "
        f"{n_draws} independent draws of (Π, S) per d for the inner products, on one fixed pair of unit "
        f"vectors with <x, y> = {rho}.{real}",
        "",
        "## 1. Codebooks: Lloyd-Max centroids × sqrt(d) of the exact coordinate law vs the Gaussian limit",
        "",
        "Positive half (the codebooks are symmetric); in brackets the difference from the Gaussian "
        "(N(0,1) Lloyd-Max) value, which shrinks like 1/d. The paper quotes ±0.453, ±1.51 for b = 2. "
        "Our shipped codebooks are the d = 64 rows.",
        "",
        codebook_table(),
        "## 2. MSE distortion D_mse = E||x - x~||² (Theorem 1)",
        "",
        "Algorithm 1 (Haar rotation, d-dimensional codebook, nearest centroid) against its exact value "
        "from the codebook, the paper's values (rel. dev. of the measured value) and Theorem 1's bounds; "
        "\"ours\" is our ggml block format (reference.quantize/dequantize: 64-value blocks, fp16 scale "
        "with the scale search, d = 64 codebook) on the same rotated vectors. Bits per value: the paper's "
        "b excludes the norm of a non-unit vector (stored apart); ours includes the fp16 block scale.",
        "",
        distortion_table(distortions),
        "",
        "## 3./4. Inner products: TurboQuant_mse bias vs TurboQuant_prod (Theorem 2)",
        "",
        "err = <y,x~> - <y,x> with ||x|| = ||y|| = 1, b bits per value for both (prod: (b-1)-bit mse + "
        "1-bit QJL); z = mean/SE. \"mse slope\" = E<y,x~>/<y,x>, predicted 1 - D_mse (next column). The "
        "bound √3π²/d·4^-b and the paper's values are stated for prod; mse's d·E[err²] is shown against "
        "them too: it is mostly bias², d·(D_mse·<x,y>)², which grows with d. Distortions × d.",
        "",
        inner_product_table(products),
    ]
    if models:
        parts += ["", *_attention_section(models, text, n_tokens, seed)]
    return "\n".join(parts) + "\n"


def _attention_section(models: Sequence[str], text: str, n_tokens: int, seed: int) -> list[str]:
    from . import assets, capture  # needs the patched llama-cpp-python (`tqkv build`)

    rows, files = [], []
    for model in tqdm(models, desc="tqkv paper: real attention"):
        path = assets.model(model)
        files.append(f"{model} ({path.name})")
        layers = [c.as_torch() for c in capture.capture(path, assets.text(text).read_text(), n_tokens)]
        rows += [AttentionRow(model, layers[0].k.shape[-1], b, attention_errors(layers, b, seed)) for b in BITS]
    return [
        "## 5. TurboQuant_prod vs TurboQuant_mse on real attention",
        "",
        f"Q/K/V of every attention layer of {', '.join(files)} on the first {n_tokens} tokens of {text}.txt "
        "(tqkv.capture: K after RoPE, before llama.cpp's Hadamard rotation), under the model's causal "
        "mask. Against exact float64 attention: KL of the attention weights per query (mean over layers, "
        "heads and queries), relative L2 of the attention output (over everything), RMSE and "
        "least-squares slope of the scaled logits. K: b-bit mse, or (b-1)-bit mse + 1-bit QJL, with a "
        "head_dim-sized Π and S per layer and exact norms; V: b-bit mse in both (the same draw). "
        "\"mse mean\": K replaced by (1 - D_mse)K, the mse quantizer's expectation (its bias, no variance), "
        "same V. \"shipped\": our tq{b}_0 for K and V with llama.cpp's Hadamard rotations, without the K "
        "offset.",
        "",
        attention_table(rows),
        "",
        f"**Finding.** {attention_finding(rows)}",
    ]


def main() -> None:
    # One thread: these are many small tensor ops, and on a shared 2-core machine OpenMP's second
    # thread made them up to 10x slower.
    torch.set_num_threads(1)
    start = time.time()
    body = report()
    print("# The paper's claims (arXiv 2504.19874) checked on the reference\n")
    print(f"Generated by `python -m tqkv.paper` (tqkv.paper.report() with its defaults) on a "
          f"{os.cpu_count()}-core {platform.machine()} CPU, one torch thread, torch {torch.__version__}, "
          f"in {time.time() - start:.0f} s.\n")
    print(body, end="")


if __name__ == "__main__":
    main()
