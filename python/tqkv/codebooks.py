"""Lloyd-Max codebooks for TurboQuant_mse (arXiv 2504.19874, Algorithm 1).

A coordinate of a uniformly random unit vector in R^d follows the Beta-type law
f(x) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - x²)^((d-3)/2) on [-1, 1]; its large-d
limit is N(0, 1/d). A ggml block carries its values and one norm, so d is the block size: 64
for the tqN_0 types, 32 and 16 for the tqN_0_b32 and tqN_0_b16 forms of head sizes that are not a
multiple of 64.

This module is the single source of the committed artefacts codebooks/tq_codebooks.json (d = 64),
codebooks/tq_codebooks_32.json, codebooks/tq_codebooks_16.json and tq_ggml/tq-codebooks.h (all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import integrate, special, stats

from . import sources

BLOCK_DIM = 64
BLOCK_DIMS = (BLOCK_DIM, 32, 16)
HEADER_BITS = (2, 3, 4)
JSON_PATH = sources.codebooks_relpath(BLOCK_DIM)

HEADER_PATH = "tq_ggml/tq-codebooks.h"

Pdf = Callable[[float], float]


def _quad(fn: Pdf, a: float, b: float) -> float:
    # Tight tolerances: the result is rounded to float32, so it must be stable well below 1 ulp.
    return integrate.quad(fn, a, b, epsabs=0.0, epsrel=1e-13, limit=200)[0]


def lloyd_max(
    pdf: Pdf,
    support: tuple[float, float],
    levels: int,
    ppf: Callable[[np.ndarray], np.ndarray],
    tol: float = 1e-12,
    max_iter: int = 20000,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd-Max quantizer of a law symmetric about 0.

    Only the positive half is solved and then mirrored, so the centroids are
    exactly antisymmetric. Returns ascending (centroids, boundaries, mse) where
    boundaries are the levels-1 midpoints and mse is E[(x - Q(x))^2].
    """
    if levels < 2 or levels % 2:
        raise ValueError("levels must be even and >= 2")
    half = levels // 2
    upper = support[1]
    # Start from the quantiles of |x| (the positive half of the law).
    c = np.asarray(ppf(0.5 + 0.5 * (np.arange(half) + 0.5) / half), dtype=np.float64)
    for _ in range(max_iter):
        edges = _half_edges(c, upper)
        new = np.array([_conditional_mean(pdf, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])])
        delta = float(np.max(np.abs(new - c)))
        c = new
        if delta < tol:
            break
    else:
        raise RuntimeError(f"Lloyd-Max did not converge in {max_iter} iterations (last step {delta:g})")
    edges = _half_edges(c, upper)
    mse = 2.0 * sum(
        _quad(lambda x, ci=ci: (x - ci) ** 2 * pdf(x), lo, hi)
        for ci, lo, hi in zip(c, edges[:-1], edges[1:])
    )
    centroids = np.concatenate([-c[::-1], c])
    boundaries = 0.5 * (centroids[:-1] + centroids[1:])
    return centroids, boundaries, mse


def _half_edges(c: np.ndarray, upper: float) -> np.ndarray:
    return np.concatenate([[0.0], 0.5 * (c[:-1] + c[1:]), [upper]])


def _conditional_mean(pdf: Pdf, lo: float, hi: float) -> float:
    return _quad(lambda x: x * pdf(x), lo, hi) / _quad(pdf, lo, hi)


def _beta_law(d: int) -> tuple[Pdf, tuple[float, float], Callable[[np.ndarray], np.ndarray]]:
    log_norm = special.gammaln(d / 2) - 0.5 * math.log(math.pi) - special.gammaln((d - 1) / 2)
    power = (d - 3) / 2

    def pdf(x: float) -> float:
        return math.exp(log_norm + power * math.log1p(-x * x)) if abs(x) < 1.0 else 0.0

    # x = 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2); only used for the starting point.
    a = (d - 1) / 2
    return pdf, (-1.0, 1.0), stats.beta(a, a, loc=-1.0, scale=2.0).ppf


