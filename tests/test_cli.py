"""The command line as a user meets it: a light core, their own model and text, one-line errors,
and a normal (non-editable) install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from tqkv import assets, build, cli, profile, runner, types
from tqkv.ggml_lib import Ggml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "triton", "scipy", "matplotlib")


def _python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Python code in a fresh interpreter where importing torch, triton, scipy or matplotlib fails,
    as in a core install without the extras."""
    block = "import sys\nfor m in %r: sys.modules[m] = None\n" % (HEAVY,)
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def _tqkv(*args: str) -> subprocess.CompletedProcess:
    return _python(f"from tqkv.cli import main\nsys.exit(main({list(args)!r}))")


def test_core_commands_need_no_extras(bin_dir: Path) -> None:
    r = _tqkv("--help")
    assert r.returncode == 0 and "calibrate" in r.stdout, r.stderr
    for sub in ("build", "demo", "ppl", "niah", "calibrate"):
        r = _tqkv(sub, "--help")
        assert r.returncode == 0, r.stderr
    r = _tqkv("bin")
    assert r.returncode == 0 and Path(r.stdout.strip()) == bin_dir, r.stderr
    r = _python("import tqkv.types as tq, tqkv.quality, tqkv.niah, tqkv.demo, tqkv.profile\nprint(tq.TQ3_0)")
    assert r.returncode == 0 and r.stdout.strip() == str(types.TQ3_0), r.stderr


def test_a_missing_extra_is_named(tmp_path: Path) -> None:
    r = _tqkv("paper")
    assert r.returncode == 1
    assert r.stderr.strip() == "tqkv paper: error: needs torch: pip install 'tqkv[reference]'"


def test_type_ids_have_one_source(bin_dir: Path) -> None:
    # tqkv.types reads them from patches/0001's ggml.h enum; the built ggml and the patched
    # llama-cpp-python must agree with it
    ggml = Ggml(bin_dir)
    assert [ggml.type_name(t) for t in (types.TQ2_0, types.TQ3_0, types.TQ4_0)] == ["turbo2_0", "turbo3_0", "turbo4_0"]
    assert (llama_cpp.GGML_TYPE_TURBO2_0, llama_cpp.GGML_TYPE_TURBO3_0, llama_cpp.GGML_TYPE_TURBO4_0) == (
        types.TQ2_0, types.TQ3_0, types.TQ4_0)


@pytest.mark.parametrize("args,message", [
    (["ppl", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such model file (or built-in model: smollm2, gemma3)"),
    (["ppl", "README.md"], "README.md: not a GGUF file"),
    (["demo", "smollm2", "--text", "/nonexistent.txt"], "/nonexistent.txt: no such text file"),
    (["ppl", "smollm2", "--configs", "tq4_0/tq9_0"], "unknown KV cache type 'tq9_0'"),
    (["calibrate", "smollm2", "--text", "tests/data/not-utf8.bin"], "not-utf8.bin: not UTF-8 text"),
    (["niah", "smollm2", "--cuda", "--configs", "f16/f16", "--lengths", "512"], "tqkv niah: error: no "),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "tests" / "data"
    data.mkdir(parents=True)
    (data / "not-utf8.bin").write_bytes(b"GGUF\xff\xfe\x00binary")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    r = subprocess.run([sys.executable, "-m", "tqkv", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_server_that_never_gets_healthy_is_one_line_with_its_log(bin_dir: Path, tmp_path: Path) -> None:
    # a model file that never delivers its bytes (a FIFO nobody writes): the server starts, logs, and waits
    model = tmp_path / "stuck.gguf"
    os.mkfifo(model)
    with pytest.raises(TimeoutError) as e:
        with runner.Server(model, [], startup_s=3.0):
            pass
    line = cli._one_line("niah", e.value)
    assert line.startswith("llama-server not healthy after 3.0 s (details: ") and "\n" not in line, line
    log = Path(line.split("details: ")[1].rstrip(")")).read_text()
    assert log.startswith("llama-server not healthy") and "stuck.gguf" in log


def test_a_failed_build_step_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError) as e:
        build._run(["cmake", "--build", "/nonexistent/build/dir"])
    assert cli._one_line("build", e.value) == "build step failed: cmake --build /nonexistent/build/dir ... (its output is above)"


def test_own_model_and_text(bin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a user's model (here a copy of SmolLM2 under another name, in a folder of its own) and a UTF-8 text
    # of their own: calibrated beside the model on first use, scored, reported under their names
    model = tmp_path / "models" / "my-model.gguf"
    model.parent.mkdir()
    shutil.copy(assets.model("smollm2"), model)
    text = tmp_path / "notes.txt"
    text.write_text("Café notes — “quoted”, naïve.\n\n" + assets.text("plrabn12").read_text()[:20000], encoding="utf-8")
    out = tmp_path / "out"
    args = ["ppl", str(model), "--text", str(text), "--ctx", "256", "--chunks", "2", "--configs", "tq4_0/tq4_0",
            "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "| tq4_0/tq4_0 | 4.25 |" in captured.out
    assert "tqkv ppl: 100%" in captured.err  # the progress bar
    assert profile.read(model.with_name("my-model.tqkv.gguf")).fingerprint == profile.fingerprint(model)
    report = json.loads((out / "my-model-notes-c256.json").read_text())
    assert [r["config"] for r in report] == ["tq4_0/tq4_0"] and report[0]["kld_mean"] > 0


def test_installed_package_builds_from_its_own_copy(tmp_path: Path) -> None:
    # a normal install (a wheel, not the checkout) carries patches/, tq_ggml/ and codebooks/, and puts
    # its build and results in the user's folders, not beside the package
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                        "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    src = target / "tqkv" / "_src"
    assert sorted(p.name for p in (src / "patches").glob("*.patch")) == sorted(
        p.name for p in (REPO / "patches").glob("*.patch"))
    assert (src / "tq_ggml" / "tq-common.h").read_bytes() == (REPO / "tq_ggml" / "tq-common.h").read_bytes()
    code = ("from tqkv import build, sources, types\n"
            "print(sources.root(), sources.checkout(), build.Layout().root, types.TQ2_0, sep='\\n')")
    r = _python(code, env={"PYTHONPATH": str(target), "TQKV_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    root, checkout, build_root, tq2 = r.stdout.split()
    assert (root, checkout, build_root, tq2) == (str(src), "None", str(tmp_path / "cache" / "build"), str(types.TQ2_0))
