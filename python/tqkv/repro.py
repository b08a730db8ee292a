"""Reproducibility through llama-server: the same greedy chat requests, sent concurrently to fresh
server starts, must get the same answers on every start (as the plain f16 cache does under the same
load). What a start saw first must not change what a request gets."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import runner

# (question, a keyword a right answer contains): short chat prompts, the traffic llama-server sees
PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Russia?", "moscow"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the chemical symbol for gold?", "au"),
    ("What is the chemical formula of water?", "h2o"),
    ("How many days are there in a week?", "seven"),
    ("How many legs does a spider have?", "eight"),
    ("What is 2 plus 2?", "4"),
    ("What is 10 times 10?", "100"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "leonardo"),
    ("Who developed the theory of relativity?", "einstein"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("Which ocean is the largest?", "pacific"),
    ("What is the longest river in Africa?", "nile"),
    ("What is the tallest mountain in the world?", "everest"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"),
    ("Which season comes after winter?", "spring"),
    ("What language is mainly spoken in Brazil?", "portuguese"),
    ("What currency is used in Japan?", "yen"),
    ("How many continents are there?", "seven"),
    ("What is the primary language of the United States?", "english"),
    ("Name a primary color.", "red"),
    ("What is the square root of 9?", "3"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("Which organ pumps blood through the body?", "heart"),
    ("Write one sentence about the sea.", "sea"),
    ("What should you drink when you are thirsty?", "water"),
)


@dataclass(frozen=True)
class Start:
    """One fresh server start: the answers to PROMPTS in order, and how many hold their keyword."""

    answers: tuple[str, ...]

    @property
    def keyword_hits(self) -> int:
        return sum(kw in a.lower() for a, (_, kw) in zip(self.answers, PROMPTS))


def run(model: Path, k: str, v: str, starts: int = 3, n_prompts: int = len(PROMPTS), parallel: int = 4,
        clients: int = 8, ctx: int = 8192, max_tokens: int = 48, threads: int = 2,
        extra: tuple[str, ...] = ()) -> list[Start]:
    """Fresh llama-server starts, each answering n_prompts greedy chat requests from `clients`
    concurrent clients over `parallel` slots."""
    prompts = [p for p, _ in PROMPTS[:n_prompts]]
    out = []
    for _ in range(starts):
        args = [*runner.cache_args(k, v), "--parallel", str(parallel), "-t", str(threads), *extra]
        with runner.Server(model, args, ctx=ctx) as srv, ThreadPoolExecutor(clients) as pool:
            out.append(Start(tuple(pool.map(lambda p: srv.chat(p, max_tokens=max_tokens), prompts))))
    return out


def differing(starts: list[Start]) -> list[int]:
    """For every pair of starts, how many requests got different answers."""
    return [sum(x != y for x, y in zip(a.answers, b.answers)) for a, b in itertools.combinations(starts, 2)]
