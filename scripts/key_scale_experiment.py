"""Key channel scale (patch 0009) on real keys: how much a per-channel scale a (K*a stored, Q/a read)
lowers the attention error of a 3-bit TQ K cache, for a = (E[q^2] / E[k^2])^e and several e.

For each layer of the model, the Q/K that FLASH_ATTN_EXT sees on the first 1024 tokens of alice29
(f16 cache, `tqkv.capture`); a is measured on the first 512 (the cache's first ubatch) as the
patch does (keys around their mean, both moments smoothed by 1% of their channel mean); keys are
scaled, rotated as llama.cpp rotates them, stored as tq3_0 by the reference encoder; the score is
KL(softmax exact || softmax from stored keys) per query row, averaged over rows, heads and layers
(V exact). e = 0 is the cache without the scale; e = 1/4 minimises the logit error variance.

    python scripts/key_scale_experiment.py        # needs `tqkv build` (about 3 min on 2 cores)
"""

from __future__ import annotations

import torch

from tqkv import assets, capture, reference

EXPONENTS = (0.0, 1 / 16, 1 / 8, 3 / 16, 1 / 4)
N_TOKENS, N_CAL, EPS = 1024, 512, 0.01


def attention_kl(layer: capture.LayerQKV, e: float, bits: int) -> float:
    q, k, mask = layer.q.double(), layer.k.double(), layer.mask.double()
    n_head, n_head_kv, d = q.shape[1], k.shape[1], q.shape[2]
    g = n_head // n_head_kv
    kc = k[:N_CAL] - k[:N_CAL].mean(0)
    k2 = kc.square().mean(0)
    q2 = q[:N_CAL].reshape(N_CAL, n_head_kv, g, d).square().mean((0, 2))
    k2, q2 = k2 + EPS * k2.mean(-1, keepdim=True), q2 + EPS * q2.mean(-1, keepdim=True)
    a = (q2 / k2) ** e
    n = reference.k_rotation_size(d)
    ks = reference.rotate((k - k[:N_CAL].mean(0)) * a, n)
    qs = reference.rotate(q / a.repeat_interleave(g, 0), n)
    kh = reference.store(ks.float(), f"tq{bits}_0").double()
    s = torch.einsum("qhd,khd->hqk", qs, ks.repeat_interleave(g, 1)) * layer.scale + mask[None]
    sh = torch.einsum("qhd,khd->hqk", qs, kh.repeat_interleave(g, 1)) * layer.scale + mask[None]
    lp, lph = torch.log_softmax(s, -1), torch.log_softmax(sh, -1)
    p = lp.exp()
    return float(torch.where(p > 0, p * (lp - lph), 0.0).sum(-1).mean())


def main() -> None:
    text = assets.text("alice29").read_text(errors="ignore")
    print("| model | K | " + " | ".join(f"e = {e:g}" for e in EXPONENTS) + " |")
    print("|---|---|" + "---|" * len(EXPONENTS))
    for model in ("smollm2", "gemma3"):
        layers = [c.as_torch() for c in capture.capture(assets.model(model), text, N_TOKENS)]
        kl = [sum(attention_kl(layer, e, 3) for layer in layers) / len(layers) for e in EXPONENTS]
        print(f"| {model} | tq3_0 | " + " | ".join(f"{x:.4f} ({x / kl[0]:.2f}x)" for x in kl) + " |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
