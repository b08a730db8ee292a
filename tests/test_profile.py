"""Calibration profiles (tqkv calibrate): the model fingerprint, the profile GGUF and its statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tqkv import assets, capture, cli, profile

SIZE = 1_000_000


def _sampled(size: int) -> list[range]:
    """The byte ranges the fingerprint reads, per its spec: the first 64 KiB and 64 blocks of 4 KiB."""
    return [range(0, 65536)] + [range(o, o + 4096) for o in ((size - 4096) * i // 63 for i in range(64))]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, SIZE, np.uint8).tobytes())
    return path


def test_fingerprint_is_16_hex_digits_and_deterministic(blob: Path) -> None:
    fp = profile.fingerprint(blob)
    assert len(fp) == 16 and int(fp, 16) >= 0 and fp == fp.lower()
    assert profile.fingerprint(blob) == fp


@pytest.mark.parametrize("offset", [0, 65535, (SIZE - 4096) * 17 // 63 + 4095, SIZE - 1])
def test_fingerprint_sees_a_byte_in_the_sampled_ranges(blob: Path, offset: int) -> None:
    before = profile.fingerprint(blob)
    _flip(blob, offset)
    assert profile.fingerprint(blob) != before


def test_fingerprint_ignores_a_byte_between_the_sampled_ranges(blob: Path) -> None:
    offset = (SIZE - 4096) * 20 // 63 + 4096 + 100
    assert not any(offset in r for r in _sampled(SIZE))
    before = profile.fingerprint(blob)
    _flip(blob, offset)
    assert profile.fingerprint(blob) == before


def test_fingerprint_sees_the_size(blob: Path) -> None:
    before = profile.fingerprint(blob)
    with blob.open("ab") as f:
        f.write(b"\0")
    assert profile.fingerprint(blob) != before


def test_fingerprint_of_a_small_file_reads_it_all(tmp_path: Path) -> None:
    path = tmp_path / "small.gguf"
    path.write_bytes(bytes(1000))
    before = profile.fingerprint(path)
    _flip(path, 999)
    assert profile.fingerprint(path) != before


def test_default_path_is_beside_the_model() -> None:
    assert profile.default_path(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == Path(
        "/m/SmolLM2-135M-Instruct.Q4_1.tqkv.gguf")


@pytest.fixture(scope="module")
def lcet10() -> Path:
    return assets.text("lcet10")


@pytest.fixture(scope="module")
def smollm2_profile(tmp_path_factory: pytest.TempPathFactory, lcet10: Path) -> tuple[Path, profile.Profile]:
    model = assets.model("smollm2")
    out = profile.calibrate(model, [lcet10], n_ctx=128, n_chunks=2, out=tmp_path_factory.mktemp("p") / "p.gguf")
    return model, profile.read(out)


def test_profile_metadata(smollm2_profile: tuple[Path, profile.Profile], lcet10: Path) -> None:
    model, p = smollm2_profile
    assert p.version == 1
    assert p.fingerprint == profile.fingerprint(model)
    assert (p.architecture, p.n_layer, p.model_file) == ("llama", 30, model.name)
    assert p.model_name  # SmolLM2's GGUF has a general.name
    assert (p.text_names, p.n_tokens, p.n_ctx) == ("lcet10.txt", 256, 128)
    assert p.text_sha256 == "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f"  # lcet10's pin
    assert p.tool_version not in ("", "unknown")
    assert (p.k_scale_exponent, p.k_scale_eps) == (0.125, np.float32(0.01))


def test_profile_tensors(smollm2_profile: tuple[Path, profile.Profile]) -> None:
    _, p = smollm2_profile
    assert sorted(p.layers) == list(range(30))
    for k_mean, k_scale in p.layers.values():
        assert k_mean.shape == k_scale.shape == (3, 64)
        assert k_mean.dtype == k_scale.dtype == np.float32
        assert np.all(k_scale > 0)
        np.testing.assert_allclose(np.sqrt(np.mean(k_scale.astype(np.float64) ** 2, axis=1)), 1.0, rtol=1e-6)


def test_profile_matches_captured_keys_and_queries(tmp_path: Path, lcet10: Path) -> None:
    # one chunk is the text's first 128 tokens, which capture() runs too (given the bytes: read_text
    # would turn lcet10's CRLF line ends into LF)
    model = assets.model("smollm2")
    p = profile.read(profile.calibrate(model, [lcet10], n_ctx=128, n_chunks=1, out=tmp_path / "p.gguf"))
    layers = capture.capture(model, lcet10.read_bytes().decode(), 128)
    assert [c.layer for c in layers] == sorted(p.layers)
    for c in layers:
        k_mean, k_scale = p.layers[c.layer]
        c = c.as_torch()
        k, q = c.k.double(), c.q.double()
        np.testing.assert_allclose(k_mean, k.mean(0).numpy(), atol=1e-4)
        # the scale from its definition: query head j reads KV head j // g
        g = q.shape[1] // k.shape[1]
        k2 = k.var(0, unbiased=False)
        q2 = torch.stack([q[:, h * g:(h + 1) * g].pow(2).mean((0, 1)) for h in range(k.shape[1])])
        k2 = k2 + 0.01 * k2.mean(1, keepdim=True)
        q2 = q2 + 0.01 * q2.mean(1, keepdim=True)
        a = (q2 / k2) ** 0.125
        a = a / a.pow(2).mean(1, keepdim=True).sqrt()
        np.testing.assert_allclose(k_scale, a.numpy(), rtol=1e-5)


def test_read_refuses_a_model(smollm2: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a tqkv profile"):
        profile.read(smollm2)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        profile.read(junk)


def test_cli_writes_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.tqkv.gguf"
    assert cli.main(["calibrate", "smollm2", "--text", "alice29", "--ctx", "64", "--chunks", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and profile.fingerprint(assets.model("smollm2")) in printed
    assert "64 tokens" in printed
    assert profile.read(out).text_names == "alice29.txt"


def test_cli_refuses_a_short_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short to calibrate anything.")
    out = tmp_path / "s.tqkv.gguf"
    assert cli.main(["calibrate", "smollm2", "--text", str(text), "--ctx", "64", "-o", str(out)]) == 1
    assert "tqkv calibrate: error: the texts have" in capsys.readouterr().err
    assert not out.exists()
