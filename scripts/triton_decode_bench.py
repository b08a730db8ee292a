"""Decode-attention speed of the Triton kernels over packed caches, against torch's f16 SDPA (GPU).

One query token, Llama-3.1-8B attention shape (32 query heads over 8 KV heads, head dim 128), at
several context lengths. Prints a markdown table: time per layer, the bytes of K+V read, and the
bandwidth that implies. This is the Python reference path, not llama.cpp (issue 4 covers that).

    python scripts/triton_decode_bench.py [--contexts 8192 32768 65536]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from tqkv import reference, triton_kernels as tk

N_HEAD, N_HEAD_KV, D = 32, 8, 128
PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("tq4_0", "tq4_0"), ("tq3_0", "tq2_0"), ("tq2_0", "tq2_0")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{N_HEAD} q heads / {N_HEAD_KV} KV heads, D {D}, one query token\n")
    print("| n_kv | K / V | µs per layer | KV bytes read | GB/s | vs torch f16 SDPA |")
    print("|---:|---|---:|---:|---:|---:|")
    for n_kv in a.contexts:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(N_HEAD, D, device=dev, generator=g)
        k = torch.randn(n_kv, N_HEAD_KV, D, device=dev, generator=g)
        v = torch.randn(n_kv, N_HEAD_KV, D, device=dev, generator=g)
        qh, kh, vh = q.half()[None, :, None], k.half().transpose(0, 1)[None], v.half().transpose(0, 1)[None]
        sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True))
        print(f"| {n_kv} | torch SDPA f16 | {sdpa_ms * 1e3:.1f} | {4 * n_kv * N_HEAD_KV * D / 1e6:.1f} MB | "
              f"{4 * n_kv * N_HEAD_KV * D / sdpa_ms / 1e6:.0f} | 1.00x |")
        for tk_, tv_ in PAIRS:
            kb = reference.encode(k.cpu(), tk_).view(n_kv, N_HEAD_KV, -1).to(dev) if tk_ in ("f16", "q8_0") \
                else tk.quantize(k, tk_)
            vb = reference.encode(v.cpu(), tv_).view(n_kv, N_HEAD_KV, -1).to(dev) if tv_ in ("f16", "q8_0") \
                else tk.quantize(v, tv_)
            ms = triton.testing.do_bench(lambda: tk.decode_attention(q, kb, vb, tk_, tv_, D**-0.5))
            nbytes = kb.numel() + vb.numel()
            print(f"| {n_kv} | {tk_} / {tv_} | {ms * 1e3:.1f} | {nbytes / 1e6:.1f} MB | {nbytes / ms / 1e6:.0f} | "
                  f"{sdpa_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
