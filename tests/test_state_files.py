"""Corrupted and truncated state and slot files of a TurboQuant cache (tq3_0 keys, tq2_0 values,
flash attention) on SmolLM2: every entry point refuses a damaged header, cell list or layer
header, and a truncation anywhere, with an error and no crash, and the cache keeps what it held
(patches 0021-0023), so the next greedy tokens read from it are the ones before the refusal.
Bytes inside the K/V rows carry no checksum: such a state loads, and decodes to finite logits."""

from __future__ import annotations

import copy
import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import requests

from tqkv import runner, types

TQ_STATE_TAG = 1 << 31  # the stream count's top bit: a TurboQuant key cache, its calibration id follows
N_CONT = 8               # greedy tokens that stand for what the cache holds


@dataclass(frozen=True)
class Layout:
    """Offsets of one stream's parts in a saved cache (llama_kv_cache::state_write)."""

    n_stream: int    # the tagged stream count
    calib_id: int    # the TurboQuant calibration id (u64)
    cell_count: int
    meta: int        # the first cell: pos (i32), n_seq_id (u32), seq ids (i32 each)
    meta_end: int
    k_type: int      # layer 0's key type (i32), then its row size (u64), then its rows
    k_rows: int
    v_type: int      # layer 0's value type
    v_rows: int
    end: int


def layout(buf: bytes, kv: int) -> Layout:
    """Walk a saved cache of one stream that starts at offset kv (SmolLM2: no per-cell extension)."""
    n_stream, = struct.unpack_from("<I", buf, kv)
    assert n_stream == TQ_STATE_TAG | 1, hex(n_stream)
    cells = kv + 12
    n_cells, = struct.unpack_from("<I", buf, cells)
    o = meta = cells + 4
    for _ in range(n_cells):
        n_seq, = struct.unpack_from("<I", buf, o + 4)
        o += 8 + 4 * n_seq
    meta_end = o
    v_trans, n_layer = struct.unpack_from("<II", buf, o)
    assert v_trans == 0, "flash attention keeps V untransposed"
    o += 8

    def layers(o: int) -> tuple[int, int]:
        first = o
        for _ in range(n_layer):
            row, = struct.unpack_from("<Q", buf, o + 4)
            o += 12 + n_cells * row
        return first, o

    k_type, o = layers(o)
    v_type, end = layers(o)
    assert end == len(buf), (end, len(buf))
    return Layout(kv, kv + 4, cells, meta, meta_end, k_type, k_type + 12, v_type, v_type + 12, end)


def flip(buf: bytes, at: int, mask: int = 0x80) -> bytes:
    b = bytearray(buf)
    b[at] ^= mask
    return bytes(b)


def refused_cases(buf: bytes, kv: int, whole: bool) -> dict[str, bytes]:
    """Damage that must be refused: truncations in every part, flipped structure fields."""
    at = layout(buf, kv)
    cases = {
        "cut in the stream header": buf[:at.n_stream + 2],
        "cut in the cell list": buf[:(at.meta + at.meta_end) // 2],
        "cut in layer 0's key rows": buf[:at.k_rows + 40],
        "cut half way": buf[:len(buf) // 2],
        "cut in the last value row": buf[:-1],
        "stream count": flip(buf, at.n_stream, 0x02),
        "TurboQuant tag": flip(buf, at.n_stream + 3),
        "calibration id": flip(buf, at.calib_id + 5, 0x01),
        "cell count": flip(buf, at.cell_count + 3),
        "a cell's sequence count": flip(buf, at.meta + 4, 0x02),
        "layer 0's key type": flip(buf, at.k_type, 0x01),
        "layer 0's key row size": flip(buf, at.k_type + 4, 0x01),
        "layer 0's value type": flip(buf, at.v_type, 0x01),
    }
    if whole:  # a sequence restore puts every cell in the target sequence and ignores the saved id
        cases["a cell's sequence id"] = flip(buf, at.meta + 8, 0x04)
    return cases


def payload_cases(buf: bytes, kv: int) -> dict[str, bytes]:
    """Damage no structure check can see: a key block's fp16 scale (its sign, and doubled or
    halved), a value block's indices, a cell's position."""
    at = layout(buf, kv)
    return {
        "key block scale": flip(buf, at.k_rows + 1, 0x84),
        "value block indices": flip(buf, at.v_rows + 5, 0xff),
        "a cell's position": flip(buf, at.meta + 3 * 12, 0x01),
    }


def _llama(model: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model), n_ctx=512, flash_attn=True, type_k=types.TQ3_0,
                           type_v=types.TQ2_0, verbose=False, seed=1)


def continuation(llm: llama_cpp.Llama) -> list[int]:
    """The greedy tokens after a fixed probe token, attending to the cached prompt (which is not
    evaluated again); the cache holds the prompt again afterwards."""
    n0 = llm.n_tokens
    tok, out = llm.tokenize(b" The", add_bos=False)[0], []
    for _ in range(N_CONT):
        llm.eval([tok])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        assert np.isfinite(logits).all()
        tok = int(np.argmax(logits))
        out.append(tok)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, n0, -1)
    llm.n_tokens = n0
    return out


