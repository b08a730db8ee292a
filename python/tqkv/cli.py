"""tqkv: build the TurboQuant llama.cpp, fetch pinned assets, regenerate codebooks, run the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import assets, build, codebooks, demo, quality


def _build(a: argparse.Namespace) -> None:
    build.build(cuda=a.cuda, jobs=a.jobs, cuda_archs=a.cuda_archs, python=not a.no_python)


def _fetch(a: argparse.Namespace) -> None:
    for name in a.names or tuple(assets.ASSETS):
        print(f"{name}: {assets.fetch(name)}")


def _codebooks(a: argparse.Namespace) -> None:
    for p in codebooks.generate(build.REPO):
        print(f"wrote {p}")


def _demo(a: argparse.Namespace) -> None:
    configs = tuple(tuple(c.split("/")) for c in a.configs)
    rows = demo.run(a.model, a.text, a.ctx, a.chunks, configs)
    print(demo.table(rows, a.ctx))


def _ppl(a: argparse.Namespace) -> None:
    scores = quality.run(a.model, a.text, a.ctx, a.chunks, a.configs, a.out)
    print(quality.table(scores))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tqkv", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="fetch, patch and build llama.cpp + llama-cpp-python")
    b.add_argument("--cuda", action="store_true", help="build the CUDA backend too (needs nvcc)")
    b.add_argument("--cuda-archs", help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    b.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    b.add_argument("--no-python", action="store_true", help="skip installing llama-cpp-python")
    b.set_defaults(fn=_build)

    f = sub.add_parser("fetch", help="download and verify pinned models and texts")
    f.add_argument("names", nargs="*", help=f"assets (default: all of {', '.join(assets.ASSETS)})")
    f.set_defaults(fn=_fetch)

    c = sub.add_parser("codebooks", help="regenerate codebooks/ and tq_ggml/tq-codebooks.h")
    c.set_defaults(fn=_codebooks)

    d = sub.add_parser("demo", help="f16 vs TurboQuant: KV memory, perplexity, greedy text")
    d.add_argument("--model", default="smollm2", choices=assets.MODELS)
    d.add_argument("--text", default="alice29", choices=assets.TEXTS)
    d.add_argument("--ctx", type=int, default=1024)
    d.add_argument("--chunks", type=int, default=8)
    d.add_argument("--configs", nargs="+", default=["f16/f16", "tq4_0/tq4_0", "tq3_0/tq2_0"], metavar="K/V")
    d.set_defaults(fn=_demo)

    q = sub.add_parser("ppl", help="perplexity / KL divergence of cache configurations against f16")
    q.add_argument("--model", default="smollm2", choices=assets.MODELS)
    q.add_argument("--text", default="alice29", choices=assets.TEXTS)
    q.add_argument("--ctx", type=int, default=2048)
    q.add_argument("--chunks", type=int, default=8)
    q.add_argument("--configs", nargs="+", default=list(quality.DEFAULT_CONFIGS), metavar="K/V[:norot]")
    q.add_argument("--out", type=Path, default=build.REPO / "results" / "quality")
    q.set_defaults(fn=_ppl)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tqkv {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
