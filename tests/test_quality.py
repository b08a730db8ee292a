"""The paired PPL / KL-divergence harness (`tqkv ppl`) on the real model and build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tqkv import quality


def test_ppl_harness_scores_and_resumes(bin_dir: Path, tmp_path: Path) -> None:
    configs = ["q8_0/q8_0", "tq4_0/tq4_0", "q4_0/q4_0:norot"]
    scores = quality.run("smollm2", "alice29", 256, 2, configs, tmp_path / "out", cache=tmp_path / "cache")
    by = {s.config: s for s in scores}
    # all share one f16 base; q8_0 is nearly lossless, 4-bit caches are not
    assert len({s.ppl_base for s in scores}) == 1
    assert by["q8_0/q8_0"].kld_mean < 0.01 < by["tq4_0/tq4_0"].kld_mean
    assert by["q8_0/q8_0"].same_top > by["tq4_0/tq4_0"].same_top
    for name in ("smollm2-alice29-c256.md", "smollm2-alice29-c256.json", "smollm2-alice29-c256.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert [d["config"] for d in json.loads((tmp_path / "out" / "smollm2-alice29-c256.json").read_text())] == configs

    # a second run resumes from the cache: same scores, and no cached result is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    cached = quality.run("smollm2", "alice29", 256, 2, configs, tmp_path / "out", cache=tmp_path / "cache")
    assert cached == scores
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps


def test_bad_configuration_is_rejected_before_running() -> None:
    with pytest.raises(ValueError, match="tq5_0"):
        quality.Config.parse("tq5_0/f16")
    with pytest.raises(ValueError, match="K/V"):
        quality.Config.parse("tq4_0")


def test_rate_distortion_line_is_log_linear_through_q8_0_and_q4_0() -> None:
    s = [quality.Score("q8_0/q8_0", 8.5, 1, 1, 0.004, 0, 0), quality.Score("q4_0/q4_0", 4.5, 1, 1, 0.04, 0, 0)]
    line = quality.rd_line(s)
    assert line(8.5) == pytest.approx(0.004) and line(4.5) == pytest.approx(0.04)
    assert line(6.5) == pytest.approx((0.004 * 0.04) ** 0.5) and line(0.5) == pytest.approx(0.4)
    assert quality.rd_line(s[:1]) is None
