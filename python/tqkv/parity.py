"""Parity suite: the PyTorch reference (reference.py) against a ggml backend and the Triton kernels.

Inputs: random rows, adversarial rows (zeros, one huge coordinate, tiny and huge norms, NaN/Inf,
heavy tails) and real K/V rows captured from SmolLM2 and Gemma-3-270M (capture.py), rotated as
llama.cpp rotates them for a quantized cache.

Checks and what "pass" means:
- quantize (SET_ROWS and CPY F32 -> type; on the CPU also ggml's scalar reference and
  ggml_quantize_chunk): every byte equal to reference.quantize. The encoder's decisions are made on
  float32 products and float64 sums in the same order on both sides, and ties between scale
  candidates need a 1e-9 relative gain (far above float64 rounding), so no legitimate byte
  difference is expected; any is counted and fails the check.
- dequantize (GET_ROWS and CPY type -> F32): values equal to reference.dequantize (error 0).
- FLASH_ATTN_EXT: the backend's output against reference.flash_attn_ext in float64 on the same
  decoded K/V, |err| <= tol * max|V|. The CPU first converts Q to K's vec_dot type (f16 for an f16
  K, q8_0 for q8_0, float32 for the TQ types); the reference does the same conversion, so what is
  left is float32 rounding (tol 1e-5) and, for an f16 V, the CPU's fp16 accumulator (tol 4e-3:
  11 mantissa bits, rescaled at every new maximum). Other backends get the looser tolerance
  without the Q conversion (their kernels round Q and partial sums differently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import assets, reference, types
from .ggml_lib import TYPE_F32, Backend
from .types import cache_type

TQ_TYPES = ("tq2_0", "tq3_0", "tq4_0")
KV_TYPES = ("f16", "q8_0", *TQ_TYPES)
PAIRS = [(k, v) for k in KV_TYPES for v in KV_TYPES if k in TQ_TYPES or v in TQ_TYPES]
# the forms in blocks of 32 and 16, at the head sizes that are not a multiple of 64 where they fit
# (q8_0 and the 32-value forms fit only 96 of these)
SMALL_TYPES = ("tq2_0_b32", "tq3_0_b32", "tq4_0_b32", "tq2_0_b16", "tq3_0_b16", "tq4_0_b16")
SMALL_DIMS = (80, 96, 112)
SMALL_PAIRS = [(k, v) for k in ("f16", "q8_0", *SMALL_TYPES) for v in ("f16", "q8_0", *SMALL_TYPES)
               if k in SMALL_TYPES or v in SMALL_TYPES]
TOL_F32, TOL_F16_ACC = 1e-5, 4e-3


@dataclass
class Check:
    backend: str
    op: str
    types: str
    shape: str
    cases: int = 0
    max_err: float = 0.0
    tol: float = 0.0
    bad_bytes: int = 0       # quantize: bytes that differ from the reference
    total_bytes: int = 0
    status: str = "pass"     # pass, FAIL, unsupported

    def add(self, err: float, bad: int = 0, total: int = 0) -> None:
        self.cases += 1
        self.max_err = max(self.max_err, err) if np.isfinite(err) else np.inf
        self.bad_bytes += bad
        self.total_bytes += total
        if not err <= self.tol or bad:
            self.status = "FAIL"


# --- inputs ---

def adversarial_rows(d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    spike = np.zeros((4, d), np.float32)
    spike[:, 5] = [1.0, -3e4, 7e5, 1e-30]  # one huge coordinate, beyond fp16, denormal-tiny
    nonfinite = np.ones((2, d), np.float32)
    nonfinite[0, 3], nonfinite[1, d - 1] = np.nan, np.inf
    return {
        "gaussian": rng.standard_normal((64, d)).astype(np.float32),
        "norms 1e-6..1e4": (rng.standard_normal((30, d)) * np.repeat([1e-6, 1e-2, 1.0, 1e2, 1e4], 6)[:, None])
        .astype(np.float32),
        "zeros": np.zeros((2, d), np.float32),
        "spike": spike,
        "constant": np.full((2, d), 0.125, np.float32),
        "heavy tail": rng.standard_t(2, (32, d)).astype(np.float32),
        "nan/inf": nonfinite,
    }


@dataclass
class RealLayer:
    model: str
    layer: int
    q: torch.Tensor  # rotated as llama.cpp rotates for a quantized cache
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    scale: float


def real_layers(n_tokens: int = 256) -> list[RealLayer]:
    """First, middle and last attention layer of each model on alice29, rotated as llama.cpp does."""
    from .capture import capture

    text = assets.text("alice29").read_text(errors="replace")
    out = []
    for model in assets.MODELS:
        layers = capture(assets.model(model), text, n_tokens)
        for il in sorted({0, len(layers) // 2, len(layers) - 1}):
            c = layers[il].as_torch()
            n = reference.k_rotation_size(c.q.shape[-1])
            out.append(RealLayer(model, il, reference.rotate(c.q, n).float(), reference.rotate(c.k, n).float(),
                                 reference.rotate(c.v, reference.V_ROTATION_SIZE).float(), c.mask, c.scale))
    return out


# --- checks ---

def _row_sets(real: list[RealLayer], d: int) -> Iterator[tuple[str, np.ndarray]]:
    for name, x in adversarial_rows(d).items():
        yield name, x
    for r in real:
        if r.k.shape[-1] == d:
            yield f"{r.model} L{r.layer} K", r.k.reshape(-1, d).numpy()
            yield f"{r.model} L{r.layer} V", r.v.reshape(-1, d).numpy()


def quantize_checks(be: Backend, real: list[RealLayer]) -> list[Check]:
    """Bytes of every row set through every quantize path, and values through every dequantize path."""
    checks = []
    for t in TQ_TYPES + SMALL_TYPES:
        tid, bits, qk = cache_type(t).ggml_id, int(t[2]), types.block_size(t)
        paths: dict[str, Callable[[np.ndarray], np.ndarray | None]] = {
            "SET_ROWS": lambda x: be.set_rows(tid, x),
            "CPY f32->": lambda x: be.cpy(TYPE_F32, tid, x, x.shape[1], x.shape[0]),
        }
        if be.name == "CPU":
            paths["quantize_row_ref"] = lambda x: be.ggml.quantize(tid, x, "ref")
            paths["quantize_chunk"] = lambda x: be.ggml.quantize(tid, x, "chunk")
        for d in (64, 128, 256) if qk == reference.QK else (*(d for d in SMALL_DIMS if d % qk == 0), 64):
            sets = list(_row_sets(real, d))
            for op, fn in paths.items():
                c = Check(be.name, op, t, f"{d} x {len(sets)} sets")
                for _, x in sets:
                    got = fn(x)
                    if got is None:
                        c.status = "unsupported"
                        break
                    ref = reference.quantize(torch.from_numpy(x), bits, qk).numpy()
                    c.add(0.0, int((got != ref).sum()), ref.size)
                checks.append(c)
            for op in ("GET_ROWS", "CPY ->f32"):
                c = Check(be.name, op, t, f"{d} x {len(sets)} sets")
                for _, x in sets:
                    q = reference.quantize(torch.from_numpy(x), bits, qk).numpy()
                    ref = reference.dequantize(torch.from_numpy(q), bits, qk).numpy().reshape(x.shape)
                    got = be.get_rows(tid, q, d) if op == "GET_ROWS" else be.cpy(tid, TYPE_F32, q, d, x.shape[0])
                    if got is None:
                        c.status = "unsupported"
                        break
                    got = got.view(np.float32).reshape(x.shape)
                    same = (got == ref) | (np.isnan(got) & np.isnan(ref))
                    c.add(0.0 if same.all() else float(np.nanmax(np.abs(got - ref))))
                checks.append(c)
    return checks


def _q_as_backend(be: Backend, q: torch.Tensor, type_k: str, scale: float) -> torch.Tensor:
    """Q as the kernel sees it. The CPU converts it to the vec_dot type of K; for q8_0 that is the
    AVX2 quantize_row_q8_0 (x * (127/amax), rounded half to even), not the scalar reference. CUDA's
    vector kernel (1-2 queries) turns scale*Q into q8_1 for a q8_0 K (x / (amax/127), rounded half
    away from zero); its other kernels read Q in float or f16 (inside the f16 tolerance)."""
    if type_k in TQ_TYPES + SMALL_TYPES:
        return q
    if be.name.startswith("CUDA"):
        if type_k != "q8_0" or q.shape[0] > 2:
            return q
        blocks = (q * scale).reshape(-1, reference.QK8_0)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        r = torch.where(d > 0, blocks / d, torch.zeros_like(blocks))
        return (d * torch.sign(r) * torch.floor(r.abs() + 0.5)).reshape(q.shape) / scale
    if be.name != "CPU":
        return q
    if type_k == "f16":
        return q.half().float()
    blocks = q.reshape(-1, reference.QK8_0)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((amax / 127).half().float() * torch.round(blocks * inv)).reshape(q.shape)


def _fa_tol(be: Backend, type_v: str) -> float:
    return TOL_F16_ACC if type_v == "f16" or be.name != "CPU" else TOL_F32


def _fa_case(be: Backend, c: Check, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tk: str, tv: str,
             scale: float, mask: torch.Tensor | None) -> bool:
    n_kv, n_head_kv, _ = k.shape
    kb, vb = reference.encode(k, tk), reference.encode(v, tv)
    kd = reference.decode(kb, tk).reshape(k.shape)
    vd = reference.decode(vb, tv).reshape(v.shape)
    got = be.flash_attn_ext(q.numpy(), kb.numpy(), vb.numpy(), cache_type(tk).ggml_id, cache_type(tv).ggml_id,
                            n_kv, n_head_kv, scale, None if mask is None else mask.numpy())
    if got is None:
        c.status = "unsupported"
        return False
    ref = reference.flash_attn_ext(_q_as_backend(be, q, tk, scale), kd, vd, scale, mask)
    c.add(float((torch.from_numpy(got).double() - ref).abs().max() / vd.abs().max().clamp(min=1e-30)))
    return True


def flash_attn_checks(be: Backend, real: list[RealLayer]) -> list[Check]:
    """Random heads (D 64/128/256, GQA, decode and small batches, masks) and real layers, per type pair;
    the smaller blocks' forms on random heads of D 80/96/112, where both types fit."""
    rng = torch.Generator().manual_seed(3)
    checks = []
    for tk, tv in PAIRS + SMALL_PAIRS:
        small = (tk, tv) in SMALL_PAIRS
        for d in SMALL_DIMS if small else (64, 128, 256):
            if any(d % types.block_size(t) for t in (tk, tv)):
                continue
            c = Check(be.name, "FLASH_ATTN_EXT", f"{tk}/{tv}", f"D{d} random", tol=_fa_tol(be, tv))
            for n_q, n_head, n_head_kv, n_kv, masked in ((1, 8, 2, 256, False), (1, 4, 1, 512, True),
                                                         (5, 8, 2, 256, True)):
                q = torch.randn(n_q, n_head, d, generator=rng)
                k = torch.randn(n_kv, n_head_kv, d, generator=rng) * 2
                v = torch.randn(n_kv, n_head_kv, d, generator=rng)
                mask = None
                if masked:  # a causal tail, as a batch of n_q new tokens at the end of n_kv - 37 cells
                    pos = torch.arange(n_kv)[None] - torch.arange(n_q)[:, None]
                    mask = torch.where(pos > n_kv - 37 - n_q, -torch.inf, 0.0)
                if not _fa_case(be, c, q, k, v, tk, tv, d**-0.5, mask):
                    break
            checks.append(c)
        for r in [] if small else real:
            c = Check(be.name, "FLASH_ATTN_EXT", f"{tk}/{tv}", f"{r.model} L{r.layer} (D{r.k.shape[-1]})",
                      tol=_fa_tol(be, tv))
            _fa_case(be, c, r.q[-8:], r.k, r.v, tk, tv, r.scale, r.mask[-8:])  # the last 8 queries of the window
            checks.append(c)
    return checks


