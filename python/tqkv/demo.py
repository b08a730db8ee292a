"""The main job: f16 against TurboQuant caches on one model, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import profile, runner
from .types import cache_type

PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass(frozen=True)
class Row:
    k: str
    v: str
    bits: float
    kv_mib: float
    kv_cells: int
    ppl: float
    ppl_err: float
    text: str


def generate(model: Path, k: str, v: str, prompt: str = PROMPT, max_tokens: int = 32,
             n_gpu_layers: int = 0, verbose: bool = False) -> str:
    """Greedy chat answer through the patched llama-cpp-python (n_gpu_layers=-1: all on the GPU,
    the KV cache included, with a `tqkv build --cuda` install; verbose: llama.cpp's log on stderr)."""
    from llama_cpp import Llama  # the patched build, installed by `tqkv build`

    llm = Llama(model_path=str(model), n_ctx=512, flash_attn=True, verbose=verbose, seed=0,
                n_gpu_layers=n_gpu_layers, type_k=cache_type(k).ggml_id, type_v=cache_type(v).ggml_id)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         temperature=0.0)
        return out["choices"][0]["message"]["content"]
    finally:
        llm.close()


def run(model: Path, text: Path, ctx: int = 1024, chunks: int = 8,
        configs: tuple[tuple[str, str], ...] = (("f16", "f16"), ("tq4_0", "tq4_0"), ("tq3_0", "tq2_0"))) -> list[Row]:
    """Per K/V pair: perplexity on the text (ctx tokens x chunks) and a greedy chat answer."""
    profile.ensure(model)  # the TQ runs load it from beside the model
    rows = []
    for k, v in tqdm(configs, desc="tqkv demo", unit="pair"):
        p = runner.perplexity(model, text, k, v, ctx=ctx, chunks=chunks)
        bits = (cache_type(k).bits_per_value + cache_type(v).bits_per_value) / 2
        rows.append(Row(k, v, bits, p.kv.total_mib, p.kv.cells, p.ppl, p.err, generate(model, k, v)))
    return rows


def table(rows: list[Row], ctx: int) -> str:
    base = rows[0]
    lines = [
        f"| K / V | bits/value | KV MiB ({base.kv_cells} cells) | PPL @ ctx {ctx} | dPPL | greedy: {PROMPT!r} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        text = " ".join(r.text.split())
        lines.append(f"| {r.k} / {r.v} | {r.bits:.2f} | {r.kv_mib:.2f} | {r.ppl:.3f} ± {r.ppl_err:.3f} | "
                     f"{100 * (r.ppl / base.ppl - 1):+.2f}% | {text} |")
    return "\n".join(lines)
