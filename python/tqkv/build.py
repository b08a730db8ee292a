"""Build the patched llama.cpp (tools, tests, shared libs) and the patched llama-cpp-python.

The pinned llama-cpp-python sdist (which vendors llama.cpp) is unpacked under the build folder
(~/.cache/tqkv/build: $TQKV_BUILD_DIR, else the tqkv cache dir's build/), the patches/ series is applied once, tq_ggml/ is synced into ggml/src/ggml-tq/, and one CMake build
produces both the command-line tools and the shared libraries. The Python package is then
installed from the patched sdist with its own compile switched off and those libraries copied into
it, so llama-cpp-python and the tools run the same binaries. Every step is stamped, so a rebuild
with nothing changed only asks CMake whether anything is out of date.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import assets, sources, types

SDIST_ROOT = "llama_cpp_python-0.3.36"

TARGETS = (
    "llama", "ggml", "mtmd",
    "llama-server", "llama-cli", "llama-bench", "llama-perplexity", "llama-quantize",
    "test-backend-ops", "test-quantize-fns", "ggml-rpc-server",
)

# These CPUs advertise AMX but fault in it, so no -march=native: pin AVX2/FMA/F16C instead.
CPU_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON")


@dataclass
class Layout:
    """Where a build lives: everything is under one folder."""

    root: Path = field(default_factory=lambda: build_root())

    @property
    def tree(self) -> Path:
        return self.root / "src" / SDIST_ROOT

    @property
    def llama_cpp(self) -> Path:
        return self.tree / "vendor" / "llama.cpp"

    def cmake_dir(self, cuda: bool) -> Path:
        return self.root / ("cuda" if cuda else "cpu")

    def bin_dir(self, cuda: bool) -> Path:
        return self.cmake_dir(cuda) / "bin"


def build_root() -> Path:
    """$TQKV_BUILD_DIR, else the tqkv cache dir's build/."""
    env = os.environ.get("TQKV_BUILD_DIR")
    return Path(env).expanduser().resolve() if env else assets.cache_dir() / "build"