def triton_checks(real: list[RealLayer]) -> list[Check]:
    """The Triton kernels (natively on a GPU, else under TRITON_INTERPRET=1): bytes of every row set,
    and decode attention (the last query of each case) over the packed cache for every type pair."""
    from . import triton_kernels as tk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"Triton ({torch.cuda.get_device_name() if dev == 'cuda' else 'interpreter'})"
    checks = []
    for t in TQ_TYPES:
        for d in (64, 128, 256):
            sets = list(_row_sets(real, d))
            c = Check(name, "quantize", t, f"{d} x {len(sets)} sets")
            for _, x in sets:
                got = tk.quantize(torch.from_numpy(x).to(dev), t).cpu().reshape(-1).numpy()
                ref = reference.quantize(torch.from_numpy(x), int(t[2])).numpy()
                c.add(0.0, int((got != ref).sum()), ref.size)
            checks.append(c)
    g = torch.Generator().manual_seed(4)
    for k_type, v_type in PAIRS:
        random_cases = [("random", torch.randn(1, n_head, d, generator=g), torch.randn(n_kv, n_head_kv, d, generator=g) * 2,
                         torch.randn(n_kv, n_head_kv, d, generator=g), d**-0.5, None)
                        for d in (64, 128, 256) for n_head, n_head_kv, n_kv in ((8, 2, 300), (4, 1, 1000))]
        real_cases = [("real", r.q[-1:], r.k, r.v, r.scale, r.mask[-1]) for r in real]
        for group, cases, shape in (("random", random_cases, "D64/128/256, GQA 4:1, n_kv 300/1000"),
                                    ("real", real_cases, f"{len(real)} real layers (last query)")):
            if not cases:
                continue
            c = Check(name, "decode attention", f"{k_type}/{v_type}", shape, tol=TOL_F32)
            for _, q, k, v, scale, mask in cases:
                kb, vb = reference.encode(k, k_type), reference.encode(v, v_type)
                kd, vd = reference.decode(kb, k_type).reshape(k.shape), reference.decode(vb, v_type).reshape(v.shape)
                n_kv, n_head_kv = k.shape[:2]
                got = tk.decode_attention(q[0].to(dev), kb.view(n_kv, n_head_kv, -1).to(dev),
                                          vb.view(n_kv, n_head_kv, -1).to(dev), k_type, v_type, scale,
                                          None if mask is None else mask.to(dev)).cpu()
                ref = reference.flash_attn_ext(q, kd, vd, scale, None if mask is None else mask[None])[0]
                c.add(float((got.double() - ref).abs().max() / vd.abs().max().clamp(min=1e-30)))
            checks.append(c)
    return checks