@pytest.fixture
def primed(smollm2: Path, alice: Path) -> tuple[llama_cpp.Llama, list[int]]:
    """A context holding 120 tokens of alice29, and the greedy continuation it gives."""
    llm = _llama(smollm2)
    llm.eval(llm.tokenize(alice.read_bytes()[:2000])[:120])
    return llm, continuation(llm)


def _check_refusals(llm: llama_cpp.Llama, want: list[int], cases: dict[str, bytes],
                    load: Callable[[bytes], bool]) -> None:
    n0 = llm.n_tokens
    accepted = [name for name, bad in cases.items() if load(bad)]
    assert not accepted, f"damaged states accepted: {accepted}"
    assert llm.n_tokens == n0
    assert continuation(llm) == want, "a refused state changed what the cache holds"


def test_load_state_refuses_damage(primed) -> None:
    # Llama.save_state / load_state (llama_state_get_data / llama_state_set_data: the whole context)
    llm, want = primed
    state = llm.save_state()
    arch_len, = struct.unpack_from("<I", state.llama_state, 0)
    kv = 4 + arch_len
    cases = {"model architecture name": flip(state.llama_state, 4, 0x01),
             **refused_cases(state.llama_state, kv, whole=True)}

    def load(bad: bytes) -> bool:
        damaged = copy.copy(state)
        damaged.llama_state, damaged.llama_state_size = bad, len(bad)
        try:
            llm.load_state(damaged)
        except RuntimeError:
            return False
        return True

    _check_refusals(llm, want, cases, load)


def _seq_state(llm: llama_cpp.Llama) -> bytes:
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0) == size
    return bytes(buf)


def _set_seq(llm: llama_cpp.Llama, data: bytes) -> int:
    return llama_cpp.llama_state_seq_set_data(llm.ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data),
                                              len(data), 0)


def test_seq_data_refuses_damage(primed) -> None:
    # llama_state_seq_get_data / llama_state_seq_set_data (one sequence, in memory)
    llm, want = primed
    good = _seq_state(llm)
    cases = {"sequence state magic": flip(good, 0, 0x01), **refused_cases(good, 8, whole=False)}
    _check_refusals(llm, want, cases, lambda bad: _set_seq(llm, bad) == len(bad))


def _tokens(llm: llama_cpp.Llama) -> ctypes.Array:
    return (llama_cpp.llama_token * llm.n_tokens)(*llm.input_ids[:llm.n_tokens])


def test_session_file_refuses_damage(primed, tmp_path: Path) -> None:
    # llama_state_save_file / llama_state_load_file (the whole context with its prompt tokens)
    llm, want = primed
    path = tmp_path / "session.bin"
    assert llama_cpp.llama_state_save_file(llm.ctx, str(path).encode(), _tokens(llm), llm.n_tokens)
    good = path.read_bytes()
    arch = 12 + 4 * llm.n_tokens
    arch_len, = struct.unpack_from("<I", good, arch)
    cases = {"session magic": flip(good, 0, 0x01), "token count": flip(good, 11),
             "cut in the tokens": good[:20], **refused_cases(good, arch + 4 + arch_len, whole=True)}
    out = (llama_cpp.llama_token * 512)()
    n_out = ctypes.c_size_t()

    def load(bad: bytes) -> bool:
        path.write_bytes(bad)
        return llama_cpp.llama_state_load_file(llm.ctx, str(path).encode(), out, 512, ctypes.byref(n_out))

    _check_refusals(llm, want, cases, load)


