"""Random-weight llama GGUFs of a chosen shape: for shapes no pinned model has (odd head sizes
in misuse tests, an 8B shape for speed runs). Their text is noise; only shapes and speed count."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_llama(path: Path, n_layer: int = 2, n_embd: int = 256, n_head: int = 4, n_head_kv: int = 2,
                head_dim: int | None = None, n_ff: int = 512, n_vocab: int = 512, seed: int = 0,
                q4_0: bool = False, qk_scale: float = 0.02) -> Path:
    """q4_0: random Q4_0 blocks (scale 0.02, random nibbles) instead of f32, for 8B-sized speed runs.
    qk_scale: the Q4_0 scale of the query and key projections. At 0.02 an 8B shape's attention scores
    have a standard deviation near 35, so softmax is one-hot; a kernel that skips value rows of
    negligible weight then reads almost none of V and runs faster than on a real model. 0.004 gives
    scores of standard deviation near 1.4: attention spread over many positions, as in real models."""
    head_dim = head_dim or n_embd // n_head
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if q4_0 else gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(name: str, rows: int, cols: int, scale: float = 0.02) -> None:
        if q4_0:
            blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
            blocks[:, :, 0:2] = np.full(1, scale, dtype=np.float16).view(np.uint8)
            w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(name, (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", n_vocab, n_embd)
    ones("output_norm.weight", n_embd)
    mat("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * head_dim, n_embd, qk_scale)
        mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd, qk_scale)
        mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        mat(p + "attn_output.weight", n_embd, n_head * head_dim)
        ones(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd)
        mat(p + "ffn_up.weight", n_ff, n_embd)
        mat(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