def _gaussian_law(d: int) -> tuple[Pdf, tuple[float, float], Callable[[np.ndarray], np.ndarray]]:
    sigma = 1.0 / math.sqrt(d)
    coef = 1.0 / (sigma * math.sqrt(2.0 * math.pi))

    def pdf(x: float) -> float:
        return coef * math.exp(-0.5 * (x / sigma) ** 2)

    return pdf, (-math.inf, math.inf), stats.norm(0.0, sigma).ppf


def solve(bits: int, d: int = BLOCK_DIM, law: str = "beta") -> tuple[np.ndarray, np.ndarray, float]:
    """Codebook with 2**bits levels for one coordinate of a random unit vector in R^d."""
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"bits must be 1..4, got {bits}")
    laws = {"beta": _beta_law, "gaussian": _gaussian_law}
    if law not in laws:
        raise ValueError(f"unknown law {law!r}; known: {sorted(laws)}")
    pdf, support, ppf = laws[law](d)
    return lloyd_max(pdf, support, 2**bits, ppf)


def _f32(x: float) -> float:
    """Round to float32 and back through a 9-digit decimal, which round-trips float32 exactly."""
    value = float("%.9g" % np.float32(x))
    assert np.float32(value) == np.float32(x)
    return value


def _c_float(x: float) -> str:
    text = "%.9g" % x
    if not any(ch in text for ch in ".e"):
        text += ".0"  # an "f" suffix needs a decimal point or exponent to be valid C
    return text + "f"


def _tables(dim: int) -> dict[int, dict[str, object]]:
    tables: dict[int, dict[str, object]] = {}
    for bits in HEADER_BITS:
        centroids, boundaries, mse = solve(bits, dim, "beta")
        g_centroids, _, g_mse = solve(bits, dim, "gaussian")
        tables[bits] = {
            "centroids": [_f32(v) for v in centroids],
            "boundaries": [_f32(v) for v in boundaries],
            "mse_per_coord": _f32(mse),
            "d_mse": _f32(dim * mse),
            "gaussian": {
                "centroids": [_f32(v) for v in g_centroids],
                "d_mse": _f32(dim * g_mse),
            },
        }
    return tables


def _render_json(dim: int, tables: dict[int, dict[str, object]]) -> bytes:
    doc = {"block_dim": dim, "law": "beta", "bits": {str(b): t for b, t in tables.items()}}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _c_array(name: str, values: list[float]) -> list[str]:
    # the initializer is also a macro, so CUDA code can fill __constant__ tables from it
    macro = name.upper()
    return [f"#define {macro} {{ {', '.join(_c_float(v) for v in values)} }}",
            f"static const float {name}[{len(values)}] = {macro};"]


def _render_header(tables: dict[int, dict[int, dict[str, object]]]) -> bytes:
    lines = [
        "/* Generated by `python -m tqkv codebooks` (python/tqkv/codebooks.py); do not edit.",
        " * Lloyd-Max codebooks for one coordinate of a random unit vector in R^d, d the block size:",
        f" * tq_* for d = {BLOCK_DIM}, tq<d>_* for the smaller blocks",
        " * (TurboQuant_mse, arXiv 2504.19874). Values are for unit-norm blocks, ascending. */",
        "#pragma once",
        "",
        f"#define TQ_CODEBOOK_DIM {BLOCK_DIM}",
        *(f"#define TQ{d}_CODEBOOK_DIM {d}" for d in BLOCK_DIMS[1:]),
        "",
    ]
    for dim, by_bits in tables.items():
        prefix = "tq" if dim == BLOCK_DIM else f"tq{dim}"
        for bits, table in by_bits.items():
            lines += _c_array(f"{prefix}_centroids_{bits}", table["centroids"])
            lines += _c_array(f"{prefix}_boundaries_{bits}", table["boundaries"])
    return ("\n".join(lines) + "\n").encode()


def render() -> dict[str, bytes]:
    """Contents of the generated files, keyed by path relative to the repo root."""
    tables = {dim: _tables(dim) for dim in BLOCK_DIMS}
    files = {sources.codebooks_relpath(dim): _render_json(dim, t) for dim, t in tables.items()}
    files[HEADER_PATH] = _render_header(tables)
    return files


def generate(repo_root: Path) -> list[Path]:
    """Write the codebook artefacts under repo_root and return their paths."""
    written = []
    for rel, data in render().items():
        path = Path(repo_root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written
