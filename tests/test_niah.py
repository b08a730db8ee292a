"""The needle-in-a-haystack harness (`tqkv niah`) on the real model and build."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tqkv import assets, cli, niah


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_prompt_hits_length_and_depth(model_name: str, alice: Path) -> None:
    tok = niah.Tokenizer(assets.model(model_name))
    try:
        hay = niah.haystack(alice)
        for length in (512, 4096):
            for depth in (0, 25, 50, 75, 100):
                p = niah.make_prompt(tok, hay, length, depth, seed=1)
                assert length - niah.TOLERANCE <= p.n_tokens == tok.count(p.text) <= length
                needle = niah.NEEDLE.format(key=p.key)
                assert p.text.startswith(niah.HEAD) and p.text.endswith(niah.QUESTION)
                assert p.text.count(needle) == 1 and p.text.count(p.key) == 2
                # the depth: haystack tokens before the needle over all haystack tokens
                before = tok.count(p.text[:p.text.index(needle)]) - tok.count(niah.HEAD)
                total = p.n_tokens - tok.count(niah.HEAD + needle + niah.QUESTION)
                assert abs(before / total - depth / 100) < 0.05, (length, depth, before, total)
        # deterministic, and the seeds differ only in the key
        one, two = niah.make_prompt(tok, hay, 512, 50, seed=1), niah.make_prompt(tok, hay, 512, 50, seed=2)
        assert one == niah.make_prompt(tok, hay, 512, 50, seed=1)
        assert one.key != two.key and one.text.replace(one.key, "KEY") == two.text.replace(two.key, "KEY")
    finally:
        tok.close()


def test_lengths_clamped_to_training_context(capsys: pytest.CaptureFixture[str]) -> None:
    assert niah.fit_lengths([8192, 1024, 1024], 8192, "smollm2") == [1024, 8192 - niah.N_PREDICT]
    assert "length 8192 clamped to 8184" in capsys.readouterr().out
    with pytest.raises(ValueError, match="beyond the training context of smollm2 \\(8192 tokens\\)"):
        niah.fit_lengths([8193], 8192, "smollm2")


def test_cli_runs_grid_and_resumes(bin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["niah", "smollm2", "--lengths", "512", "--depths", "0", "100", "--seeds", "1",
            "--configs", "f16/f16", "tq4_0/tq4_0", "--out", str(out), "--cache", str(cache)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("starting llama-server") == 2, captured.out
    assert "tqkv niah tq4_0/tq4_0: 100%" in captured.err  # the progress bar of each configuration
    assert "report: " + str(out) in captured.err
    for name in ("smollm2-alice29.md", "smollm2-alice29.json", "smollm2-alice29-f16_f16.png",
                 "smollm2-alice29-tq4_0_tq4_0.png"):
        assert (out / name).stat().st_size > 0
    outcomes = json.loads((out / "smollm2-alice29.json").read_text())
    assert [(o["config"], o["depth"]) for o in outcomes] == [
        ("f16/f16", 100), ("f16/f16", 0), ("tq4_0/tq4_0", 100), ("tq4_0/tq4_0", 0)]
    assert all(o["ok"] for o in outcomes if o["config"] == "f16/f16"), outcomes  # the task works at f16
    assert "| f16/f16 | 16.00 | 2/2 |" in (out / "smollm2-alice29.md").read_text()

    # the second run finds every point in the cache: no server, nothing rewritten, the same report
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    t = time.monotonic()
    assert cli.main(args) == 0
    assert time.monotonic() - t < 20
    assert "starting llama-server" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert json.loads((out / "smollm2-alice29.json").read_text()) == outcomes


@pytest.mark.parametrize("args,message", [
    (["--configs", "f16/f16", "tq5_0/tq4_0"], "unknown KV cache type 'tq5_0'"),
    (["--lengths", "1024", "16384"], "length 16384 is beyond the training context of SmolLM2-135M-Instruct.Q4_1.gguf (8192 tokens)"),
    (["--depths", "50", "120"], "depths are percentages from 0 to 100"),
])
def test_cli_rejects_bad_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                              message: str) -> None:
    cache = tmp_path / "cache"
    assert cli.main(["niah", *args, "--out", str(tmp_path / "out"), "--cache", str(cache)]) == 1
    assert f"tqkv niah: error: {message}" in capsys.readouterr().err
    assert not cache.exists()  # rejected before any run
