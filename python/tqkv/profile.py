"""TurboQuant KV calibration profiles: a model's per-channel key offset and scale, measured once.

The TQ K cache stores H(a*k) - off and turns queries into H(q/a). The key mean m (the offset's
source) and the channel scale a are properties of the model, so `calibrate` measures them on a
fixed text and writes them to a small GGUF that the patched llama.cpp loads; a run's statistics
then no longer depend on the traffic its first ubatch happened to carry.

File format (the C loader reads exactly this): general.architecture "tqkv-profile", the KV
metadata under the `KEY_*` names below, and per attention layer il with a K cache the float32
tensors blk.{il}.k_mean and blk.{il}.k_scale of numpy shape (n_head_kv, head_dim_k), i.e. ggml ne
[head_dim_k, n_head_kv]. A profile may also carry a bit allocation (`tqkv calibrate --budget`,
python/tqkv/alloc.py): the string arrays tqkv.alloc.k_types and tqkv.alloc.v_types, one cache type
name per layer of the model ("" for a layer without a KV cache), and the budget it was made for.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from . import assets, capture

ARCH = "tqkv-profile"
VERSION = 1
# a_i^4 = E[q_i^2] / E[k_i^2] minimises a logit's quantization error (tq_ggml/tq-offset.c), but the
# model ignores errors where attention is sharp and the moments come from one text: the tempered
# a_i^8 = E[q_i^2] / E[k_i^2] is used (in `tqkv ppl`, ctx 2048, tq3_0/tq3_0, exponents 1/16..3/16 all
# beat no scale on both test models, 1/4 loses on SmolLM2)
K_SCALE_EXPONENT = 0.125
K_SCALE_EPS = 0.01        # floor on a channel's energy, as a fraction of its head's mean

KEY_VERSION = "tqkv.profile.version"
KEY_FINGERPRINT = "tqkv.model.fingerprint"
KEY_ARCHITECTURE = "tqkv.model.architecture"
KEY_NAME = "tqkv.model.name"
KEY_FILE = "tqkv.model.file"
KEY_N_LAYER = "tqkv.model.n_layer"
KEY_TEXT_NAMES = "tqkv.text.names"
KEY_TEXT_SHA256 = "tqkv.text.sha256"
KEY_TEXT_N_TOKENS = "tqkv.text.n_tokens"
KEY_TEXT_N_CTX = "tqkv.text.n_ctx"
KEY_TOOL_VERSION = "tqkv.tool.version"
KEY_K_SCALE_EXPONENT = "tqkv.k_scale.exponent"
KEY_K_SCALE_EPS = "tqkv.k_scale.eps"
KEY_ALLOC_K = "tqkv.alloc.k_types"
KEY_ALLOC_V = "tqkv.alloc.v_types"
KEY_ALLOC_BUDGET = "tqkv.alloc.budget"

# fingerprint: FNV-1a 64 over the size, the head and 64 evenly spaced blocks (the C side hashes the same)
_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
_HEAD_BYTES, _N_BLOCKS, _BLOCK_BYTES = 65536, 64, 4096
_K_MEAN_NAME = re.compile(r"blk\.(\d+)\.k_mean")


@dataclass(frozen=True)
class Alloc:
    """A bit allocation: the cache type of each layer's K and V ("" where a layer has no KV cache), made
    for an average of `budget` bits per value."""

    budget: float
    k_types: tuple[str, ...]
    v_types: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    version: int
    fingerprint: str
    architecture: str
    model_name: str
    model_file: str
    n_layer: int
    text_names: str       # comma-separated
    text_sha256: str
    n_tokens: int         # tokens measured, all chunks
    n_ctx: int            # tokens per chunk
    tool_version: str
    k_scale_exponent: float
    k_scale_eps: float
    layers: dict[int, tuple[np.ndarray, np.ndarray]]  # il -> (k_mean, k_scale), each (n_head_kv, head_dim)
    alloc: Alloc | None = None


def fingerprint(path: Path) -> str:
    """The model file's identity without hashing gigabytes: FNV-1a 64 over its size (8 bytes LE), its
    first 64 KiB (metadata, tensor infos) and, past that, 64 blocks of 4 KiB spread evenly to its end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        parts = [size.to_bytes(8, "little"), f.read(_HEAD_BYTES)]
        if size > _HEAD_BYTES:
            for i in range(_N_BLOCKS):
                f.seek((size - _BLOCK_BYTES) * i // (_N_BLOCKS - 1))
                parts.append(f.read(_BLOCK_BYTES))
    h, prime, mask = _FNV_OFFSET, _FNV_PRIME, _MASK64
    for byte in b"".join(parts):
        h = ((h ^ byte) * prime) & mask
    return f"{h:016x}"


def default_path(model: Path) -> Path:
    """Where the patched llama.cpp looks for a model's profile: beside it, x.gguf -> x.tqkv.gguf."""
    return model.with_name(model.name.removesuffix(".gguf") + ".tqkv.gguf")


class _Sums:
    """One layer's float64 sums over tokens, per KV head and channel: k, k^2 and the q^2 of the
    query heads that read that KV head (head j reads KV head j // (n_head / n_head_kv))."""

    def __init__(self, n_head_kv: int, head_dim: int):
        self.k = np.zeros((n_head_kv, head_dim))
        self.k2 = np.zeros((n_head_kv, head_dim))
        self.q2 = np.zeros((n_head_kv, head_dim))
        self.n_k = 0
        self.n_q = 0

    def add(self, q: np.ndarray, k: np.ndarray) -> None:
        """q [n_tokens, n_head, head_dim], k [n_tokens, n_head_kv, head_dim]."""
        n, n_head, d = q.shape
        n_head_kv = k.shape[1]
        if n_head % n_head_kv or k.shape != (n, n_head_kv, d) or self.k.shape != (n_head_kv, d):
            raise RuntimeError(f"unexpected attention shapes: q {q.shape}, k {k.shape}")
        k64 = k.astype(np.float64)
        self.k += k64.sum(0)
        self.k2 += np.square(k64).sum(0)
        self.q2 += np.square(q.astype(np.float64)).reshape(n, n_head_kv, n_head // n_head_kv, d).sum((0, 2))
        self.n_k += n
        self.n_q += n * (n_head // n_head_kv)

    def result(self, exponent: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(k_mean, k_scale): the key mean, and a = (q2/k2)^exponent normalised to RMS 1 per head, where
        each channel's key variance k2 and query energy q2 are raised by eps times their head's mean so
        that a near-silent channel cannot get an extreme scale."""
        m = self.k / self.n_k
        k2 = np.maximum(self.k2 / self.n_k - m * m, 0.0)  # variance; max: float64 cancellation
        k2 += eps * k2.mean(1, keepdims=True)
        q2 = self.q2 / self.n_q
        q2 += eps * q2.mean(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (q2 / k2) ** exponent
            a /= np.sqrt(np.mean(a * a, 1, keepdims=True))
        if not np.all(np.isfinite(a) & (a > 0)):
            raise RuntimeError("a KV head whose keys or queries are constant over the text has no channel scale")
        return m.astype(np.float32), a.astype(np.float32)


def calibrate(model: Path, texts: list[Path], n_ctx: int = 512, n_chunks: int = 4, out: Path | None = None,
              n_threads: int | None = None, n_gpu_layers: int = -1) -> Path:
    """Measure the model's key mean and channel scale on the texts and write its profile (default:
    default_path(model)); returns the profile's path.

    The texts (UTF-8) are concatenated and tokenized once as llama.cpp does (BOS first where the model
    adds one); chunk i is tokens [i*n_ctx, (i+1)*n_ctx), run as a fresh sequence with its first token
    replaced by BOS where the model adds one, as llama-perplexity does, so every chunk starts like a
    prompt. Statistics are over every token of every chunk. n_gpu_layers layers (-1: all) run on a GPU
    when the build has one."""
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    if not texts:
        raise ValueError("no calibration text given")
    if n_ctx < 1 or n_chunks < 1:
        raise ValueError(f"n_ctx and n_chunks must be positive, got {n_ctx} and {n_chunks}")
    out = out or default_path(model)
    if out.resolve() == model.resolve():
        raise ValueError(f"{out}: the profile would overwrite the model")
    data = b"".join(read_text(p) for p in texts)

    sums: dict[int, _Sums] = {}

    def on_layer(layer: capture.LayerQKV) -> None:
        sums.setdefault(layer.layer, _Sums(layer.k.shape[1], layer.k.shape[2])).add(layer.q, layer.k)

    with capture.Session(model, n_ctx, n_threads, n_gpu_layers) as s:
        arch = s.meta("general.architecture")
        block_count = s.meta(f"{arch}.block_count")
        if arch is None or block_count is None:
            raise ValueError(f"{model}: no general.architecture or <arch>.block_count in its metadata")
        name = s.meta("general.name") or ""
        tokens = tokenize_prefix(s.tokenize, data, n_ctx * n_chunks)
        if len(tokens) < n_ctx * n_chunks:
            raise ValueError(f"the texts have {len(tokens)} tokens, fewer than {n_chunks} chunks of {n_ctx}")
        for i in tqdm(range(n_chunks), desc="tqkv calibrate", unit="chunk"):
            chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
            if s.bos is not None:
                chunk[0] = s.bos
            s.run(chunk, on_layer)

    layers = {il: sums[il].result(K_SCALE_EXPONENT, K_SCALE_EPS) for il in sorted(sums)}
    result = Profile(
        version=VERSION, fingerprint=fingerprint(model), architecture=arch, model_name=name,
        model_file=model.name, n_layer=int(block_count), text_names=",".join(p.name for p in texts),
        text_sha256=hashlib.sha256(data).hexdigest(), n_tokens=n_ctx * n_chunks, n_ctx=n_ctx,
        tool_version=_tool_version(), k_scale_exponent=K_SCALE_EXPONENT, k_scale_eps=K_SCALE_EPS, layers=layers)
    write(result, out)
    return out


def ensure(model: Path) -> Path:
    """The model's default profile, beside it (what llama.cpp loads when given none): calibrated on
    assets.CALIBRATION_TEXT first when it is missing, unreadable or made for another file."""
    path = default_path(model)
    if path.is_file():
        try:
            if read(path).fingerprint == fingerprint(model):
                return path
        except ValueError:
            pass
    return calibrate(model, [assets.text(assets.CALIBRATION_TEXT)], out=path)


def write(profile: Profile, path: Path) -> None:
    """Write the profile GGUF; through a temporary file, so llama.cpp never finds a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_uint32(KEY_VERSION, profile.version)
    w.add_string(KEY_FINGERPRINT, profile.fingerprint)
    w.add_string(KEY_ARCHITECTURE, profile.architecture)
    w.add_string(KEY_NAME, profile.model_name)
    w.add_string(KEY_FILE, profile.model_file)
    w.add_uint32(KEY_N_LAYER, profile.n_layer)
    w.add_string(KEY_TEXT_NAMES, profile.text_names)
    w.add_string(KEY_TEXT_SHA256, profile.text_sha256)
    w.add_uint32(KEY_TEXT_N_TOKENS, profile.n_tokens)
    w.add_uint32(KEY_TEXT_N_CTX, profile.n_ctx)
    w.add_string(KEY_TOOL_VERSION, profile.tool_version)
    w.add_float32(KEY_K_SCALE_EXPONENT, profile.k_scale_exponent)
    w.add_float32(KEY_K_SCALE_EPS, profile.k_scale_eps)
    if profile.alloc:
        w.add_float32(KEY_ALLOC_BUDGET, profile.alloc.budget)
        w.add_array(KEY_ALLOC_K, list(profile.alloc.k_types))
        w.add_array(KEY_ALLOC_V, list(profile.alloc.v_types))
    for il, (k_mean, k_scale) in sorted(profile.layers.items()):
        w.add_tensor(f"blk.{il}.k_mean", np.ascontiguousarray(k_mean, np.float32))
        w.add_tensor(f"blk.{il}.k_scale", np.ascontiguousarray(k_scale, np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        raise RuntimeError(f"{path}: cannot write the profile ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path) -> Profile:
    """A profile written by calibrate; ValueError for any other file."""
    try:
        r = gguf.GGUFReader(str(path))
    except ValueError as e:
        raise ValueError(f"{path}: not a GGUF file ({e})") from None
    arch = r.fields["general.architecture"].contents() if "general.architecture" in r.fields else None
    if arch != ARCH:
        raise ValueError(f"{path}: not a tqkv profile (general.architecture is {arch!r}, not {ARCH!r})")

    def get(key: str) -> str | int | float | list[str]:
        if key not in r.fields:
            raise ValueError(f"{path}: a tqkv profile without {key}")
        return r.fields[key].contents()

    version = int(get(KEY_VERSION))
    if version != VERSION:
        raise ValueError(f"{path}: profile version {version}; this tqkv reads version {VERSION}")
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    layers = {}
    for name in tensors:
        if m := _K_MEAN_NAME.fullmatch(name):
            scale = f"blk.{m.group(1)}.k_scale"
            if scale not in tensors:
                raise ValueError(f"{path}: {name} without {scale}")
            layers[int(m.group(1))] = (tensors[name], tensors[scale])
    alloc = None
    if KEY_ALLOC_K in r.fields:
        alloc = Alloc(float(get(KEY_ALLOC_BUDGET)), tuple(get(KEY_ALLOC_K)), tuple(get(KEY_ALLOC_V)))
    return Profile(
        version=version, fingerprint=get(KEY_FINGERPRINT), architecture=get(KEY_ARCHITECTURE),
        model_name=r.fields[KEY_NAME].contents() if KEY_NAME in r.fields else "",  # gguf writes no empty string
        model_file=get(KEY_FILE), n_layer=int(get(KEY_N_LAYER)),
        text_names=get(KEY_TEXT_NAMES), text_sha256=get(KEY_TEXT_SHA256), n_tokens=int(get(KEY_TEXT_N_TOKENS)),
        n_ctx=int(get(KEY_TEXT_N_CTX)), tool_version=get(KEY_TOOL_VERSION),
        k_scale_exponent=float(get(KEY_K_SCALE_EXPONENT)), k_scale_eps=float(get(KEY_K_SCALE_EPS)),
        layers=dict(sorted(layers.items())), alloc=alloc)


def tokenize_prefix(tokenize: Callable[[bytes], list[int]], data: bytes, n: int) -> list[int]:
    """The tokens of the shortest prefix of data (cut at a line end) that holds n of them, or of all
    of it: tokenizing a whole long text costs more than the run itself with some vocabularies."""
    size = 8 * n
    while True:
        cut = len(data) if size >= len(data) else data.rfind(b"\n", 0, size) + 1 or size
        tokens = tokenize(data[:cut])
        if len(tokens) >= n or cut == len(data):
            return tokens
        size *= 2


def read_text(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return data


def _tool_version() -> str:
    try:
        return metadata.version("tqkv")
    except metadata.PackageNotFoundError:
        return "unknown"
