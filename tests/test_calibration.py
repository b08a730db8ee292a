"""The calibration profile in llama.cpp (patch 0016): every entry point loads it, a wrong or broken
one is refused with a clear error, and nothing that changes answers depends on the traffic: fresh
server starts answer alike, and the first ubatch's size does not matter."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import llama_cpp
import requests
import numpy as np
import pytest

from tqkv import assets, profile, quality, repro, runner, types


def _perplexity_log(model: Path, text: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(runner.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "1",
           *runner.cache_args("tq3_0", "tq2_0"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_tools_say_which_calibration_is_in_force(smollm2: Path, alice: Path, tmp_path: Path) -> None:
    # the profile beside the model by default, one line at the tools' default verbosity (no -lv)
    cmd = [str(runner.tool("llama-perplexity")), "-m", str(smollm2), "-f", str(alice), "-c", "128", "--chunks", "1",
           "-fa", "on", "-ctk", "tq3_0", "-ctv", "tq2_0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"TurboQuant calibration: profile {profile.default_path(smollm2)}" in r.stderr, r.stderr[-3000:]
    r = subprocess.run(cmd + ["--kv-profile", "none"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TurboQuant calibration: none" in r.stderr, r.stderr[-3000:]


def _broken_profiles(smollm2: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Profiles that must be refused at load, with the words their error must hold."""
    good = profile.default_path(smollm2)
    truncated = tmp_path / "truncated.tqkv.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.tqkv.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    # right model, wrong head size: what a profile of another shape holds
    p = profile.read(good)
    narrow = tmp_path / "narrow.tqkv.gguf"
    profile.write(dataclasses.replace(p, layers={il: (m[:, :32], a[:, :32]) for il, (m, a) in p.layers.items()}), narrow)
    missing = tmp_path / "missing-layer.tqkv.gguf"
    profile.write(dataclasses.replace(p, layers={il: v for il, v in p.layers.items() if il != 7}), missing)
    return {
        "another model": (profile.ensure(assets.model("gemma3")), "made for another model"),
        "truncated": (truncated, "corrupt or truncated"),
        "not gguf": (garbage, "corrupt or truncated"),
        "a model, not a profile": (smollm2, "not a TurboQuant calibration profile"),
        "head size": (narrow, "head size 64"),
        "missing layer": (missing, "no blk.7.k_mean"),
        "no such file": (tmp_path / "nope.tqkv.gguf", "cannot open"),
    }


def test_bad_profiles_are_refused_by_the_tools(smollm2: Path, alice: Path, tmp_path: Path) -> None:
    for case, (path, words) in _broken_profiles(smollm2, tmp_path).items():
        r = _perplexity_log(smollm2, alice, "--kv-profile", str(path))
        assert r.returncode != 0, case
        assert "Segmentation" not in r.stderr and "GGML_ASSERT" not in r.stderr, (case, r.stderr[-2000:])
        assert f"TurboQuant calibration profile {path}" in r.stderr and words in r.stderr, (case, r.stderr[-2000:])


def test_bad_profile_is_refused_by_python(smollm2: Path, tmp_path: Path) -> None:
    path, _ = _broken_profiles(smollm2, tmp_path)["head size"]
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=str(smollm2), n_ctx=256, flash_attn=True, type_k=types.TQ3_0,
                        type_v=types.TQ2_0, kv_profile=str(path), verbose=False)


def test_python_takes_a_profile(smollm2: Path, alice: Path, tmp_path: Path) -> None:
    # Llama(kv_profile=...) and the profile beside the model are the same calibration: the same logits
    other = tmp_path / "copy.tqkv.gguf"
    other.write_bytes(profile.default_path(smollm2).read_bytes())
    logits = []
    for kw in ({}, {"kv_profile": str(other)}, {"kv_profile": "none"}):
        llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=256, flash_attn=True, type_k=types.TQ3_0,
                              type_v=types.TQ2_0, logits_all=True, verbose=False, **kw)
        llm.eval(llm.tokenize(alice.read_bytes()[:600])[:100])
        logits.append(np.array(llm.scores[llm.n_tokens - 1]))
    np.testing.assert_array_equal(logits[0], logits[1])
    assert not np.array_equal(logits[0], logits[2])


