"""Real attention inputs: the Q, K, V and mask every FLASH_ATTN_EXT of a model sees on a text.

The patched llama-cpp-python runs the model on the CPU with an f16 cache and flash attention; its
graph-eval callback stops at each FLASH_ATTN_EXT node and copies the node's sources. With an f16
cache llama.cpp does not rotate, so these are the rows a quantized cache would be fed before its
Hadamard rotation (K after RoPE, already rounded to f16 by the cache; Q in float32).

`Session` loads a model once and runs any number of token chunks, handing each attention layer to a
callback as soon as it is computed (so an 8B model's 32 layers never sit in memory together);
`capture` is one chunk of a text, every layer kept.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from .ggml_lib import Tensor

# llama.cpp names its K cache tensors "cache_<tag>k_l<il>" (llama-kv-cache.cpp; the tag is empty or
# e.g. "swa_"); the FLASH_ATTN_EXT node itself gets only a generated name ("node_27")
_K_CACHE_NAME = re.compile(rb"cache_(?:\w+_)?k_l(\d+)")


@dataclass
class LayerQKV:
    """numpy arrays as captured; as_torch() gives the PyTorch reference's view."""

    layer: int
    q: np.ndarray | torch.Tensor     # [n_tokens, n_head, head_dim] float32
    k: np.ndarray | torch.Tensor     # [n_tokens, n_head_kv, head_dim]
    v: np.ndarray | torch.Tensor     # [n_tokens, n_head_kv, head_dim_v]
    mask: np.ndarray | torch.Tensor  # [n_tokens, n_tokens] additive: 0 or -inf (causal, sliding window where used)
    scale: float         # FLASH_ATTN_EXT's logit scale
    softcap: float       # 0 when the model does not soft-cap logits

    def as_torch(self) -> LayerQKV:
        """The same layer with torch tensors (the [reference] extra)."""
        import torch

        return replace(self, q=torch.as_tensor(self.q), k=torch.as_tensor(self.k), v=torch.as_tensor(self.v),
                       mask=torch.as_tensor(self.mask))


def _ggml_base(lib_dir: Path) -> ctypes.CDLL:
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so.0"))
    base.ggml_op_name.restype, base.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    base.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    base.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_get.restype = None
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return base


def _view(base: ctypes.CDLL, t: Tensor, dtype: type) -> np.ndarray:
    """A tensor's elements as numpy [ne3, ne2, ne1, ne0], following its byte strides; a tensor in
    device memory (a GPU backend's buffer) is copied to the host first."""
    shape = tuple(reversed(t.ne))
    strides = tuple(reversed(t.nb))
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
    if t.buffer and not base.ggml_backend_buffer_is_host(t.buffer):
        raw = np.empty(span, np.uint8)
        base.ggml_backend_tensor_get(ctypes.addressof(t), raw.ctypes.data, 0, span)
    else:
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape, strides).copy()


def _flash_attn_op(base: ctypes.CDLL) -> int:
    for op in range(200):
        if base.ggml_op_name(op) == b"FLASH_ATTN_EXT":
            return op
    raise RuntimeError("this ggml has no FLASH_ATTN_EXT op")


def _cache_layer(k: Tensor) -> int | None:
    """The layer index in the name of the K cache tensor that K views, None if it has no such name.

    This is the layer that owns the cache: the one whose K statistics a quantized cache would use."""
    root = k
    while root.view_src:
        root = Tensor.from_address(root.view_src)
    m = _K_CACHE_NAME.fullmatch(root.name)
    return int(m.group(1)) if m else None


def _layer_qkv(base: ctypes.CDLL, t: Tensor, layer: int) -> LayerQKV:
    """Copies of a computed FLASH_ATTN_EXT node's inputs for its batch's tokens."""
    q, k, v, mask = (Tensor.from_address(t.src[i]) for i in range(4))
    if k.type != 1 or v.type != 1:
        raise RuntimeError("capture expects an f16 cache")
    # ggml layouts: q [D, n_tok, n_head], k/v [D, n_kv, n_head_kv], mask [n_kv, n_tok]; the batch's
    # tokens sit in cells 0..n_tok-1 of a cleared cache
    n = q.ne[1]
    qa = _view(base, q, np.float32)[0].transpose(1, 0, 2)
    ka = _view(base, k, np.float16)[0].transpose(1, 0, 2)[:n].astype(np.float32)
    va = _view(base, v, np.float16)[0].transpose(1, 0, 2)[:n].astype(np.float32)
    ma = _view(base, mask, np.float16)[0, 0][:n, :n].astype(np.float32)
    params = np.array(t.op_params[:3], np.int32).view(np.float32)
    return LayerQKV(layer, np.ascontiguousarray(qa), np.ascontiguousarray(ka), np.ascontiguousarray(va),
                    np.ascontiguousarray(ma), float(params[0]), float(params[2]))


