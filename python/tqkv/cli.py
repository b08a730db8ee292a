"""tqkv: build the TurboQuant llama.cpp, fetch pinned assets, regenerate codebooks, run the demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import assets, build, codebooks, demo, niah, paper, parity, profile, quality


def _build(a: argparse.Namespace) -> None:
    build.build(cuda=a.cuda, jobs=a.jobs, cuda_archs=a.cuda_archs, python=not a.no_python)


def _fetch(a: argparse.Namespace) -> None:
    for name in a.names or tuple(assets.ASSETS):
        print(f"{name}: {assets.fetch(name)}")


def _codebooks(a: argparse.Namespace) -> None:
    for p in codebooks.generate(build.REPO):
        print(f"wrote {p}")


def _demo(a: argparse.Namespace) -> None:
    configs = tuple((c.k, c.v) for c in map(quality.Config.parse, a.configs))
    rows = demo.run(a.model, a.text, a.ctx, a.chunks, configs)
    print(demo.table(rows, a.ctx))


def _ppl(a: argparse.Namespace) -> None:
    scores = quality.run(a.model, a.text, a.ctx, a.chunks, a.configs, a.out)
    print(quality.table(scores))


def _niah(a: argparse.Namespace) -> None:
    outcomes = niah.run(a.model, a.text, a.lengths, a.depths, a.seeds, a.configs, a.out, a.cache, a.cuda)
    print(niah.summary(outcomes, f"{a.model}-{a.text}", quality.layer_count(assets.model(a.model))))


def _parity(a: argparse.Namespace) -> None:
    cuda = any(b.startswith("CUDA") for b in a.backends)
    bin_dir = build.bin_dir(cuda) if a.backends else None
    checks = parity.run(bin_dir, a.backends, real=not a.no_real, n_threads=a.threads, triton=a.triton,
                         real_cache=a.real_cache)
    text = parity.report(checks)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
        print(f"wrote {a.out}")
    if any(c.status == "FAIL" for c in checks):
        raise RuntimeError("parity checks failed (marked FAIL above)")


def _paper(a: argparse.Namespace) -> None:
    paper.main()


def _calibrate(a: argparse.Namespace) -> None:
    model = assets.model(a.model) if a.model in assets.MODELS else Path(a.model)
    texts = [assets.text(t) if t in assets.TEXTS else Path(t) for t in a.text]
    start = time.perf_counter()
    out = profile.calibrate(model, texts, a.ctx, a.chunks, a.out, a.threads, a.gpu_layers)
    seconds = time.perf_counter() - start
    prof = profile.read(out)
    print(f"wrote {out}")
    print(f"model {model.name}: fingerprint {prof.fingerprint}, {len(prof.layers)} KV layers")
    print(f"measured {prof.n_tokens} tokens ({a.chunks} x {a.ctx}) of {prof.text_names} in {seconds:.1f} s")


def _run_parser(sub: argparse._SubParsersAction, name: str, help: str, ctx: int, configs: list[str],
                metavar: str) -> argparse.ArgumentParser:
    """A subcommand that runs a model on a text under several cache configurations."""
    r = sub.add_parser(name, help=help)
    r.add_argument("--model", default="smollm2", choices=assets.MODELS)
    r.add_argument("--text", default="alice29", choices=assets.TEXTS)
    r.add_argument("--ctx", type=int, default=ctx)
    r.add_argument("--chunks", type=int, default=8)
    r.add_argument("--configs", nargs="+", default=configs, metavar=metavar)
    return r


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

    d = _run_parser(sub, "demo", "f16 vs TurboQuant: KV memory, perplexity, greedy text", ctx=1024,
                    configs=["f16/f16", "tq4_0/tq4_0", "tq3_0/tq2_0"], metavar="K/V")
    d.set_defaults(fn=_demo)

    q = _run_parser(sub, "ppl", "perplexity / KL divergence of cache configurations against f16", ctx=2048,
                    configs=list(quality.DEFAULT_CONFIGS), metavar="K/V[:norot|:nooff|:noscale|:bN]")
    q.add_argument("--out", type=Path, default=build.REPO / "results" / "quality")
    q.set_defaults(fn=_ppl)

    n = sub.add_parser("niah", help="needle in a haystack: pass-key retrieval over context length and depth")
    n.add_argument("--model", default="smollm2", choices=assets.MODELS)
    n.add_argument("--text", default="alice29", choices=assets.TEXTS, help="the haystack")
    n.add_argument("--lengths", type=int, nargs="+", default=list(niah.DEFAULT_LENGTHS), metavar="TOKENS")
    n.add_argument("--depths", type=int, nargs="+", default=list(niah.DEFAULT_DEPTHS), metavar="PERCENT")
    n.add_argument("--seeds", type=int, default=3, help="needles (passwords) per grid point")
    n.add_argument("--configs", nargs="+", default=list(niah.DEFAULT_CONFIGS), metavar="K/V[:norot|:nooff|:noscale|:bN]")
    n.add_argument("--out", type=Path, default=build.REPO / "results" / "niah")
    n.add_argument("--cache", type=Path, help="per-point outcomes (default: the tqkv cache dir's niah/)")
    n.add_argument("--cuda", action="store_true", help="llama-server of `tqkv build --cuda`, all layers on the GPU")
    n.set_defaults(fn=_niah)

    r = sub.add_parser("parity", help="the PyTorch reference against ggml backends: bytes, values, attention")
    r.add_argument("--backends", nargs="*", default=["CPU"], metavar="NAME",
                   help="ggml backends (CPU, CUDA0, ...; CUDA needs `tqkv build --cuda`); none: Triton only")
    r.add_argument("--triton", action="store_true",
                   help="also the Triton kernels (natively on a GPU, else under TRITON_INTERPRET=1: slow)")
    r.add_argument("--no-real", action="store_true", help="skip the K/V rows captured from the models")
    r.add_argument("--real-cache", type=Path,
                   help="keep the captured rows in this file and reuse it (for a machine without the models)")
    r.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    r.add_argument("--out", type=Path, help="also write the report (markdown) here")
    r.set_defaults(fn=_parity)

    pc = sub.add_parser("paper", help="the paper's distortion bounds, codebooks and prod-vs-mse, checked (markdown)")
    pc.set_defaults(fn=_paper)

    cal = sub.add_parser("calibrate", help="measure a model's TurboQuant key offset and scale into a profile GGUF")
    cal.add_argument("model", metavar="MODEL", help=f"{' or '.join(assets.MODELS)}, or a .gguf file")
    cal.add_argument("--text", nargs="+", default=[profile.DEFAULT_TEXT], metavar="NAME_OR_FILE",
                     help=f"calibration texts, concatenated: {', '.join(assets.TEXTS)} or UTF-8 files")
    cal.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    cal.add_argument("--chunks", type=int, default=4)
    cal.add_argument("-o", "--out", type=Path, help="the profile (default: beside the model, x.gguf -> x.tqkv.gguf)")
    cal.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    cal.add_argument("--gpu-layers", type=int, default=-1,
                     help="layers on the GPU in a CUDA build (default -1: all; 0: CPU only)")
    cal.set_defaults(fn=_calibrate)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tqkv {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
