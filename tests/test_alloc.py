"""Bit allocation (alloc.py, patch 0020): the knapsack finds the cheapest types under a budget, the
profile carries them, llama.cpp builds each layer's cache in its type and refuses a bad allocation,
and `tqkv calibrate --budget` measures and writes one end to end on a real model."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tqkv import alloc, cli, profile, quality, runner, types


def _costs(n: int, seed: int, widths: tuple[int, ...] | None = None, heads: tuple[int, ...] | None = None) -> alloc.Costs:
    """Random costs that fall with bits, as measured ones do (after Costs.monotone); inf for a type
    that does not fit a layer's head size, as measure() leaves it."""
    rng = np.random.default_rng(seed)
    heads = heads or (64,) * n

    def table() -> dict[str, tuple[float, ...]]:
        base = rng.uniform(0.001, 0.1, n)
        falls = np.cumprod(rng.uniform(0.1, 0.6, (len(alloc.TYPES), n)), 0)
        return {t: tuple(float(c) if alloc.fits(t, h) else float("inf") for c, h in zip(base * falls[i], heads))
                for i, t in enumerate(alloc.TYPES)}

    return alloc.Costs(tuple(range(n)), widths or (192,) * n, heads, n, 0.0, table(), table())


def _brute_force(costs: alloc.Costs, budget: float) -> float:
    items = [(i, v) for i in range(len(costs.layers)) for v in (False, True)]
    best = float("inf")
    for pick in itertools.product(alloc.TYPES, repeat=len(items)):
        w = sum(costs.widths[i] * alloc.bits(t, costs.heads[i]) for (i, _), t in zip(items, pick))
        if w <= budget * 2 * sum(costs.widths) + 1e-9:
            best = min(best, sum((costs.v if v else costs.k)[t][i] for (i, v), t in zip(items, pick)))
    return best


@pytest.mark.parametrize("budget", [2.25, 2.6, 2.75, 3.1, 4.0, 8.5])
@pytest.mark.parametrize("widths", [None, (256, 128, 384)])
def test_allocation_is_the_cheapest_under_the_budget(budget: float, widths: tuple[int, ...] | None) -> None:
    costs = _costs(3, seed=int(budget * 100), widths=widths)
    a = alloc.allocate(costs, budget)
    assert alloc.avg_bits(a, costs) <= budget + 1e-9
    assert alloc.predicted(a, costs) == pytest.approx(_brute_force(costs, budget))


@pytest.mark.parametrize("budget", [3.0, 3.5, 4.5, 6.0])
def test_allocation_over_head_sizes_not_a_multiple_of_64(budget: float) -> None:
    # heads of 80 (blocks of 16: 1 bit more per value, no q8_0) beside heads of 64 and 96 (q8_0 fits 96)
    costs = _costs(3, seed=int(budget * 10), widths=(160, 128, 192), heads=(80, 64, 96))
    a = alloc.allocate(costs, budget)
    assert alloc.avg_bits(a, costs) <= budget + 1e-9
    assert alloc.predicted(a, costs) == pytest.approx(_brute_force(costs, budget))
    assert "q8_0" not in (a.k_types[0], a.v_types[0])
    assert alloc.bits("tq3_0", 80) == 4.0 and alloc.bits("tq3_0", 64) == 3.25 and alloc.bits("q8_0", 80) == float("inf")


def test_allocation_spends_bits_where_they_cost_most() -> None:
    # layer 1's K is 100 times as sensitive as anything else: it gets the bits
    costs = _costs(4, seed=1)
    k = {t: tuple(c * 100 if i == 1 else c for i, c in enumerate(v)) for t, v in costs.k.items()}
    a = alloc.allocate(dataclasses.replace(costs, k=k), 2.75)
    assert alloc.bits(a.k_types[1]) == max(alloc.bits(t) for t in a.k_types + a.v_types)


def test_budget_below_the_smallest_type_is_refused() -> None:
    with pytest.raises(ValueError, match="below the smallest type"):
        alloc.allocate(_costs(2, seed=0), 2.0)


def test_noisy_costs_are_made_monotone() -> None:
    # a measured inversion (tq4_0 above tq3_0, a negative q8_0) is noise: no type costs less than a wider one
    costs = _costs(1, seed=0)
    k = {"tq2_0": (0.05,), "tq3_0": (0.01,), "tq4_0": (0.02,), "q8_0": (-0.001,)}
    m = dataclasses.replace(costs, k=k).monotone()
    assert m.k == {"tq2_0": (0.05,), "tq3_0": (0.02,), "tq4_0": (0.02,), "q8_0": (0.0,)}


def _alloc_profile(model: Path, path: Path, k: list[str], v: list[str]) -> Path:
    p = profile.read(profile.default_path(model))
    profile.write(dataclasses.replace(p, alloc=profile.Alloc(3.0, tuple(k), tuple(v))), path)
    return path


