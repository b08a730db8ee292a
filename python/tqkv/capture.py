"""Real attention inputs: the Q, K, V and mask every FLASH_ATTN_EXT of a model sees on a text.

The patched llama-cpp-python runs the model on the CPU with an f16 cache and flash attention; its
graph-eval callback stops at each FLASH_ATTN_EXT node and copies the node's sources. With an f16
cache llama.cpp does not rotate, so these are the rows a quantized cache would be fed before its
Hadamard rotation (K after RoPE, already rounded to f16 by the cache; Q in float32).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .ggml_lib import Tensor


@dataclass
class LayerQKV:
    layer: int
    q: torch.Tensor      # [n_tokens, n_head, head_dim] float32
    k: torch.Tensor      # [n_tokens, n_head_kv, head_dim]
    v: torch.Tensor      # [n_tokens, n_head_kv, head_dim_v]
    mask: torch.Tensor   # [n_tokens, n_tokens] additive: 0 or -inf (causal, sliding window where used)
    scale: float         # FLASH_ATTN_EXT's logit scale
    softcap: float       # 0 when the model does not soft-cap logits


def _view(t: Tensor, dtype: type) -> np.ndarray:
    """A tensor's elements as numpy [ne3, ne2, ne1, ne0], following its byte strides (host memory)."""
    shape = tuple(reversed(t.ne))
    strides = tuple(reversed(t.nb))
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape, strides).copy()


def _flash_attn_op(lib_dir: Path) -> int:
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so.0"))
    base.ggml_op_name.restype, base.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    for op in range(200):
        if base.ggml_op_name(op) == b"FLASH_ATTN_EXT":
            return op
    raise RuntimeError("this ggml has no FLASH_ATTN_EXT op")


def capture(model_path: Path, text: str, n_tokens: int, n_threads: int | None = None) -> list[LayerQKV]:
    """Run the first n_tokens of text through the model in one batch; one LayerQKV per attention layer."""
    import llama_cpp as L  # the patched build, installed by `tqkv build`

    lib_dir = Path(L.__file__).parent / "lib"
    fa_op = _flash_attn_op(lib_dir)
    layers: list[LayerQKV] = []

    def on_node(t_ptr: int, ask: bool, _user: int) -> bool:
        t = Tensor.from_address(t_ptr)
        if t.op != fa_op:
            return False if ask else True
        if ask:
            return True
        q, k, v, mask = (Tensor.from_address(t.src[i]) for i in range(4))
        if k.type != 1 or v.type != 1:
            raise RuntimeError("capture expects an f16 cache")
        # ggml layouts: q [D, n_tok, n_head], k/v [D, n_kv, n_head_kv], mask [n_kv, n_tok]
        n = q.ne[1]
        qa = _view(q, np.float32)[0].transpose(1, 0, 2)
        ka = _view(k, np.float16)[0].transpose(1, 0, 2)[:n].astype(np.float32)
        va = _view(v, np.float16)[0].transpose(1, 0, 2)[:n].astype(np.float32)
        ma = _view(mask, np.float16)[0, 0][:n, :n].astype(np.float32)
        params = np.array(t.op_params[:3], np.int32).view(np.float32)
        layers.append(LayerQKV(len(layers), torch.from_numpy(qa.copy()), torch.from_numpy(ka.copy()),
                               torch.from_numpy(va.copy()), torch.from_numpy(ma.copy()),
                               float(params[0]), float(params[2])))
        return True

    callback = L.ggml_backend_sched_eval_callback(on_node)
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's load log would drown the caller's output
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"could not load {model_path}")
    ctx = None
    try:
        vocab = L.llama_model_get_vocab(model)
        data = text.encode()
        buf = (L.llama_token * (n_tokens + len(data) // 2 + 8))()
        got = L.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
        if got < n_tokens:
            raise ValueError(f"the text has {max(got, 0)} tokens, fewer than {n_tokens}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_batch = n_tokens
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.type_k = cparams.type_v = 1  # f16: what the model computed, unrotated
        cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
        cparams.cb_eval = callback
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("could not create a llama context")
        if L.llama_decode(ctx, L.llama_batch_get_one(buf, n_tokens)) != 0:
            raise RuntimeError("llama_decode failed")
    finally:
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)
    return layers