def _log(msg: str) -> None:
    print(f"[tqkv build] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(cmd))
    if subprocess.run(cmd, **kw).returncode != 0:
        raise RuntimeError(f"build step failed: {' '.join(cmd[:3])} ... (its output is above)")


def _digest(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_id(cuda: bool = False) -> str:
    """Digest of the built libraries: cached results are only valid for the build that made them."""
    libs = [bin_dir(cuda) / n for n in ("libggml-base.so", "libggml-cpu.so", "libllama.so")]
    missing = [str(p) for p in libs if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"not built: {', '.join(missing)} (run `tqkv build{' --cuda' if cuda else ''}`)")
    return _digest([p.resolve() for p in libs])[:16]


def _stamp_ok(stamp: Path, value: str) -> bool:
    return stamp.exists() and stamp.read_text() == value


def apply_patch(patch: Path, tree: Path) -> None:
    """Apply one patch of the series exactly: no fuzz, so a hunk whose context drifted fails here,
    naming the patch and the file, instead of landing in the wrong place."""
    r = subprocess.run(["patch", "-p1", "--forward", "--fuzz=0", "-i", str(patch)], cwd=tree,
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        raise RuntimeError(f"{patch.name} does not apply exactly to {tree.name}: " + "; ".join(lines[-4:]))


def prepare_tree(layout: Layout) -> None:
    """Unpack the verified sdist and apply patches/; then sync tq_ggml/ into it.

    When the patch series changes, a fresh patched tree is made beside the build tree and only
    the files that differ are copied over, so CMake recompiles just what the change touched.
    """
    sdist = assets.llama_cpp_sdist()
    patches = sources.patches()
    stamp = layout.root / "src" / ".patched"
    want = _digest(patches, extra=sdist.name)
    if not (_stamp_ok(stamp, want) and layout.tree.exists()):
        staging = layout.root / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tf:
            tf.extractall(staging, filter="data")
        fresh = staging / SDIST_ROOT
        # the sdist carries dangling .git files that make git and CMake think this is a checkout
        for stray in (fresh / ".git", fresh / "vendor" / "llama.cpp" / ".git"):
            if stray.is_file():
                stray.unlink()
        for p in patches:
            _log(f"applying {p.name}")
            apply_patch(p, fresh)
        _sync_dir(fresh, layout.tree, keep={"ggml-tq"})
        shutil.rmtree(staging)
        stamp.write_text(want)
    _sync_dir(sources.tq_ggml(), layout.llama_cpp / "ggml" / "src" / "ggml-tq")


def _sync_dir(src: Path, dst: Path, keep: set[str] = frozenset()) -> None:
    """Make dst a copy of src, rewriting only files whose bytes differ (mtimes drive rebuilds)."""
    dst.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in src.iterdir()}
    for p in src.iterdir():
        target = dst / p.name
        if p.is_dir():
            _sync_dir(p, target, keep)
        elif not target.is_file() or target.read_bytes() != p.read_bytes():
            shutil.copy(p, target)  # fresh mtime, so the build sees the change
    for stale in dst.iterdir():
        if stale.name not in names and stale.name not in keep:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def cmake_build(layout: Layout, cuda: bool, jobs: int, cuda_archs: str | None) -> Path:
    bdir = layout.cmake_dir(cuda)
    flags = [
        "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
        *CPU_FLAGS,
        "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_MTMD=ON",
        # the RPC backend (libggml-rpc, rpc-server, --rpc): layers split over processes or machines
        "-DGGML_RPC=ON",
        # libraries and tools share build/<kind>/bin; $ORIGIN lets them (and the copies inside the
        # Python package) find each other without LD_LIBRARY_PATH
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    ]
    if cuda:
        if not (os.environ.get("CUDACXX") or shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
            raise RuntimeError("--cuda needs the CUDA toolkit (nvcc): none on PATH, in $CUDACXX or /usr/local/cuda")
        flags += ["-DGGML_CUDA=ON", _cuda_archs_flag(cuda_archs)]
    _warn_static_libstdcxx()
    # CMake keeps the compilers of its first configure: a change of CC/CXX/CUDAHOSTCXX needs a new cache
    compilers = " ".join(f"{k}={os.environ.get(k, '')}" for k in ("CC", "CXX", "CUDAHOSTCXX"))
    seen = bdir / ".tqkv-compilers"
    if seen.exists() and seen.read_text() != compilers and (bdir / "CMakeCache.txt").exists():
        _log(f"compilers changed ({compilers}): configuring {bdir} afresh")
        (bdir / "CMakeCache.txt").unlink()
        shutil.rmtree(bdir / "CMakeFiles", ignore_errors=True)
    stamp = bdir / ".tqkv-configure"
    want = " ".join(flags)
    if not (_stamp_ok(stamp, want) and (bdir / "CMakeCache.txt").exists()):
        bdir.mkdir(parents=True, exist_ok=True)
        _run(["cmake", "-S", str(layout.llama_cpp), "-B", str(bdir), *flags])
        stamp.write_text(want)
    seen.write_text(compilers)
    # ninja prints [done/total] per step: the progress of the long compile
    _run(["cmake", "--build", str(bdir), "-j", str(jobs), "--target", *TARGETS])
    return layout.bin_dir(cuda)


def gpu_visible() -> bool:
    """True when nvidia-smi lists an NVIDIA GPU."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def _cuda_archs_flag(cuda_archs: str | None) -> str:
    """The CUDA architectures: the given list, else the visible GPUs' own ("native"), else (a build
    machine without a GPU) llama.cpp's default list for a portable build: PTX for compute_75 and
    compute_80 (RTX 20 and any newer card, compiled by the driver on first use), machine code for
    sm_86 and sm_89 (RTX 30 and 40), PTX for Hopper and machine code for Blackwell where the CUDA
    toolkit has them. The -U form drops a list an earlier configure left in CMake's cache."""
    if cuda_archs:
        return f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}"
    if gpu_visible():
        return "-DCMAKE_CUDA_ARCHITECTURES=native"
    _log("no GPU visible: building for llama.cpp's default CUDA architectures (sm_75 and newer)")
    return "-UCMAKE_CUDA_ARCHITECTURES"


def _warn_static_libstdcxx() -> None:
    """Warn when the C++ compiler has no shared libstdc++: each library then carries its own static
    copy, and llama-cpp-python crashes at model load (std::regex in the tokenizer) in a process that
    loaded libstdc++.so before it, as importing numpy or torch does. Seen on the GPU machine, whose
    /opt/gcc ships only libstdc++.a; the command-line tools are not affected."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return
    r = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip() == "libstdc++.so":  # not found: only the static library
        _log(f"WARNING: {cxx} links libstdc++ statically into shared libraries; llama-cpp-python will crash "
             "when numpy or torch is imported before a model loads. Use a compiler with a shared libstdc++, "
             "e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ tqkv build ...")


def _stage_libs(bin_dir: Path, dest: Path) -> list[Path]:
    """Copy the built libraries under the names the loaders ask for: each SONAME
    (libggml.so.0, ...) for the dynamic linker, and libllama.so / libmtmd.so for llama_cpp's ctypes."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for p in bin_dir.glob("lib*.so*"):
        if re.fullmatch(r"lib.+\.so\.\d+", p.name):
            shutil.copy(p.resolve(), dest / p.name)
    for name in ("libllama.so", "libmtmd.so"):
        if (bin_dir / name).exists():
            shutil.copy((bin_dir / name).resolve(), dest / name)
    staged = sorted(dest.iterdir())
    if not (dest / "libllama.so").exists():
        raise RuntimeError(f"no libllama.so in {bin_dir}: the CMake build did not produce it")
    return staged


def install_python(layout: Layout, bin_dir: Path) -> None:
    """pip-install the patched llama-cpp-python, packaging the libraries built above."""
    pylib = bin_dir.parent / "pylib"
    libs = _stage_libs(bin_dir, pylib)
    stamp = layout.root / f".installed-{bin_dir.parent.name}"
    want = _digest([*libs, *(layout.tree / "llama_cpp").glob("*.py")], extra=sys.executable)
    if _stamp_ok(stamp, want) and _llama_cpp_is_ours():
        _log("llama-cpp-python up to date")
        return
    env = dict(os.environ, CMAKE_ARGS=f"-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DLLAMA_PREBUILT_LIB_DIR={pylib}",
               PATH=os.pathsep.join([*_tool_binary_dirs(), os.environ.get("PATH", "")]))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(layout.tree)], env=env)
    if not _llama_cpp_is_ours():
        raise RuntimeError("installed llama-cpp-python does not load the TurboQuant build")
    stamp.write_text(want)


