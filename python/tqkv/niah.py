"""Needle in a haystack: can the model still retrieve a password from a long prompt with a compressed KV cache?

Pass-key retrieval (Mohtashami & Jaggi, 2023), sent as raw text to llama-server's /completion endpoint (no
chat template) and completed greedily for N_PREDICT tokens:

    There is an important password hidden inside a lot of irrelevant text. Find it and memorize it. I will
    quiz you about the password.

    <a Canterbury text, its lines kept, cut to the target token count, with this line inserted at the
     requested depth: "The password is 68392. Remember it. 68392 is the password.">

    Question: What is the password?
    Answer: The password is

A point passes when the answer contains the five digits. Each seed has its own password; all prompts share
the haystack, so every configuration sees exactly the prompts f16 sees.

Chosen by measuring f16 on both models (haystack alice29; seeds 0-2 unless fewer are given):
- without the opening instruction SmolLM2 continued the story: 3/12 (1024 and 4096 tokens, depths 0/50/100%,
  2 seeds);
- with "pass key" for "password", alice29's "little golden key" (chapter 1) is a distractor: SmolLM2 answered
  "the little golden key" at 2048-4096 tokens, depths 25-75% (33/40 of the default grid before it was
  stopped); Gemma, asked "What is the pass key? The pass key is", missed the needle at 100% depth, right
  before the question, at every length ("a secret code that allows you to"), chat template or not;
- this prompt, default grid: Gemma 60/60; SmolLM2 57/60 (8192 clamped to 8184), all three misses at 8184
  tokens and 0% depth. Neither model's chat template helped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import requests
from tqdm import tqdm

from . import alloc, assets, build, plot, profile, runner
from .quality import Config, layer_count

BASE = "f16/f16"

HEAD = ("There is an important password hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the password.\n\n")
NEEDLE = "The password is {key}. Remember it. {key} is the password."
QUESTION = "\n\nQuestion: What is the password?\nAnswer: The password is"
N_PREDICT = 8  # the digits are single tokens in both models: a space, five digits, a full stop
TOLERANCE = 8  # a prompt has between length - TOLERANCE and length tokens


@dataclass(frozen=True)
class Prompt:
    length: int  # target tokens
    depth: int  # percent of the haystack before the needle
    seed: int
    key: str
    text: str
    n_tokens: int

    @property
    def hash(self) -> str:
        return hashlib.sha256(f"{N_PREDICT}\0{self.text}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Outcome:
    config: str
    length: int
    depth: int
    seed: int
    key: str
    n_tokens: int
    ok: bool
    answer: str
    seconds: float


class Tokenizer:
    """The model's own tokenizer (vocabulary only) in-process, through the patched llama-cpp-python: prompts
    are built, and a finished run resumes, without a server. llama-server checks the count (_complete)."""

    def __init__(self, model: Path):
        import llama_cpp  # the patched build, installed by `tqkv build`

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the loader's info lines
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._llama_cpp = llama_cpp
        self._model = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
        if not self._model:
            raise RuntimeError(f"cannot load the vocabulary of {model}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def count(self, text: str) -> int:
        """Tokens of a prompt as llama-server sees it (BOS and special tokens included)."""
        b = text.encode()
        # with no room for the tokens, llama_tokenize returns minus their number
        return -self._llama_cpp.llama_tokenize(self._vocab, b, len(b), None, 0, True, True)

    def close(self) -> None:
        self._llama_cpp.llama_model_free(self._model)


def n_ctx_train(model: Path) -> int:
    r = gguf.GGUFReader(str(model))
    arch = r.fields["general.architecture"].contents()
    return int(r.fields[f"{arch}.context_length"].contents())


def key(seed: int) -> str:
    return str(random.Random(f"niah-{seed}").randrange(10000, 100000))


def haystack(text: Path) -> str:
    """The text with its lines stripped and blank runs collapsed: the hard-wrapped lines are the needle's slots."""
    lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines()]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])).strip()