def test_server_starts_answer_alike(smollm2: Path) -> None:
    # fresh starts, concurrent greedy chat requests over 4 slots: TQ answers change between starts no
    # more often than f16's do under the same load (before the profile: 34-36 of 40 differed)
    diff = {}
    for k, v in (("f16", "f16"), ("tq3_0", "tq2_0")):
        starts = repro.run(smollm2, k, v, starts=2, n_prompts=16, max_tokens=24, ctx=2048)
        diff[k] = repro.differing(starts)[0]
    assert diff["tq3_0"] <= diff["f16"] + 1, diff


def test_first_ubatch_size_does_not_matter(smollm2: Path, alice: Path, tmp_path: Path) -> None:
    # the calibration no longer comes from the first ubatch: -ub 64 and -ub 512 score alike
    base = quality.base_logits(smollm2, alice, 512, 2, tmp_path)
    prof = profile.default_path(smollm2)
    cfg = quality.Config.parse("tq3_0/tq2_0")
    kld = {ub: quality.score(smollm2, base, cfg, tmp_path, 512, prof, ("-ub", str(ub))).kld_mean for ub in (64, 512)}
    assert abs(kld[64] - kld[512]) <= 0.05 * kld[512], kld


def test_slot_files_follow_the_calibration(smollm2: Path, tmp_path: Path) -> None:
    # a slot saved under the model's profile restores on the next start with the same profile and
    # answers as before; a server calibrated otherwise refuses the file and keeps answering as it did
    question = "What is the capital of France?"
    args = [*runner.cache_args("tq3_0", "tq2_0"), "--parallel", "1", "-t", "2", "--slot-save-path", str(tmp_path)]

    def slot(srv: runner.Server, action: str) -> requests.Response:
        return requests.post(f"{srv.url}/slots/0?action={action}", json={"filename": "slot0.bin"}, timeout=120)

    with runner.Server(smollm2, args) as srv:
        want = srv.chat(question)
        r = slot(srv, "save")
        assert r.status_code == 200 and r.json()["n_saved"] > 0, r.text
    with runner.Server(smollm2, args) as srv:
        r = slot(srv, "restore")
        assert r.status_code == 200 and r.json()["n_restored"] > 0, r.text
        assert srv.chat(question) == want
    with runner.Server(smollm2, [*args, "--kv-profile", "none"]) as srv:
        before = srv.chat(question)
        r = slot(srv, "restore")
        # the answer carries the reason llama.cpp logged, not only a generic message (patches/0019)
        assert r.status_code == 400 and "Unable to restore slot: " in r.text, r.text
        assert "saved under another TurboQuant calibration" in r.json()["error"]["message"], r.text
        assert srv.chat(question) == before
    assert "saved under another TurboQuant calibration" in srv.log, srv.log[-3000:]
    # the same calibration, other cache types: refused for the type, and the answer says so
    tq4 = [*runner.cache_args("tq4_0", "tq4_0"), "--parallel", "1", "-t", "2", "--slot-save-path", str(tmp_path)]
    with runner.Server(smollm2, tq4) as srv:
        r = slot(srv, "restore")
        assert r.status_code == 400 and "mismatched key type" in r.json()["error"]["message"], r.text
    # an f16 cache: refused because the keys are TurboQuant's (the state's stream count is tagged)
    f16 = [*runner.cache_args("f16", "f16"), "--parallel", "1", "-t", "2", "--slot-save-path", str(tmp_path)]
    with runner.Server(smollm2, f16) as srv:
        r = slot(srv, "restore")
        assert r.status_code == 400 and "saved with a TurboQuant key cache and this cache is not one" in r.text, r.text