def bos(L: ModuleType, vocab: int) -> int | None:
    """The token a model's tokenizer puts first, None where it adds none (L: llama_cpp)."""
    return L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None


def tokenize(L: ModuleType, vocab: int, text: bytes) -> list[int]:
    """Tokens of UTF-8 text as llama.cpp's tools see it: BOS where the model adds one, special
    tokens' text left as text (L: llama_cpp)."""
    # with no room for the tokens, llama_tokenize returns minus their number
    n = -L.llama_tokenize(vocab, text, len(text), None, 0, True, False)
    buf = (L.llama_token * n)()
    if n and L.llama_tokenize(vocab, text, len(text), buf, n, True, False) != n:
        raise RuntimeError("llama_tokenize failed")
    return list(buf)


class Session:
    """One model with an f16 cache and flash attention, for runs of up to n_ctx tokens; on the CPU,
    or with n_gpu_layers layers (-1: all) on a GPU backend when the build has one.

    LayerQKV.layer is the index of the K cache layer the attention reads (from the cache tensor's
    name), else the attention's position in the graph (0, 1, ...); for models where every layer has
    its own cache the two agree."""

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int | None = None, n_gpu_layers: int = 0):
        import llama_cpp as L  # the patched build, installed by `tqkv build`
        from llama_cpp import _logger

        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self._L, self.n_ctx = L, n_ctx
        self._base = _ggml_base(Path(L.__file__).parent / "lib")
        self._fa_op = _flash_attn_op(self._base)
        self._on_layer: Callable[[LayerQKV], None] | None = None
        self._seen = 0
        self._error: BaseException | None = None
        # kept on self: ggml calls it for as long as the context lives
        self._callback = L.ggml_backend_sched_eval_callback(self._on_node)

        _logger.set_verbose(False)  # llama.cpp's load log would drown the caller's output
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"could not load {model_path}")
        self._ctx = None
        try:
            self._vocab = L.llama_model_get_vocab(self._model)
            cparams = L.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx  # a run is one ubatch
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cparams.type_k = cparams.type_v = 1  # f16: what the model computed, unrotated
            cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
            cparams.cb_eval = self._callback
            self._ctx = L.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise RuntimeError("could not create a llama context")
        except BaseException:
            self.close()
            raise

    @property
    def bos(self) -> int | None:
        """The token the model's tokenizer puts first, None where it adds none."""
        return bos(self._L, self._vocab)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the model as text, None where the model has no such key."""
        L = self._L
        n = L.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if n < 0:
            return None
        buf = ctypes.create_string_buffer(n + 1)
        L.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode()

    def tokenize(self, text: bytes) -> list[int]:
        """Tokens of UTF-8 text as llama.cpp's tools see it (tokenize)."""
        return tokenize(self._L, self._vocab, text)

    def run(self, tokens: Sequence[int], on_layer: Callable[[LayerQKV], None]) -> None:
        """Decode tokens as one fresh sequence (positions from 0), calling on_layer for every attention
        layer in graph order; an exception from on_layer stops the run and is raised here."""
        L = self._L
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"a run takes 1..{self.n_ctx} tokens, got {n}")
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)
        buf = (L.llama_token * n)(*tokens)
        self._on_layer, self._seen, self._error = on_layer, 0, None
        try:
            rc = L.llama_decode(self._ctx, L.llama_batch_get_one(buf, n))
        finally:
            self._on_layer = None
        if self._error is not None:
            raise self._error
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        if not self._seen:
            raise RuntimeError("no FLASH_ATTN_EXT ran: the model has no attention llama.cpp can run with flash attention")

    def _on_node(self, t_ptr: int, ask: bool, _user: int) -> bool:
        # ctypes would print and swallow an exception raised here: keep it for run() to raise, and
        # return False to stop the graph
        try:
            t = Tensor.from_address(t_ptr)
            if t.op != self._fa_op or self._on_layer is None or self._error is not None:
                return not ask
            if ask:
                return True
            layer = _cache_layer(Tensor.from_address(t.src[1]))
            self._on_layer(_layer_qkv(self._base, t, self._seen if layer is None else layer))
            self._seen += 1
            return True
        except BaseException as e:
            self._error = e
            return False

    def close(self) -> None:
        L = self._L
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def capture(model_path: Path, text: str, n_tokens: int, n_threads: int | None = None) -> list[LayerQKV]:
    """Run the first n_tokens of text through the model in one batch; one LayerQKV per attention layer."""
    layers: list[LayerQKV] = []
    with Session(model_path, n_tokens, n_threads) as s:
        tokens = s.tokenize(text.encode())
        if len(tokens) < n_tokens:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than {n_tokens}")
        s.run(tokens[:n_tokens], layers.append)
    return layers