def make_prompt(tok: Tokenizer, hay: str, length: int, depth: int, seed: int) -> Prompt:
    """The prompt of length - TOLERANCE..length tokens with the needle on the line nearest to depth %."""
    k = key(seed)
    needle = NEEDLE.format(key=k)
    room = length - tok.count(HEAD + needle + "\n" + QUESTION)
    if room < 32:
        raise ValueError(f"length {length} leaves no room for a haystack")
    chars_per_token = 4000 / tok.count(hay[:4000])
    chars = int(room * chars_per_token)
    for _ in range(12):
        if chars > len(hay):
            raise ValueError(f"the haystack text is too short for {length} tokens")
        lines = hay[:chars].rsplit(None, 1)[0].split("\n")  # whole words only
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line) + 1)
        at = min(range(len(starts)), key=lambda i: abs(starts[i] - depth / 100 * starts[-1]))
        text = HEAD + "\n".join(lines[:at] + [needle] + lines[at:]) + QUESTION
        n = tok.count(text)
        if length - TOLERANCE <= n <= length:
            return Prompt(length, depth, seed, k, text, n)
        # aim at the middle of the window; the ratio is steady enough to land there in a step or two
        chars += int((length - TOLERANCE // 2 - n) * chars_per_token)
    raise RuntimeError(f"could not fit a prompt to {length} tokens")


def fit_lengths(lengths: list[int], n_ctx: int, label: str) -> list[int]:
    """The lengths, ascending, with room for the answer inside the training context; beyond it is an error."""
    fitted = set()
    for length in lengths:
        if length > n_ctx:
            raise ValueError(f"length {length} is beyond the training context of {label} ({n_ctx} tokens)")
        if length + N_PREDICT > n_ctx:
            print(f"[tqkv niah] {label}: length {length} clamped to {n_ctx - N_PREDICT} "
                  f"(training context {n_ctx}, {N_PREDICT} tokens for the answer)", flush=True)
            length = n_ctx - N_PREDICT
        fitted.add(length)
    return sorted(fitted)


def prompts(model: Path, text: Path, lengths: list[int], depths: list[int], seeds: int) -> list[Prompt]:
    """All grid points, in the order that lets llama-server reuse the most cached prefix: every prompt starts
    with the same haystack, so the next one only recomputes from its needle on. Depths descend within a
    length and the seeds of a depth follow each other (they differ from the key's digits on)."""
    tok = Tokenizer(model)
    try:
        hay = haystack(text)
        return [make_prompt(tok, hay, length, depth, seed)
                for length in lengths for depth in sorted(depths, reverse=True) for seed in range(seeds)]
    finally:
        tok.close()


def run_config(model: Path, cfg: Config, points: list[Prompt], cache: Path, kv_profile: Path,
               cuda: bool = False) -> list[Outcome]:
    """Every point under one cache configuration and calibration profile: cached outcomes first, then
    one server for the rest (all layers on the GPU with cuda)."""
    calib = hashlib.sha256(kv_profile.read_bytes()).hexdigest()[:16]
    path = cache / f"{model.stem}-{_slug(cfg.name)}-{build.build_id(cuda)}-{calib}.json"
    done = _load(path)
    todo = [p for p in points if p.hash not in done]
    if todo:
        ctx = max(p.n_tokens for p in points) + N_PREDICT  # over all points: the same server on a resume
        tqdm.write(f"[tqkv niah] {cfg.name}: {len(points) - len(todo)}/{len(points)} points cached, "
                   f"starting llama-server -c {ctx}")
        # -np 1: one slot keeps the previous prompt for the next; --swa-full: sliding-window layers
        # keep the whole context too, else a prompt that differs anywhere but the end is recomputed in full
        args = [*runner.cache_args(cfg.k, cfg.v), "-np", "1", "--swa-full", *(["-ngl", "99"] if cuda else [])]
        with runner.Server(model, args, ctx=ctx, env={"LLAMA_KV_PROFILE": str(kv_profile), **cfg.env},
                           cuda=cuda) as srv, tqdm(todo, desc=f"tqkv niah {cfg.name}", unit="prompt") as bar:
            for p in bar:
                t = time.monotonic()
                answer = _complete(srv, p)
                done[p.hash] = {"ok": p.key in answer, "answer": answer, "seconds": round(time.monotonic() - t, 2)}
                done = _save(path, done)
                bar.set_postfix_str(f"length {p.length} depth {p.depth}% seed {p.seed}: "
                                    f"{'ok' if done[p.hash]['ok'] else 'FAIL'}")
    return [Outcome(cfg.name, p.length, p.depth, p.seed, p.key, p.n_tokens, **done[p.hash]) for p in points]


def _load(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, done: dict[str, dict]) -> dict[str, dict]:
    """Written after every point, atomically and merged with what is there: a kill loses one point, and
    runs sharing the cache (another grid on the same model) keep each other's points."""
    merged = {**_load(path), **done}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    return merged


def _slug(config: str) -> str:
    return config.replace("/", "_").replace(":", "-")


def _complete(srv: runner.Server, p: Prompt) -> str:
    r = requests.post(srv.url + "/completion", timeout=3600, json={
        "prompt": p.text, "n_predict": N_PREDICT, "temperature": 0.0, "cache_prompt": True})
    r.raise_for_status()
    body = r.json()
    if body["tokens_evaluated"] != p.n_tokens:
        raise RuntimeError(f"llama-server read {body['tokens_evaluated']} prompt tokens, "
                           f"the in-process tokenizer {p.n_tokens}")
    return body["content"]


def run(model: Path, text: Path, lengths: list[int], depths: list[int], seeds: int, configs: list[str],
        out_dir: Path, cache: Path | None = None, cuda: bool = False, label: str | None = None) -> list[Outcome]:
    """Every grid point under every configuration (f16 first); the report is out_dir/<label>.md/.json/.png.
    Outcomes are cached per point, so a rerun resumes."""
    cfgs = [Config.parse(c) for c in dict.fromkeys([BASE, *configs])]  # f16 first: the baseline
    if cuda:
        runner.require_cuda()
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    if not all(0 <= d <= 100 for d in depths):
        raise ValueError(f"depths are percentages from 0 to 100, not {depths}")
    label = label or f"{model.stem}-{text.stem}"
    lengths = fit_lengths(lengths, n_ctx_train(model), model.name)
    points = prompts(model, text, lengths, sorted(set(depths)), seeds)
    cache = cache or assets.cache_dir() / "niah"
    cache.mkdir(parents=True, exist_ok=True)
    prof = profile.ensure(model)
    # a bit allocation (alloc:BITS) runs on its allocated profile, made on first use (alloc.ensure)
    outcomes = [o for c in cfgs for o in run_config(model, c, points, cache,
                                                    alloc.ensure(model, c.budget) if c.budget else prof, cuda)]
    write_report(outcomes, out_dir, label, config_bits(model, [c.name for c in cfgs]))
    return outcomes


def config_bits(model: Path, names: list[str]) -> dict[str, float]:
    """Bits per value of each configuration on model: an allocation's from its profile."""
    return {name: alloc.profile_bits(alloc.alloc_path(model, c.budget)) if (c := Config.parse(name)).budget
            else c.bits(layer_count(model)) for name in names}


def _cells(outcomes: list[Outcome]) -> dict[str, dict[tuple[int, int], int]]:
    """Successes per configuration and (length, depth)."""
    cells: dict[str, dict[tuple[int, int], int]] = {}
    for o in outcomes:
        cell = cells.setdefault(o.config, {})
        cell[o.length, o.depth] = cell.get((o.length, o.depth), 0) + o.ok
    return cells


def _axes(outcomes: list[Outcome]) -> tuple[list[int], list[int], int]:
    """Lengths, depths and the number of seeds of the grid."""
    return sorted({o.length for o in outcomes}), sorted({o.depth for o in outcomes}), len({o.seed for o in outcomes})


def summary(outcomes: list[Outcome], title: str, bits: dict[str, float]) -> str:
    cells = _cells(outcomes)
    base = cells[BASE]
    lengths, depths, seeds = _axes(outcomes)
    lines = [f"# Needle in a haystack: {title}", "",
             f"Pass-key retrieval; lengths {', '.join(map(str, lengths))} tokens; depths "
             f"{', '.join(f'{d}%' for d in depths)}; {seeds} seed(s) per point.", "",
             "| K / V | bits/value | passed | vs f16 |", "|---|---|---|---|"]
    for name, cell in cells.items():
        total, delta = sum(cell.values()), sum(cell.values()) - sum(base.values())
        lines.append(f"| {name} | {bits[name]:.2f} | {total}/{len(cell) * seeds} | "
                     f"{'' if name == BASE else f'{delta:+d}'} |")
    diffs = [f"| {name} | {length} | {depth}% | {cell[length, depth]}/{seeds} | {base[length, depth]}/{seeds} |"
             for name, cell in cells.items() for (length, depth) in sorted(cell)
             if abs(cell[length, depth] - base[length, depth]) > 1]
    lines += ["", "Grid points where a configuration differs from f16 by more than one trial:", ""]
    lines += ["| K / V | length | depth | passed | f16 |", "|---|---|---|---|---|", *diffs] if diffs else ["none"]
    return "\n".join(lines)


def write_report(outcomes: list[Outcome], out_dir: Path, stem: str, bits: dict[str, float]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(summary(outcomes, stem, bits) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
    plt = plot.pyplot()
    if plt is None:
        return
    lengths, depths, seeds = _axes(outcomes)
    for name, cell in _cells(outcomes).items():
        grid = [[cell[length, depth] for length in lengths] for depth in depths]
        fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.2, 0.5 * len(depths) + 1.6))
        ax.imshow([[n / seeds for n in row] for row in grid], cmap="RdYlGn", vmin=0, vmax=1, alpha=0.7,
                  aspect="auto")
        for i, row in enumerate(grid):
            for j, n in enumerate(row):
                ax.text(j, i, f"{n}/{seeds}", ha="center", va="center")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{stem} {name}: {sum(map(sum, grid))}/{len(lengths) * len(depths) * seeds}")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}-{_slug(name)}.png", dpi=120)
        plt.close(fig)
