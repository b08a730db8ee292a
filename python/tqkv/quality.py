"""Paired perplexity / KL-divergence of KV-cache configurations against f16 logits.

The f16 logits of a model on a text are saved once (llama-perplexity --kl-divergence-base);
every configuration is then scored against them on the same tokens. Results are cached per
configuration, so an interrupted run resumes where it stopped. A report (model, text, ctx) keeps
the rows of earlier runs that this run did not score again, so boundary-layer rows can be added to
a table without recomputing it (a row is as valid as the build that made it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
from tqdm import tqdm

from . import alloc, assets, build, plot, profile, runner
from .types import CACHE_TYPES, cache_type, for_head

TQ_IDS = tuple(t.ggml_id for name, t in CACHE_TYPES.items() if name.startswith("tq"))


_FIELDS = {
    "ppl": r"Mean PPL\(Q\)\s+:\s+([0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s+:\s+([0-9.]+)",
    "kld_mean": r"Mean\s+KLD:\s+([0-9.eE+-]+)",
    "kld_p99": r"99\.0%\s+KLD:\s+([0-9.eE+-]+)",
    "same_top": r"Same top p:\s+([0-9.]+)",
}


# configuration flags: the llama.cpp switch each one sets
FLAGS = {
    "norot": {"LLAMA_ATTN_ROT_DISABLE": "1"},  # no Hadamard rotation of Q/K/V
    "nooff": {"LLAMA_TQ_K_OFFSET": "0"},       # TurboQuant K without the key offset (and scale)
    "noscale": {"LLAMA_TQ_K_SCALE": "0"},      # TurboQuant K without the key channel scale
    "noprof": {"LLAMA_KV_PROFILE": "none"},    # no calibration profile: offset 0, scale 1
}
# :bN, boundary layers (patches/0008): the first N and the last N layers of the model store a
# TurboQuant K or V cache as q8_0
BOUNDARY = re.compile(r"b([1-9][0-9]*)")


@dataclass(frozen=True)
class Config:
    k: str
    v: str
    flag: str = ""

    @classmethod
    def parse(cls, s: str) -> "Config":
        if s.startswith("alloc:"):
            try:
                budget = float(s.removeprefix("alloc:"))
            except ValueError:
                raise ValueError(f"bad configuration {s!r}: expected alloc:BITS, e.g. alloc:2.75") from None
            # a bit allocation (alloc.py): every layer's types come from the profile, which any
            # TurboQuant K and V types switch on
            return cls("tq3_0", "tq2_0", f"a{budget:g}")
        kv, _, flag = s.partition(":")
        k, sep, v = kv.partition("/")
        if not sep or (flag and flag not in FLAGS and not BOUNDARY.fullmatch(flag)):
            raise ValueError(f"bad configuration {s!r}: expected K/V or K/V:flag, flag one of "
                             f"{', '.join(FLAGS)} or bN (N >= 1 boundary layers)")
        cache_type(k), cache_type(v)  # unknown names fail here, before any run
        return cls(k, v, flag)

    @property
    def name(self) -> str:
        if self.budget:
            return f"alloc:{self.budget:g}"
        return f"{self.k}/{self.v}" + (f":{self.flag}" if self.flag else "")

    @property
    def budget(self) -> float | None:
        """The bits per value of a bit-allocated configuration (alloc:BITS), None for a uniform one."""
        return float(self.flag[1:]) if self.flag.startswith("a") else None

    @property
    def boundary(self) -> int:
        """Boundary layers at each end of the model whose TurboQuant K/V cache is q8_0 (0: none)."""
        m = BOUNDARY.fullmatch(self.flag)
        return int(m.group(1)) if m else 0

    @property
    def env(self) -> dict[str, str]:
        if self.boundary:
            return {"LLAMA_TQ_BOUNDARY_LAYERS": str(self.boundary)}
        return FLAGS.get(self.flag, {})

    def bits(self, n_layer: int, head_dim: int = 64) -> float:
        """Bits per value, K and V averaged over the model's n_layer layers (all of them hold a cache)
        of head_dim values per head (a TQ type's blocks-of-16 form where 64 does not divide it); an
        allocated configuration's come from its profile (alloc.profile_bits)."""
        if self.budget:
            raise ValueError(f"{self.name}: the bits of an allocation are the profile's")
        n_q8 = min(2 * self.boundary, n_layer)

        def per_value(name: str) -> float:
            t = cache_type(for_head(name, head_dim) or name)
            if t.ggml_id not in TQ_IDS:
                return t.bits_per_value
            # a boundary layer is q8_0 where q8_0 fits the head, else it keeps the TQ type
            boundary = cache_type("q8_0" if for_head("q8_0", head_dim) else t.name).bits_per_value
            return ((n_layer - n_q8) * t.bits_per_value + n_q8 * boundary) / n_layer

        return (per_value(self.k) + per_value(self.v)) / 2


def layer_count(model: Path) -> int:
    """The model's layer count (GGUF block_count)."""
    r = gguf.GGUFReader(str(model))
    arch = r.fields["general.architecture"].contents()
    return int(r.fields[f"{arch}.block_count"].contents())


@dataclass(frozen=True)
class Score:
    config: str
    bits: float
    ppl: float
    ppl_base: float
    kld_mean: float
    kld_p99: float
    same_top: float

    @property
    def dppl_pct(self) -> float:
        return 100 * (self.ppl / self.ppl_base - 1)


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def base_logits(model: Path, text: Path, ctx: int, chunks: int, cache: Path) -> Path:
    """f16 logits of the model on the text, saved once (named by the model's fingerprint and the
    text's hash: two files of one name stay apart)."""
    text_sha = hashlib.sha256(text.read_bytes()).hexdigest()[:12]
    out = cache / f"base-{model.stem}-{profile.fingerprint(model)[:12]}-{text.stem}-{text_sha}-c{ctx}-n{chunks}.kld"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        _perplexity(["-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                     "--kl-divergence-base", str(tmp), *runner.cache_args("f16", "f16")])
        tmp.rename(out)
    return out


def score(model: Path, base: Path, cfg: Config, cache: Path, ctx: int, kv_profile: Path,
          extra: tuple[str, ...] = ()) -> Score:
    """Score one configuration against the base logits (cached), with the calibration profile
    kv_profile (a flag such as noprof may override it) and extra llama-perplexity arguments."""
    calib = hashlib.sha256(kv_profile.read_bytes()).hexdigest()
    out = cache / f"score-{_key(model.name, base.name, cfg.name, ctx, build.build_id(), calib, extra)}.json"
    if out.exists():
        return Score(**json.loads(out.read_text()))
    log = _perplexity(["-m", str(model), "-c", str(ctx), "--kl-divergence-base", str(base), "--kl-divergence",
                       *runner.cache_args(cfg.k, cfg.v), *extra], {"LLAMA_KV_PROFILE": str(kv_profile), **cfg.env})
    vals = {}
    for field, pattern in _FIELDS.items():
        m = re.search(pattern, log)
        if not m:
            raise RuntimeError(f"no {field} in llama-perplexity output for {cfg.name}:\n{log[-3000:]}")
        vals[field] = float(m.group(1))
    head_dim = int(next(iter(profile.read(kv_profile).layers.values()))[0].shape[-1])
    bits = alloc.profile_bits(kv_profile) if cfg.budget else cfg.bits(layer_count(model), head_dim)
    s = Score(cfg.name, bits, **vals)
    out.write_text(json.dumps(asdict(s)))
    return s


def _perplexity(args: list[str], env: dict[str, str] | None = None) -> str:
    r = subprocess.run([str(runner.tool("llama-perplexity")), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({r.returncode}):\n{log[-3000:]}")
    return log


def run(model: Path, text: Path, ctx: int, chunks: int, configs: list[str], out_dir: Path,
        cache: Path | None = None, label: str | None = None) -> list[Score]:
    """Score the configurations on the model and text; the report (out_dir/<label>-c<ctx>.md/.json/.png)
    keeps earlier rows. Finished configurations are cached, so a rerun resumes."""
    cfgs = [Config.parse(c) for c in configs]
    cache = cache or assets.cache_dir() / "ppl"
    cache.mkdir(parents=True, exist_ok=True)
    prof = profile.ensure(model)
    scores = []
    with tqdm(total=len(cfgs) + 1, desc="tqkv ppl", unit="run") as bar:
        bar.set_postfix_str("f16 base logits")
        base = base_logits(model, text, ctx, chunks, cache)
        bar.update()
        for c in cfgs:
            bar.set_postfix_str(c.name)
            scores.append(score(model, base, c, cache, ctx, alloc.ensure(model, c.budget) if c.budget else prof))
            bar.update()
    stem = f"{label or f'{model.stem}-{text.stem}'}-c{ctx}"
    write_report(merge(load_report(out_dir, stem), scores), out_dir, stem)
    return scores


def load_report(out_dir: Path, stem: str) -> list[Score]:
    path = out_dir / f"{stem}.json"
    return [Score(**d) for d in json.loads(path.read_text())] if path.exists() else []


def merge(old: list[Score], new: list[Score]) -> list[Score]:
    """The report's rows: a configuration scored again replaces its row, every other row is kept."""
    by = {s.config: s for s in old} | {s.config: s for s in new}
    return list(by.values())


# upstream's rate-distortion reference: the log-linear KLD-versus-bits line through these two
LINE = ("q8_0/q8_0", "q4_0/q4_0")


def rd_line(scores: list[Score]) -> Callable[[float], float] | None:
    """KLD of the line through the LINE configurations at a bit rate (None if one is missing)."""
    by = {s.config: s for s in scores}
    if not all(c in by and by[c].kld_mean > 0 for c in LINE):
        return None
    (b1, k1), (b2, k2) = ((by[c].bits, by[c].kld_mean) for c in LINE)
    slope = (math.log(k2) - math.log(k1)) / (b2 - b1)
    return lambda bits: k1 * math.exp(slope * (bits - b1))


def table(scores: list[Score]) -> str:
    line = rd_line(scores)
    lines = ["| K / V | bits/value | PPL | ΔPPL | mean KLD | KLD / line | p99 KLD | same top |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sorted(scores, key=lambda s: -s.bits):
        ratio = f"{s.kld_mean / line(s.bits):.2f}" if line else "n/a"
        lines.append(f"| {s.config} | {s.bits:.2f} | {s.ppl:.4f} | {s.dppl_pct:+.2f}% | {s.kld_mean:.5f} | "
                     f"{ratio} | {s.kld_p99:.4f} | {s.same_top:.2f}% |")
    return "\n".join(lines)


# the plot's series: marker, colour, legend, whether the points are joined (a frontier)
_KINDS = {
    "alloc": ("D", "C3", "TurboQuant, bit allocation (alloc:BITS)", True),
    "tq": ("o", "C1", "TurboQuant, uniform", False),
    "boundary": ("^", "C2", "TurboQuant, boundary layers q8_0", False),
    "peer": ("v", "C4", "another build's types, against its own f16", False),
    "upstream": ("s", "C0", "upstream llama.cpp types", False),
}


def _kind(config: str) -> str:
    """A report row's series, by its name: alloc:BITS, PEER:K/V (another build's rows), K/V[:flag]."""
    if config.startswith("alloc:"):
        return "alloc"
    head, _, flag = config.partition(":")
    if "/" not in head:
        return "peer"
    if BOUNDARY.fullmatch(flag):
        return "boundary"
    return "tq" if "tq" in head else "upstream"


def write_report(scores: list[Score], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(table(scores) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps([asdict(s) for s in scores], indent=1) + "\n")
    plt = plot.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = {kind: sorted((x for x in scores if _kind(x.config) == kind), key=lambda x: x.bits) for kind in _KINDS}
    for kind, rows in kinds.items():
        if not rows:
            continue
        marker, color, label, joined = _KINDS[kind]
        ax.plot([x.bits for x in rows], [x.kld_mean for x in rows], marker=marker, color=color, label=label,
                ls="-" if joined else "none", lw=1)
        for x in rows:
            ax.annotate(x.config, (x.bits, x.kld_mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    line = rd_line(scores)
    if line:
        bits = [min(s.bits for s in scores), max(s.bits for s in scores)]
        ax.plot(bits, [line(b) for b in bits], "--", color="gray", lw=1, label=" - ".join(LINE) + " line")
    ax.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (K and V averaged)")
    ax.set_ylabel("mean KLD vs f16")
    ax.set_title(stem)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    plt.close(fig)
