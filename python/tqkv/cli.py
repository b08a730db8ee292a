"""tqkv: build the TurboQuant llama.cpp, calibrate a model, measure its KV caches (perplexity, KL
divergence, needle in a haystack) and verify the kernels against the PyTorch reference."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# Only the standard library and assets (itself standard library only) at import: `tqkv --help` and
# `tqkv build` stay fast and need none of the optional extras. Each subcommand imports what it runs.
from . import assets

MODEL_HELP = f"a .gguf file, or a built-in model: {', '.join(assets.MODELS)} (default: %(default)s)"
TEXT_HELP = f"a UTF-8 text file, or a built-in text: {', '.join(assets.TEXTS)} (default: %(default)s)"
CONFIG_METAVAR = "K/V[:norot|:nooff|:noscale|:noprof|:bN]|alloc:BITS"

# the optional extra that provides a module a subcommand imported
EXTRAS = {"torch": "reference", "scipy": "reference", "triton": "gpu", "matplotlib": "eval"}


def _build(a: argparse.Namespace) -> None:
    from . import build

    build.build(cuda=a.cuda, jobs=a.jobs, cuda_archs=a.cuda_archs, python=not a.no_python)


def _bin(a: argparse.Namespace) -> None:
    from . import build

    print(build.bin_dir(a.cuda))


def _fetch(a: argparse.Namespace) -> None:
    for name in a.names or tuple(assets.ASSETS):
        print(f"{name}: {assets.fetch(name)}")


def _codebooks(a: argparse.Namespace) -> None:
    from . import codebooks, sources

    root = a.out or sources.checkout()
    if root is None:
        raise ValueError("an installed tqkv has no source checkout to rewrite: give --out DIR "
                         "(or run it from a clone installed with pip install -e .)")
    for p in codebooks.generate(root):
        print(f"wrote {p}")


def _demo(a: argparse.Namespace) -> None:
    from . import demo, quality

    parsed = [quality.Config.parse(c) for c in a.configs]
    if any(c.budget or c.flag for c in parsed):
        raise ValueError("tqkv demo compares plain K/V pairs; score flags and allocations with tqkv ppl")
    configs = tuple((c.k, c.v) for c in parsed)
    rows = demo.run(assets.model_arg(a.model), assets.text_arg(a.text), a.ctx, a.chunks, configs)
    print(demo.table(rows, a.ctx))


def _ppl(a: argparse.Namespace) -> None:
    from . import quality

    for c in a.configs:
        quality.Config.parse(c)  # a bad configuration fails before anything runs
    out = a.out or assets.cache_dir() / "results" / "ppl"
    scores = quality.run(assets.model_arg(a.model), assets.text_arg(a.text), a.ctx, a.chunks, a.configs, out,
                         label=f"{assets.label(a.model)}-{assets.label(a.text)}")
    print(quality.table(scores))
    print(f"report: {out}", file=sys.stderr)


def _niah(a: argparse.Namespace) -> None:
    from . import niah, quality

    for c in a.configs:
        quality.Config.parse(c)
    model = assets.model_arg(a.model)
    out = a.out or assets.cache_dir() / "results" / "niah"
    label = f"{assets.label(a.model)}-{assets.label(a.text)}"
    outcomes = niah.run(model, assets.text_arg(a.text), a.lengths, a.depths, a.seeds, a.configs, out, a.cache,
                        a.cuda, label=label)
    print(niah.summary(outcomes, label, niah.config_bits(model, list(dict.fromkeys(o.config for o in outcomes)))))
    print(f"report: {out}", file=sys.stderr)


def _parity(a: argparse.Namespace) -> None:
    from . import build, parity

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
    from . import paper

    paper.main()


def _calibrate(a: argparse.Namespace) -> None:
    import time

    from . import profile

    model = assets.model_arg(a.model)
    texts = [assets.text_arg(t) for t in a.text]
    if a.budget and a.out and len(a.budget) > 1:
        raise ValueError("-o names one file: give one --budget with it, or none to write one file per budget")
    start = time.perf_counter()
    base = a.out if a.out and not a.budget else None
    out = profile.calibrate(model, texts, a.ctx, a.chunks, base, a.threads, a.gpu_layers)
    seconds = time.perf_counter() - start
    prof = profile.read(out)
    print(f"wrote {out}")
    print(f"model {model.name}: fingerprint {prof.fingerprint}, {len(prof.layers)} KV layers")
    print(f"measured {prof.n_tokens} tokens ({a.chunks} x {a.ctx}) of {prof.text_names} in {seconds:.1f} s")
    if not a.budget:
        return

    from . import alloc

    start = time.perf_counter()
    costs = alloc.measure(model, out, texts, a.ctx, a.cost_chunks, a.threads, a.gpu_layers)
    print(f"layer costs: {len(costs.layers)} layers x K/V x {len(alloc.TYPES)} types, {a.cost_chunks} x {a.ctx} tokens, "
          f"{time.perf_counter() - start:.1f} s")
    for b in a.budget:
        path = alloc.write(model, out, costs, b, a.out)
        print(f"wrote {path}: {alloc.describe(profile.read(path).alloc, costs)}")


def _model_and_text(r: argparse.ArgumentParser, text_help: str = TEXT_HELP, ctx: int | None = None) -> None:
    """MODEL and --text of a subcommand that runs a model; --ctx and --chunks where it scores a text."""
    r.add_argument("model", nargs="?", default="smollm2", metavar="MODEL", help=MODEL_HELP)
    r.add_argument("--text", default="alice29", metavar="TEXT", help=text_help)
    if ctx is not None:
        r.add_argument("--ctx", type=int, default=ctx, help="tokens per chunk (default: %(default)s)")
        r.add_argument("--chunks", type=int, default=8, help="(default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tqkv", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="fetch, patch and build llama.cpp + llama-cpp-python")
    b.add_argument("--cuda", action="store_true", help="build the CUDA backend too (needs nvcc)")
    b.add_argument("--cuda-archs", metavar="LIST",
                   help="CMAKE_CUDA_ARCHITECTURES (default: the visible GPUs', else a desktop set from sm_75 up)")
    b.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    b.add_argument("--no-python", action="store_true", help="skip installing llama-cpp-python")
    b.add_argument("--build-dir", type=Path, help="the build folder (default: $TQKV_BUILD_DIR, else ~/.cache/tqkv/build)")
    b.set_defaults(fn=_build)

    t = sub.add_parser("bin", help="print the folder of the built llama-server, llama-cli, llama-bench, ...")
    t.add_argument("--cuda", action="store_true", help="the CUDA build's folder")
    t.add_argument("--build-dir", type=Path, help="the build folder (default: $TQKV_BUILD_DIR, else ~/.cache/tqkv/build)")
    t.set_defaults(fn=_bin)

    f = sub.add_parser("fetch", help="download and verify the built-in models and texts")
    f.add_argument("names", nargs="*", help=f"assets (default: all of {', '.join(assets.ASSETS)})")
    f.set_defaults(fn=_fetch)

    cal = sub.add_parser("calibrate", help="measure a model's TurboQuant key offset and scale into a profile GGUF")
    cal.add_argument("model", metavar="MODEL", help=f"a .gguf file, or a built-in model: {', '.join(assets.MODELS)}")
    cal.add_argument("--text", nargs="+", default=[assets.CALIBRATION_TEXT], metavar="TEXT",
                     help=f"calibration texts, concatenated: UTF-8 files or built-in texts: {', '.join(assets.TEXTS)} "
                          "(default: %(default)s)")
    cal.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    cal.add_argument("--chunks", type=int, default=4, help="(default: %(default)s)")
    cal.add_argument("-o", "--out", type=Path, help="the profile (default: beside the model, x.gguf -> x.tqkv.gguf); with one --budget, "
                          "the allocated profile")
    cal.add_argument("--budget", type=float, nargs="+", metavar="BITS",
                     help="also measure each layer's K and V cost at each type and write, per budget, a profile "
                          "whose bit allocation averages at most BITS bits per value (x.gguf -> x.BITSbit.tqkv.gguf; "
                          "use it with --kv-profile)")
    cal.add_argument("--cost-chunks", type=int, default=2,
                     help="chunks of --ctx tokens for the layer costs (default: %(default)s)")
    cal.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    cal.add_argument("--gpu-layers", type=int, default=-1,
                     help="layers on the GPU in a CUDA build (default -1: all; 0: CPU only)")
    cal.set_defaults(fn=_calibrate)

    d = sub.add_parser("demo", help="f16 vs TurboQuant: KV memory, perplexity, a greedy chat answer")
    _model_and_text(d, ctx=1024)
    d.add_argument("--configs", nargs="+", default=["f16/f16", "tq4_0/tq4_0", "tq3_0/tq2_0"], metavar="K/V",
                   help="(default: %(default)s)")
    d.set_defaults(fn=_demo)

    q = sub.add_parser("ppl", help="perplexity and KL divergence of cache configurations against f16")
    _model_and_text(q, ctx=2048)
    # upstream types with their rotation (q4_0 also without it), then TQ types, symmetric and mixed
    q.add_argument("--configs", nargs="+", metavar=CONFIG_METAVAR, default=[
        "q8_0/q8_0", "q5_1/q5_1", "q5_0/q5_0", "q4_1/q4_1", "iq4_nl/iq4_nl", "q4_0/q4_0", "q4_0/q4_0:norot",
        "tq4_0/tq4_0", "tq4_0/tq4_0:nooff", "tq3_0/tq3_0", "tq3_0/tq3_0:noscale", "tq2_0/tq2_0",
        "tq4_0/tq3_0", "tq3_0/tq2_0", "tq4_0/tq2_0", "q8_0/tq4_0", "q8_0/tq3_0", "q8_0/tq2_0"],
        help="upstream types, TurboQuant pairs and ablations (default: 18 of them)")
    q.add_argument("--out", type=Path, help="report folder (default: ~/.cache/tqkv/results/ppl)")
    q.set_defaults(fn=_ppl)

    n = sub.add_parser("niah", help="needle in a haystack: pass-key retrieval over context length and depth")
    _model_and_text(n, text_help="the haystack: " + TEXT_HELP)
    n.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], metavar="TOKENS",
                   help="(default: %(default)s)")
    n.add_argument("--depths", type=int, nargs="+", default=[0, 25, 50, 75, 100], metavar="PERCENT",
                   help="(default: %(default)s)")
    n.add_argument("--seeds", type=int, default=3, help="needles (passwords) per grid point (default: %(default)s)")
    n.add_argument("--configs", nargs="+", default=["f16/f16", "tq4_0/tq4_0", "tq3_0/tq2_0", "q4_0/q4_0"],
                   metavar=CONFIG_METAVAR, help="(default: %(default)s; f16/f16 always runs, as the baseline)")
    n.add_argument("--out", type=Path, help="report folder (default: ~/.cache/tqkv/results/niah)")
    n.add_argument("--cache", type=Path, help="per-point outcomes (default: ~/.cache/tqkv/niah)")
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

    c = sub.add_parser("codebooks", help="regenerate codebooks/ and tq_ggml/tq-codebooks.h")
    c.add_argument("--out", type=Path, help="write under this folder (default: the source checkout)")
    c.set_defaults(fn=_codebooks)
    return p


def _one_line(cmd: str, e: BaseException) -> str:
    """An expected failure as one line; a longer message's rest goes to a log file that the line names."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        if top == "llama_cpp":
            return "the patched llama-cpp-python is not installed in this Python: run `tqkv build`"
        if top in EXTRAS:
            return f"needs {top}: pip install 'tqkv[{EXTRAS[top]}]'"
    if isinstance(e, subprocess.CalledProcessError):
        cmd_text = e.cmd if isinstance(e.cmd, str) else " ".join(map(str, e.cmd))
        return f"{cmd_text} failed with exit code {e.returncode}"
    if isinstance(e, OSError) and e.filename and not str(e).startswith(str(e.filename)):
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e) or type(e).__name__
    first, _, rest = msg.partition("\n")
    first = first.rstrip().rstrip(":")
    if rest.strip():
        log = assets.cache_dir() / "logs" / f"tqkv-{cmd}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(msg + "\n")
        first = f"{first} (details: {log})"
    return first


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if getattr(a, "build_dir", None):
        os.environ["TQKV_BUILD_DIR"] = str(a.build_dir.expanduser().resolve())
    import requests  # a dependency of the core: its errors (a server that stopped answering) are expected ones

    try:
        a.fn(a)
    except KeyboardInterrupt:
        print(f"tqkv {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError, subprocess.SubprocessError,
            requests.RequestException) as e:
        print(f"tqkv {a.cmd}: error: {_one_line(a.cmd, e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
