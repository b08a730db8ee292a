"""Run the built llama.cpp tools and read their results."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from . import build

_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_KV = re.compile(r"llama_kv_cache: size = +(?P<mib>[0-9.]+) MiB \( *(?P<cells>\d+) cells, +(?P<layers>\d+) layers, "
                 r"+\d+/(?P<seqs>\d+) seqs\), K \(\w+\): +(?P<k>[0-9.]+) MiB, V \(\w+\): +(?P<v>[0-9.]+) MiB")


@dataclass(frozen=True)
class KVSize:
    total_mib: float
    k_mib: float
    v_mib: float
    cells: int  # tokens the cache holds, all streams (llama-perplexity runs several when ctx < batch)
    rows: int   # K (and V) rows held: cells x layers, summed over the caches (an SWA cache holds fewer cells)

    def bits_per_value(self, width: int) -> float:
        """The bits per value the caches really spend, every layer's K and V rows being width values
        (n_embd_k_gqa): a build that pads a row or keeps some layers in another type pays for it here."""
        return self.total_mib * 2**20 * 8 / (2 * self.rows * width)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    err: float
    kv: KVSize
    log: str


def tool(name: str, cuda: bool = False) -> Path:
    return build.bin_dir(cuda) / name


def kv_size(log: str) -> KVSize:
    """Sum of every KV cache of the log's last context (SWA models have two). Builds that log a probe
    context first (the fork's memory fit) report its caches too; they are not the run's."""
    found = [m.groupdict() for m in _KV.finditer(log[max(0, log.rfind("llama_context: constructing llama_context")):])]
    if not found:
        raise RuntimeError("no llama_kv_cache size line in the log")
    return KVSize(*(sum(float(f[g]) for f in found) for g in ("mib", "k", "v")),
                  cells=max(int(f["cells"]) * int(f["seqs"]) for f in found),
                  rows=sum(int(f["cells"]) * int(f["seqs"]) * int(f["layers"]) for f in found))


def cache_args(k: str, v: str) -> list[str]:
    # -lv 4: the tools hide the library's KV-cache lines (size, TurboQuant, rotation) below it
    return ["-fa", "on", "-ctk", k, "-ctv", v, "-lv", "4"]


def perplexity(model: Path, text: Path, k: str = "f16", v: str = "f16", ctx: int = 512,
               chunks: int | None = None, threads: int | None = None, extra: tuple[str, ...] = (),
               cuda: bool = False) -> Perplexity:
    cmd = [str(tool("llama-perplexity", cuda)), "-m", str(model), "-f", str(text), "-c", str(ctx),
           *cache_args(k, v), *extra]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if threads:
        cmd += ["-t", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    m = _PPL.search(log)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed ({r.returncode}) for K={k} V={v}:\n{log[-3000:]}")
    return Perplexity(float(m.group(1)), float(m.group(2)), kv_size(log), log)


def require_cuda() -> None:
    """A CUDA build and a GPU to run it on, or a clear error."""
    build.bin_dir(cuda=True)
    if not build.gpu_visible():
        raise RuntimeError("no NVIDIA GPU visible (nvidia-smi lists none): run without --cuda")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A tool on a free loopback port, its output drained into `log` as it comes (over many requests a
    log outgrows the pipe and the tool would block on it); a context manager that starts it, waits
    until `_ready` says it serves, stops it and keeps its log."""

    name = ""
    not_ready = "not serving"  # what the timeout says

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None, startup_s: float):
        self.cmd, self.port, self.startup_s = cmd, port, startup_s
        self.env = {**os.environ, **(env or {})}
        self.log = ""

    def _ready(self) -> bool:
        raise NotImplementedError

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._lines.extend, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join()
                self.log = "".join(self._lines)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"{self.name} {self.not_ready} after {self.startup_s} s:\n{self.log[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join()
        self.log = "".join(self._lines)

    def output(self) -> str:
        """What it has logged so far."""
        return "".join(self._lines)


class RpcServer(_Process):
    """ggml-rpc-server (llama.cpp's RPC backend: one remote device for `--rpc host:port`) on a free
    loopback port. GGML_RPC_DEBUG=1 in env logs every command it serves."""

    name = "ggml-rpc-server"
    not_ready = "not listening"

    def __init__(self, threads: int = 1, env: dict[str, str] | None = None, startup_s: float = 60.0,
                 cuda: bool = False):
        # a CUDA build's server offers the GPUs it sees (its CPU only where it sees none)
        port = free_port()
        self.endpoint = f"127.0.0.1:{port}"
        super().__init__([str(tool("ggml-rpc-server", cuda)), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                         port, env, startup_s)

    def _ready(self) -> bool:
        # its banner is block-buffered into the pipe: a connection tells when it listens
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False


class Server(_Process):
    """llama-server on a free local port."""

    name = "llama-server"
    not_ready = "not healthy"

    def __init__(self, model: Path, args: list[str], ctx: int = 2048, startup_s: float = 120.0,
                 env: dict[str, str] | None = None, cuda: bool = False):
        if cuda:
            require_cuda()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        super().__init__([str(tool("llama-server", cuda)), "-m", str(model), "--host", "127.0.0.1",
                          "--port", str(port), "-c", str(ctx), *args], port, env, startup_s)

    def _ready(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def chat(self, prompt: str, max_tokens: int = 48) -> str:
        r = requests.post(self.url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0,
        })
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