def test_profile_round_trip_keeps_the_allocation(smollm2: Path, tmp_path: Path) -> None:
    n = profile.read(profile.default_path(smollm2)).n_layer
    k, v = ["tq4_0"] * 2 + ["tq3_0"] * (n - 2), ["q8_0"] + ["tq2_0"] * (n - 1)
    got = profile.read(_alloc_profile(smollm2, tmp_path / "a.tqkv.gguf", k, v)).alloc
    assert got == profile.Alloc(3.0, tuple(k), tuple(v))


def _perplexity(model: Path, text: Path, prof: Path) -> subprocess.CompletedProcess:
    cmd = [str(runner.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "1",
           *runner.cache_args("tq3_0", "tq2_0"), "--kv-profile", str(prof)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_llama_cpp_builds_each_layer_in_its_type(smollm2: Path, alice: Path, tmp_path: Path) -> None:
    p = profile.read(profile.default_path(smollm2))
    n = p.n_layer
    k = ["tq4_0"] * 3 + ["tq3_0"] * (n - 5) + ["q8_0"] * 2
    v = ["q8_0"] * 2 + ["tq2_0"] * (n - 2)
    r = _perplexity(smollm2, alice, _alloc_profile(smollm2, tmp_path / "a.tqkv.gguf", k, v))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert re.search(r"bit allocation from the calibration profile: K q8_0 x2 turbo3_0 x25 turbo4_0 x3; "
                     r"V q8_0 x2 turbo2_0 x28", log), log[-3000:]
    assert "per-layer cache types from its bit allocation" in log
    # the size line is the real one: every layer's rows at its own type (SmolLM2: 3 KV heads x 64)
    assert re.search(r"K \(mixed\): +[0-9.]+ MiB, V \(mixed\)", log), log[-3000:]
    kv = runner.kv_size(log)
    width, cells = 3 * 64, kv.cells
    want_k = sum(width * types.cache_type(t).bits_per_value / 8 for t in k) * cells
    want_v = sum(width * types.cache_type(t).bits_per_value / 8 for t in v) * cells
    assert kv.k_mib == pytest.approx(want_k / 2**20, abs=0.01)
    assert kv.v_mib == pytest.approx(want_v / 2**20, abs=0.01)
    assert alloc.profile_bits(tmp_path / "a.tqkv.gguf") == pytest.approx(
        (sum(types.cache_type(t).bits_per_value for t in k + v)) / (2 * n))


@pytest.mark.parametrize("bad, words", [
    ("q4_0", "assigns f16, q8_0, tq2_0, tq3_0 or tq4_0"),
    ("short", "array of 30 type names"),
])
def test_a_bad_allocation_is_refused(smollm2: Path, alice: Path, tmp_path: Path, bad: str, words: str) -> None:
    n = profile.read(profile.default_path(smollm2)).n_layer
    k = ["tq3_0"] * (n - 1) if bad == "short" else ["tq3_0"] * (n - 1) + [bad]
    r = _perplexity(smollm2, alice, _alloc_profile(smollm2, tmp_path / "bad.tqkv.gguf", k, ["tq2_0"] * n))
    assert r.returncode != 0
    assert words in r.stderr, r.stderr[-3000:]


def test_calibrate_budget_end_to_end(smollm2: Path, alice: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # a copy of the model in its own folder, so the profiles land there; short chunks keep it quick
    model = tmp_path / "m.gguf"
    shutil.copy(smollm2, model)
    rc = cli.main(["calibrate", str(model), "--ctx", "64", "--chunks", "2", "--cost-chunks", "1",
                   "--budget", "2.75", "3.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for b in (2.75, 3.5):
        path = alloc.alloc_path(model, b)
        assert path.is_file() and f"wrote {path}" in out
        a = profile.read(path).alloc
        assert a is not None and a.budget == b
        assert alloc.profile_bits(path) <= b + 1e-9
    # more bits, fewer of the smallest type
    low, high = (profile.read(alloc.alloc_path(model, b)).alloc for b in (2.75, 3.5))
    assert (low.k_types + low.v_types).count("tq2_0") > (high.k_types + high.v_types).count("tq2_0")
    # the allocated profile runs, and `tqkv ppl` scores it as alloc:2.75
    r = _perplexity(model, alice, alloc.alloc_path(model, 2.75))
    assert r.returncode == 0 and "bit allocation from the calibration profile" in r.stderr, r.stderr[-3000:]
    assert quality.Config.parse("alloc:2.75").name == "alloc:2.75"
    # ... and `tqkv niah` runs its grid on it as alloc:2.75, with the profile's bits
    out = tmp_path / "niah"
    assert cli.main(["niah", str(model), "--lengths", "512", "--depths", "0", "--seeds", "1", "--configs", "alloc:2.75",
                     "--out", str(out), "--cache", str(tmp_path / "niah-cache")]) == 0
    report = next(out.glob("*.md")).read_text()
    assert f"| alloc:2.75 | {alloc.profile_bits(alloc.alloc_path(model, 2.75)):.2f} | " in report, report