def test_seq_file_refuses_damage(primed, tmp_path: Path) -> None:
    # llama_state_seq_save_file / llama_state_seq_load_file (the format of llama-server's slot files)
    llm, want = primed
    path = tmp_path / "seq.bin"
    assert llama_cpp.llama_state_seq_save_file(llm.ctx, str(path).encode(), 0, _tokens(llm), llm.n_tokens)
    good = path.read_bytes()
    cases = {"sequence file magic": flip(good, 0, 0x01), "token count": flip(good, 11),
             "cut in the tokens": good[:20], **refused_cases(good, 12 + 4 * llm.n_tokens, whole=False)}
    out = (llama_cpp.llama_token * 512)()
    n_out = ctypes.c_size_t()

    def load(bad: bytes) -> bool:
        path.write_bytes(bad)
        return llama_cpp.llama_state_seq_load_file(llm.ctx, str(path).encode(), 0, out, 512, ctypes.byref(n_out)) != 0

    _check_refusals(llm, want, cases, load)


def test_payload_damage_loads_and_stays_finite(primed) -> None:
    # no checksum: a flipped byte inside the rows (or a cell's position) is a valid state; it
    # decodes to finite logits (continuation() asserts them), and the good state then reads back
    llm, want = primed
    good = _seq_state(llm)
    for name, bad in payload_cases(good, 8).items():
        assert _set_seq(llm, bad) == len(bad), name
        continuation(llm)
    assert _set_seq(llm, good) == len(good)
    assert continuation(llm) == want


def test_server_refuses_damaged_slot_files(smollm2: Path, tmp_path: Path) -> None:
    # llama-server's slot restore: every damaged file gets HTTP 400 with llama.cpp's reason, the
    # server stays up, and the slot keeps its cache: the next identical request evaluates one
    # prompt token, not the whole prompt again, and answers as before
    question = "What is the capital of France? Answer in one sentence."
    args = [*runner.cache_args("tq3_0", "tq2_0"), "--parallel", "1", "-t", "2", "--slot-save-path", str(tmp_path)]
    with runner.Server(smollm2, args) as srv:
        def chat() -> tuple[str, int]:
            r = requests.post(srv.url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0.0})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"], r.json()["timings"]["prompt_n"]

        def restore(name: str) -> requests.Response:
            return requests.post(f"{srv.url}/slots/0?action=restore", json={"filename": name}, timeout=120)

        want, n_prompt = chat()
        assert n_prompt > 10
        r = requests.post(f"{srv.url}/slots/0?action=save", json={"filename": "good.bin"}, timeout=120)
        assert r.status_code == 200, r.text
        good = (tmp_path / "good.bin").read_bytes()
        n_tok, = struct.unpack_from("<I", good, 8)
        cases = {"slot file magic": flip(good, 0, 0x01), "token count": flip(good, 11),
                 **refused_cases(good, 12 + 4 * n_tok, whole=False)}
        for i, (name, bad) in enumerate(cases.items()):
            (tmp_path / f"bad{i}.bin").write_bytes(bad)
            r = restore(f"bad{i}.bin")
            assert r.status_code == 400, (name, r.text)
            reason = r.json()["error"]["message"].removeprefix("Unable to restore slot: ")
            assert reason and reason != r.json()["error"]["message"], (name, r.text)
            assert chat() == (want, 1), name
        for i, (name, bad) in enumerate(payload_cases(good, 12 + 4 * n_tok).items()):
            (tmp_path / f"payload{i}.bin").write_bytes(bad)
            assert restore(f"payload{i}.bin").status_code == 200, name
            chat()  # an answer, whatever the damaged keys make of it
        assert restore("good.bin").status_code == 200
        assert chat() == (want, 1)
