#!/usr/bin/env python3
"""AddressSanitizer + UndefinedBehaviorSanitizer on the CPU path.

Builds the patched tree of a finished `tqkv build` again, with llama.cpp's and ggml's sanitizer
options, into its own folder (~/.cache/tqkv/build-sanitize, or --build-dir), then runs under it:
the TurboQuant cases of test-backend-ops, tests/test_fuzz.py (the Python process loads the
sanitized libraries with the ASan runtime preloaded) and a short greedy generation with
llama-completion (SmolLM2, -fa on -ctk tq3_0 -ctv tq2_0). Any sanitizer report stops the step
that made it (halt_on_error) and fails the script. Writes a markdown summary with each step's
command, status and sanitizer report count (--out, default results/sanitize-cpu.md).

Usage: scripts/sanitize_cpu.py [--build-dir DIR] [--out FILE] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqkv import assets, build, profile

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("llama", "ggml", "llama-server", "llama-completion", "test-backend-ops")
SANITIZE = ("-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON",
            "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON")
# the TurboQuant cases of each op, as tests/test_ggml_tests.py runs them (the fused key op's cases
# are all TurboQuant ones, so they take no name filter)
OPS = ("SET_ROWS", "GET_ROWS", "CPY", "FLASH_ATTN_EXT", "TURBO_K_ROT", "TURBO_K_ROT_SET_ROWS", "TURBO_FATTN_FUSED")
# upstream's test-backend-ops builds its upscale cases with ggml_scale_mode values that carry flag
# bits (513 = bilinear | align corners), an invalid enum load that UBSan halts on before any case
# runs; the suppression is for that file's enum loads only
UBSAN_SUPP = Path(__file__).resolve().with_name("ubsan-suppressions.txt")
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1",
           "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:suppressions={UBSAN_SUPP}"}
REPORT = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error:")


@dataclass
class Step:
    name: str
    cmd: list[str]
    rc: int
    seconds: float
    reports: int
    tail: str


def configure_and_build(src: Path, out: Path, jobs: int) -> None:
    flags = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DBUILD_SHARED_LIBS=ON", *build.CPU_FLAGS,
             *SANITIZE, "-DGGML_RPC=OFF",
             "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_MTMD=ON",
             "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *flags], check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS], check=True)


def run(name: str, cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> Step:
    print(f"[sanitize] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    out = r.stdout + r.stderr
    step = Step(name, cmd, r.returncode, time.monotonic() - t0, len(REPORT.findall(out)), out[-3000:])
    print(f"[sanitize]   rc {step.rc}, {step.reports} sanitizer reports, {step.seconds:.0f} s", flush=True)
    return step


def preload() -> str:
    """The ASan runtime, which must come first in a process (Python) that is not built with it."""
    r = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    return r.stdout.strip()


def steps(san_root: Path, bin_dir: Path) -> list[Step]:
    model = assets.model("smollm2")
    profile.ensure(model)
    done = [run(f"test-backend-ops {op}", [str(bin_dir / "test-backend-ops"), "test", "-b", "CPU", "-o", op,
                                          *([] if op.startswith("TURBO") else ["-p", "turbo"])], SAN_ENV)
            for op in OPS]
    # the Python interpreter leaks by design at exit: leak checking off for it
    py_env = {"LD_PRELOAD": preload(), "TQKV_BUILD_DIR": str(san_root),
              "ASAN_OPTIONS": SAN_ENV["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0"),
              "UBSAN_OPTIONS": SAN_ENV["UBSAN_OPTIONS"]}
    done.append(run("tests/test_fuzz.py", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           "tests/test_fuzz.py"], py_env))
    done.append(run("llama-completion tq3_0/tq2_0", [
        str(bin_dir / "llama-completion"), "-m", str(model), "-fa", "on", "-ctk", "tq3_0", "-ctv", "tq2_0",
        "-p", "The capital of France is", "-n", "48", "--temp", "0", "-no-cnv", "-t", "2", "-c", "512"], SAN_ENV))
    return done


def report(done: list[Step], build_s: float, commit: str, incremental: bool) -> str:
    clean = all(s.rc == 0 and s.reports == 0 for s in done)
    lines = [
        "# ASan + UBSan on the CPU path",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Source: commit {commit}. The patched tree "
        "built with",
        f"`{' '.join(SANITIZE)}` (RelWithDebInfo, AVX2/FMA/F16C, shared libraries; {build_s / 60:.0f} min to build{', incremental' if incremental else ''}),",
        "then each step below under `ASAN_OPTIONS=" + SAN_ENV["ASAN_OPTIONS"] + "` and `UBSAN_OPTIONS="
        + SAN_ENV["UBSAN_OPTIONS"].replace(str(ROOT) + "/", "") + "` (the pytest step preloads libasan.so and checks no leaks, the",
        "interpreter's own being by design). Command: `python scripts/sanitize_cpu.py`.",
        "",
        "UBSan's suppressions (`scripts/ubsan-suppressions.txt`) cover one upstream report only: the enum loads",
        "in `tests/test-backend-ops.cpp`, whose upscale cases build `ggml_scale_mode` values with flag bits",
        "(513 = bilinear | align corners), which halt UBSan before any case runs.",
        "",
        f"Result: **{'clean' if clean else 'NOT clean'}**: {sum(s.reports for s in done)} sanitizer reports, "
        f"{sum(s.rc != 0 for s in done)} failing steps.",
        "",
        "| step | exit | sanitizer reports | s | outcome |",
        "|---|---|---|---|---|",
    ]
    for s in done:
        lines.append(f"| {s.name} | {s.rc} | {s.reports} | {s.seconds:.0f} | {outcome(s)} |")
    for s in done:
        if s.rc or s.reports:
            lines += ["", f"## {s.name}", "", "```", s.tail, "```"]
    return "\n".join(lines) + "\n"


def source_commit() -> str:
    """This checkout's commit, which the tree was built from if `tqkv build` ran since it changed."""
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def outcome(s: Step) -> str:
    """The line of the step's output that says how it went."""
    for pat in (r"\d+/\d+ tests passed", r"\d+ passed[^\n]*", r"The capital of France is[^\n]*"):
        if m := re.findall(pat, s.tail):
            return m[-1].strip().replace("|", "/")[:120]
    return "see below"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", type=Path, default=assets.cache_dir() / "build-sanitize")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sanitize-cpu.md")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    src = build.Layout().llama_cpp
    if not (src / "ggml" / "src" / "ggml-tq").is_dir():
        raise SystemExit(f"no patched tree in {src}: run `tqkv build` first")
    layout = build.Layout(a.build_dir.expanduser().resolve())
    commit, incremental = source_commit(), layout.cmake_dir(False).exists()
    t0 = time.monotonic()
    configure_and_build(src, layout.cmake_dir(False), a.jobs)
    done = steps(layout.root, layout.bin_dir(False))
    text = report(done, time.monotonic() - t0 - sum(s.seconds for s in done), commit, incremental)
    a.out.write_text(text)
    print(text)
    raise SystemExit(0 if all(s.rc == 0 and s.reports == 0 for s in done) else 1)


if __name__ == "__main__":
    main()