def cached_real_layers(path: Path | None) -> list[RealLayer]:
    """real_layers(), kept in path when given: a machine without the models (the GPU machine) reuses
    the rows captured elsewhere."""
    if path is not None and path.is_file():
        return [RealLayer(**d) for d in torch.load(path)]
    layers = real_layers()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([vars(r) for r in layers], path)
    return layers


def run(bin_dir: Path | None, backends: list[str], real: bool = True, n_threads: int | None = None,
        triton: bool = False, real_cache: Path | None = None) -> list[Check]:
    """The suite on each named ggml backend (bin_dir: a build holding them) and on the Triton kernels."""
    layers = cached_real_layers(real_cache) if real else []
    checks = triton_checks(layers) if triton else []
    if backends and bin_dir is None:
        raise ValueError("ggml backends need the build folder that holds them")
    for name in tqdm(backends, desc="tqkv parity", unit="backend"):
        be = Backend(bin_dir, name, n_threads)
        try:
            checks += quantize_checks(be, layers) + flash_attn_checks(be, layers)
        finally:
            be.close()
    return checks


def report(checks: list[Check]) -> str:
    lines = ["| backend | op | types | shape | cases | max err | tol | mismatched bytes | result |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for c in checks:
        nbytes = f"{c.bad_bytes}/{c.total_bytes}" if c.total_bytes else ""
        lines.append(f"| {c.backend} | {c.op} | {c.types} | {c.shape} | {c.cases} | {c.max_err:.2e} | "
                     f"{c.tol:.0e} | {nbytes} | {c.status} |")
    n_fail = sum(c.status == "FAIL" for c in checks)
    n_uns = sum(c.status == "unsupported" for c in checks)
    lines += ["", f"{len(checks) - n_fail - n_uns} pass, {n_fail} fail, {n_uns} unsupported "
                  f"({sum(c.cases for c in checks)} cases)"]
    return "\n".join(lines)