def _tool_binary_dirs() -> list[str]:
    """Folders of the cmake and ninja binaries of their PyPI packages. Their `cmake`/`ninja` commands
    are Python shims that cannot import the package inside pip's isolated build of
    llama-cpp-python, so scikit-build-core would fetch copies of its own (and fail offline)."""
    dirs = []
    for module, attr in (("cmake", "CMAKE_BIN_DIR"), ("ninja", "BIN_DIR")):
        try:
            dirs.append(str(getattr(importlib.import_module(module), attr)))
        except (ImportError, AttributeError):
            pass  # a system binary on PATH, found as it is
    return dirs


def _llama_cpp_is_ours() -> bool:
    """True when `import llama_cpp` in a fresh interpreter gets the patched package and libs."""
    probe = f"import llama_cpp; assert llama_cpp.GGML_TYPE_TURBO3_0 == {types.TQ3_0}"
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    return r.returncode == 0


def build(cuda: bool = False, jobs: int | None = None, cuda_archs: str | None = None,
          python: bool = True, layout: Layout | None = None) -> Path:
    """Full build; returns the folder holding the tools and libraries."""
    layout = layout or Layout()
    t0 = time.monotonic()
    prepare_tree(layout)
    bin_dir = cmake_build(layout, cuda, jobs or os.cpu_count() or 2, cuda_archs)
    if python:
        install_python(layout, bin_dir)
    _log(f"done in {time.monotonic() - t0:.1f} s; tools in {bin_dir}")
    return bin_dir


def bin_dir(cuda: bool = False) -> Path:
    """The folder of a finished build, or a clear error saying how to make one."""
    d = Layout().bin_dir(cuda)
    if not (d / "llama-server").exists():
        raise FileNotFoundError(f"no {'CUDA ' if cuda else ''}build in {d.parent}: run `tqkv build{' --cuda' if cuda else ''}` first")
    return d
