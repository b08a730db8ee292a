"""Bit allocation: a cache type for each layer's K and V, chosen from measured costs under a budget.

`measure` runs the model in-process (the patched llama-cpp-python) on the calibration text, once with
an f16 cache for the reference logits and then once per layer, K or V, and type, with that one
cache quantized and every other layer's K and V in f16; a layer's cost at a type is the mean
KL divergence of the next-token distribution from the reference over the second half of each chunk
(the tokens llama-perplexity scores). Runs are cached on disk as they finish, so an interrupted
measurement resumes.

`allocate` picks one type per layer and K/V to minimise the sum of the costs, a first-order model of
the whole cache's KL divergence, subject to an average of at most `budget` bits per value over the
cache (each layer weighted by its values per token); it is an exact multiple-choice knapsack over
quarter bits. The chosen types go into the calibration profile (profile.Alloc), which the patched
llama.cpp applies when it creates a TurboQuant cache (patch 0020).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import assets, capture, profile, sources
from .types import TQ2_0, TQ3_0, cache_type, for_head

# the types an allocation chooses from, fewest bits first
TYPES = ("tq2_0", "tq3_0", "tq4_0", "q8_0")


@dataclass(frozen=True)
class Costs:
    """Measured cost (mean KLD, nats) of each layer's K and V cache at each type."""

    layers: tuple[int, ...]              # layers with a KV cache, in order
    widths: tuple[int, ...]              # values per token of each such layer's K (and V) cache
    heads: tuple[int, ...]               # each such layer's head size (which forms of the types fit it)
    n_layer: int                         # the model's layer count (the profile's arrays span it)
    floor: float                         # KLD with every layer f16 through the TurboQuant cache's transforms
    k: dict[str, tuple[float, ...]]      # type -> cost per layer of quantizing that layer's K cache, above
    v: dict[str, tuple[float, ...]]      # floor; inf where the type does not fit the layer's head size

    def monotone(self) -> Costs:
        """Costs clamped at 0 and made non-increasing in bits: a type never costs less than one with
        more bits (a measured inversion is noise at the scale of the smaller cost)."""
        def fix(c: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
            out, floor = {}, np.zeros(len(self.layers))
            for t in reversed(TYPES):
                cost = np.asarray(c[t], dtype=np.float64)
                fits = np.isfinite(cost)
                floor = np.where(fits, np.maximum(floor, np.maximum(cost, 0.0)), floor)
                out[t] = tuple(np.where(fits, floor, np.inf).tolist())
            return {t: out[t] for t in TYPES}
        return replace(self, k=fix(self.k), v=fix(self.v))


def bits(t: str, head_dim: int = 64) -> float:
    """Bits per value of type t in a cache of head_dim values per head (inf: t does not fit it)."""
    form = for_head(t, head_dim)
    return cache_type(form).bits_per_value if form else math.inf


def fits(t: str, head_dim: int) -> bool:
    return for_head(t, head_dim) is not None


def allocate(costs: Costs, budget: float) -> profile.Alloc:
    """The types of least total cost whose average bits per value, weighted by width, is at most budget."""
    lo = sum(w * bits(TYPES[0], h) for w, h in zip(costs.widths, costs.heads)) / sum(costs.widths)
    hi = max(bits(t, h) for t in TYPES for h in costs.heads if fits(t, h))
    if not lo <= budget:
        raise ValueError(f"a budget of {budget} bits per value is below the smallest type ({TYPES[0]}: {lo})")
    c = costs.monotone()
    # items: (layer index, is_v); weights in quarter bits times width / gcd of the widths
    g = reduce(math.gcd, costs.widths)
    items = [(i, v) for i in range(len(costs.layers)) for v in (False, True)]
    units = [costs.widths[i] // g for i, _ in items]
    qbits = [[round(4 * bits(t, h)) if fits(t, h) else None for t in TYPES] for h in costs.heads]
    cap = int(math.floor(4 * min(budget, hi) * sum(units) + 1e-9))
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = np.zeros((len(items), cap + 1), dtype=np.int8)
    for n, ((i, is_v), u) in enumerate(zip(items, units)):
        table = c.v if is_v else c.k
        new = np.full(cap + 1, inf)
        for j, t in enumerate(TYPES):
            if qbits[i][j] is None:
                continue
            w = qbits[i][j] * u
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + table[t][i]
            better = cand < new
            new[better] = cand[better]
            choice[n, better] = j
        best = new
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        raise ValueError(f"no allocation fits {budget} bits per value")
    k_types = [""] * costs.n_layer
    v_types = [""] * costs.n_layer
    for n in reversed(range(len(items))):
        i, is_v = items[n]
        j = int(choice[n, end])
        (v_types if is_v else k_types)[costs.layers[i]] = TYPES[j]
        end -= qbits[i][j] * units[n]
    return profile.Alloc(budget, tuple(k_types), tuple(v_types))


def _avg_bits(alloc: profile.Alloc, widths: dict[int, int], heads: dict[int, int]) -> float:
    """Average bits per value of an allocation, each layer weighted by its values per token."""
    total = sum(w * (bits(alloc.k_types[il], heads[il]) + bits(alloc.v_types[il], heads[il])) for il, w in widths.items())
    return total / (2 * sum(widths.values()))


def avg_bits(alloc: profile.Alloc, costs: Costs) -> float:
    return _avg_bits(alloc, dict(zip(costs.layers, costs.widths)), dict(zip(costs.layers, costs.heads)))


def predicted(alloc: profile.Alloc, costs: Costs) -> float:
    """The allocation's KLD under the additive model: the floor plus its layers' measured costs."""
    c = costs.monotone()
    return costs.floor + sum(c.k[alloc.k_types[il]][i] + c.v[alloc.v_types[il]][i] for i, il in enumerate(costs.layers))


class _Runner:
    """The model loaded once; contexts made per configuration; logits of the scored half of each chunk."""

    def __init__(self, model: Path, n_ctx: int, n_threads: int | None, n_gpu_layers: int):
        import llama_cpp as L
        from llama_cpp import _logger

        # one context per run: the library's per-context lines (the calibration in force) would drown the
        # progress bar; _logger's own callback comes back in close()
        self._quiet = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        self._logger = _logger
        self._L, self.n_ctx = L, n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = L.llama_model_load_from_file(str(model).encode(), mparams)
        if not self._model:
            self.close()
            raise RuntimeError(f"could not load {model}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.bos = capture.bos(L, self._vocab)

    def tokenize(self, text: bytes) -> list[int]:
        return capture.tokenize(self._L, self._vocab, text)

    def logits(self, chunks: list[list[int]], type_k: int, type_v: int, kv_profile: Path | None) -> list[np.ndarray]:
        """Per chunk, float32 [n_ctx - n_ctx//2, n_vocab]: the logits at the scored positions."""
        L = self._L
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.type_k, cp.type_v = type_k, type_v
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.kv_profile = str(kv_profile).encode() if kv_profile else b"none"
        ctx = L.llama_init_from_model(self._model, cp)
        if not ctx:
            raise RuntimeError(f"could not create a context (K {type_k}, V {type_v}, profile {kv_profile})")
        first = self.n_ctx // 2
        batch = L.llama_batch_init(self.n_ctx, 0, 1)
        try:
            out = []
            for tokens in chunks:
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
                batch.n_tokens = len(tokens)
                for i, tok in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = i >= first
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                ptr = L.llama_get_logits(ctx)
                n_out = len(tokens) - first
                out.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                 shape=(n_out, self.n_vocab)).copy())
            return out
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def close(self) -> None:
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None
        self._L.llama_log_set(self._logger.llama_log_callback, ctypes.c_void_p(0))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _kld(base: list[np.ndarray], logits: list[np.ndarray]) -> float:
    """Mean over tokens of KL(base || logits), base given as log-probabilities."""
    total, n = 0.0, 0
    for lp, z in zip(base, logits):
        lq = _log_softmax(z)
        total += float((np.exp(lp) * (lp - lq)).sum())
        n += lp.shape[0]
    return total / n


def measure(model: Path, base_profile: Path, texts: list[Path], n_ctx: int = 512, n_chunks: int = 2,
            n_threads: int | None = None, n_gpu_layers: int = -1, cache: Path | None = None) -> Costs:
    """Each layer's K and V cost at each type of TYPES on the texts (see the module's docstring)."""
    prof = profile.read(base_profile)
    layers = tuple(sorted(prof.layers))
    widths = tuple(int(prof.layers[il][0].size) for il in layers)
    heads = tuple(int(prof.layers[il][0].shape[-1]) for il in layers)
    data = b"".join(profile.read_text(p) for p in texts)
    key = hashlib.sha256(repr((profile.fingerprint(model), hashlib.sha256(data).hexdigest(),
                               hashlib.sha256(base_profile.read_bytes()).hexdigest(), n_ctx, n_chunks,
                               _quantizers_digest(), TYPES)).encode()).hexdigest()[:16]
    cache = cache or assets.cache_dir() / "alloc"
    cache.mkdir(parents=True, exist_ok=True)
    done_path = cache / f"costs-{model.stem}-{key}.json"
    done: dict[str, float] = json.loads(done_path.read_text()) if done_path.exists() else {}
    # the floor: every layer f16, but through the TurboQuant cache's rotation, key offset and scale
    jobs = [(-1, "k", "f16")] + [(il, kv, t) for il, h in zip(layers, heads) for kv in ("k", "v") for t in TYPES
                                 if fits(t, h)]

    r = _Runner(model, n_ctx, n_threads, n_gpu_layers)
    try:
        tokens = profile.tokenize_prefix(r.tokenize, data, n_ctx * n_chunks)
        if len(tokens) < n_ctx * n_chunks:
            raise ValueError(f"the texts have {len(tokens)} tokens, fewer than {n_chunks} chunks of {n_ctx}")
        chunks = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n_chunks)]
        if r.bos is not None:
            for c in chunks:
                c[0] = r.bos  # each chunk a fresh sequence, as llama-perplexity runs them
        todo = [j for j in jobs if _job(*j) not in done]
        base = None
        tmp = cache / f".alloc-{os.getpid()}.tqkv.gguf"
        try:
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="tqkv calibrate: layer costs",
                      unit="run") as bar:
                for il, kv, t in todo:
                    if base is None:
                        bar.set_postfix_str("f16 reference")
                        base = [_log_softmax(z) for z in r.logits(chunks, 1, 1, None)]
                    bar.set_postfix_str(f"layer {il} {kv.upper()} {t}")
                    k_types = ["f16" if i in prof.layers else "" for i in range(prof.n_layer)]
                    v_types = list(k_types)
                    if il >= 0:
                        (v_types if kv == "v" else k_types)[il] = t
                    profile.write(replace(prof, alloc=profile.Alloc(0.0, tuple(k_types), tuple(v_types))), tmp)
                    # any TurboQuant type switches the allocation on; every layer's type comes from it
                    done[_job(il, kv, t)] = _kld(base, r.logits(chunks, TQ3_0, TQ2_0, tmp))
                    done_path.write_text(json.dumps(done))
                    bar.update()
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        r.close()

    floor = done[_job(-1, "k", "f16")]

    def table(kv: str) -> dict[str, tuple[float, ...]]:
        return {t: tuple(done[_job(il, kv, t)] - floor if fits(t, h) else math.inf for il, h in zip(layers, heads))
                for t in TYPES}

    return Costs(layers, widths, heads, prof.n_layer, floor, table("k"), table("v"))


