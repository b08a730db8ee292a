"""The paired PPL / KL-divergence harness (`tqkv ppl`) on the real model and build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tqkv import assets, quality, runner


def test_ppl_harness_scores_and_resumes(bin_dir: Path, tmp_path: Path) -> None:
    configs = ["q8_0/q8_0", "tq4_0/tq4_0", "q4_0/q4_0:norot"]
    model, text = assets.model("smollm2"), assets.text("alice29")
    scores = quality.run(model, text, 256, 2, configs, tmp_path / "out", cache=tmp_path / "cache",
                         label="smollm2-alice29")
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
    cached = quality.run(model, text, 256, 2, configs, tmp_path / "out", cache=tmp_path / "cache",
                         label="smollm2-alice29")
    assert cached == scores
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps


def test_bad_configuration_is_rejected_before_running() -> None:
    with pytest.raises(ValueError, match="tq5_0"):
        quality.Config.parse("tq5_0/f16")
    with pytest.raises(ValueError, match="K/V"):
        quality.Config.parse("tq4_0")


def test_boundary_flag_sets_the_env_var_and_counts_the_q8_0_layers() -> None:
    b2 = quality.Config.parse("tq3_0/tq2_0:b2")
    assert (b2.boundary, b2.env, b2.name) == (2, {"LLAMA_TQ_BOUNDARY_LAYERS": "2"}, "tq3_0/tq2_0:b2")
    # 4 of 30 layers at 8.5 bits, the other 26 at 3.25 (K) and 2.25 (V)
    assert b2.bits(30) == pytest.approx((26 * 3.25 + 4 * 8.5 + 26 * 2.25 + 4 * 8.5) / 60)
    assert quality.Config.parse("tq3_0/tq2_0").bits(30) == 2.75
    assert quality.Config.parse("tq3_0/tq2_0:b20").bits(30) == 8.5  # more than every layer: all q8_0
    # only TurboQuant caches are promoted: a q8_0 K stays q8_0, an f16 V stays f16
    assert quality.Config.parse("q8_0/tq2_0:b1").bits(18) == pytest.approx((8.5 + (16 * 2.25 + 2 * 8.5) / 18) / 2)
    assert quality.Config.parse("tq4_0/f16:b1").bits(18) == pytest.approx(((16 * 4.25 + 2 * 8.5) / 18 + 16) / 2)
    assert quality.Config.parse("q4_0/q4_0:norot").boundary == 0
    for bad in ("tq3_0/tq2_0:b0", "tq3_0/tq2_0:b", "tq3_0/tq2_0:bx"):
        with pytest.raises(ValueError, match="bN"):
            quality.Config.parse(bad)


def test_layer_counts_of_the_models() -> None:
    assert [quality.layer_count(assets.model(m)) for m in ("smollm2", "gemma3")] == [30, 18]


def test_boundary_layers_are_q8_0_in_llama_cpp(smollm2: Path, alice: Path, monkeypatch) -> None:
    plain = runner.perplexity(smollm2, alice, "tq3_0", "tq2_0", ctx=512, chunks=1)
    monkeypatch.setenv("LLAMA_TQ_BOUNDARY_LAYERS", "2")
    b2 = runner.perplexity(smollm2, alice, "tq3_0", "tq2_0", ctx=512, chunks=1)
    assert "boundary layers" not in plain.log
    assert "boundary layers (LLAMA_TQ_BOUNDARY_LAYERS=2): layers 0,1,28,29 store their K and V cache as q8_0" in b2.log
    # the cache grows by exactly the bits the harness books for it (sizes are logged to 0.01 MiB)
    bits = quality.Config.parse("tq3_0/tq2_0:b2").bits(30) / quality.Config.parse("tq3_0/tq2_0").bits(30)
    assert b2.kv.total_mib / plain.kv.total_mib == pytest.approx(bits, rel=2e-3)
    assert b2.ppl < plain.ppl


def test_a_report_keeps_the_rows_it_did_not_rescore(tmp_path: Path) -> None:
    old = [quality.Score("q8_0/q8_0", 8.5, 1, 1, 0.004, 0, 0), quality.Score("tq3_0/tq2_0", 2.75, 2, 1, 0.3, 0, 0)]
    quality.write_report(old, tmp_path, "m-t-c1")
    new = [quality.Score("tq3_0/tq2_0", 2.75, 3, 1, 0.2, 0, 0), quality.Score("tq3_0/tq2_0:b1", 3.1, 2, 1, 0.1, 0, 0)]
    merged = quality.merge(quality.load_report(tmp_path, "m-t-c1"), new)
    assert merged == [old[0], *new]
    assert quality.load_report(tmp_path, "missing") == []


def test_rate_distortion_line_is_log_linear_through_q8_0_and_q4_0() -> None:
    s = [quality.Score("q8_0/q8_0", 8.5, 1, 1, 0.004, 0, 0), quality.Score("q4_0/q4_0", 4.5, 1, 1, 0.04, 0, 0)]
    line = quality.rd_line(s)
    assert line(8.5) == pytest.approx(0.004) and line(4.5) == pytest.approx(0.04)
    assert line(6.5) == pytest.approx((0.004 * 0.04) ** 0.5) and line(0.5) == pytest.approx(0.4)
    assert quality.rd_line(s[:1]) is None