def _quantizers_digest() -> str:
    """The TurboQuant sources that decide a cache's error (not the profile loader): measured costs
    stay valid until they change."""
    h = hashlib.sha256()
    for f in sorted(sources.tq_ggml().rglob("*")):
        if f.is_file() and f.name != "tq-profile.c":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _job(il: int, kv: str, t: str) -> str:
    return f"{il}.{kv}.{t}"


def alloc_path(model: Path, budget: float) -> Path:
    """Where `tqkv calibrate --budget` writes a model's allocated profile: beside the model, not under
    the name llama.cpp loads by default (an allocation is chosen with --kv-profile)."""
    return model.with_name(f"{model.name.removesuffix('.gguf')}.{budget:g}bit.tqkv.gguf")


def write(model: Path, base_profile: Path, costs: Costs, budget: float, out: Path | None = None) -> Path:
    """The base profile with the allocation for budget added; returns its path."""
    a = allocate(costs, budget)
    out = out or alloc_path(model, budget)
    profile.write(replace(profile.read(base_profile), alloc=a), out)
    return out


def describe(alloc: profile.Alloc, costs: Costs) -> str:
    """One line: the types' counts for K and V, the average bits and the predicted cost."""
    def count(ts: tuple[str, ...]) -> str:
        return " ".join(f"{t} x{ts.count(t)}" for t in TYPES if ts.count(t))
    return (f"K {count(alloc.k_types)}; V {count(alloc.v_types)}; {avg_bits(alloc, costs):.3f} bits per value; "
            f"predicted KLD {predicted(alloc, costs):.4f}")


def profile_bits(path: Path) -> float:
    """The average bits per value of a profile's allocation, each layer weighted by its width."""
    prof = profile.read(path)
    if not prof.alloc:
        raise ValueError(f"{path}: a profile without a bit allocation")
    return _avg_bits(prof.alloc, {il: int(k_mean.size) for il, (k_mean, _) in prof.layers.items()},
                     {il: int(k_mean.shape[-1]) for il, (k_mean, _) in prof.layers.items()})


def ensure(model: Path, budget: float) -> Path:
    """The model's allocated profile for budget (alloc_path), made with the default calibration text
    and settings when it is missing or was made for another file."""
    path = alloc_path(model, budget)
    if path.is_file():
        try:
            p = profile.read(path)
            if p.fingerprint == profile.fingerprint(model) and p.alloc and math.isclose(p.alloc.budget, budget, rel_tol=1e-6):
                return path
        except ValueError:
            pass
    base = profile.ensure(model)
    costs = measure(model, base, [assets.text(assets.CALIBRATION_TEXT)])
    return write(model, base, costs, budget, path)
