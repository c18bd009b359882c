"""export.gguf_info against gguf-py's GGUFReader: the same metadata and tensor infos.

macft keeps its own small GGUF header reader (export/gguf_info.py says why: speed, and
tensor types newer than PyPI's gguf); this checks that it reads what the library reads."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from export.gguf_info import TOKEN_CONTROL, TOKEN_NORMAL, read_gguf
from macft.errors import MacftError

gguf = pytest.importorskip("gguf")

TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "▁nya", "にゃ", "<0x0A>", ""]
TEMPLATE = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"


def _write(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_token_list(TOKENS)
    w.add_token_types([TOKEN_CONTROL] * 5 + [TOKEN_NORMAL] * 4)
    w.add_token_scores([float(-i) for i in range(len(TOKENS))])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_int64("test.int64", -(2 ** 40))
    w.add_array("test.ints", [3, -1, 7])
    w.add_array("test.bools", [True, False])
    w.add_array("test.strings", ["a", "ü", ""])
    w.add_tensor("token_embd.weight", np.ones((len(TOKENS), 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_reads_as_gguf_py_reads_it(tmp_path):
    path = _write(tmp_path / "tiny.gguf")
    ours = read_gguf(path)
    r = gguf.GGUFReader(str(path))
    theirs = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == theirs  # floats too: both widen the same float32 bits
    assert [(t.name, t.shape, t.type_id) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in r.tensors]
    assert [t.type for t in ours.tensors] == [t.tensor_type.name for t in r.tensors]
    # what the chat and the export read from it
    assert ours.architecture == "gemma3" and ours.tokens == TOKENS and ours.add_bos
    assert ours.metadata["tokenizer.chat_template"] == TEMPLATE
    assert ours.metadata["tokenizer.ggml.eos_token_id"] == 1
    assert ours.token_type_of("<end_of_turn>") == TOKEN_CONTROL


def _gguf_bytes(type_id: int) -> bytes:
    """A GGUF v3 header with no metadata and one tensor of the given type."""
    name = b"blk.0.attn_q.weight"
    return (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
            + struct.pack("<I", 2) + struct.pack("<2Q", 64, 4) + struct.pack("<I", type_id) + struct.pack("<Q", 0))


def test_a_tensor_type_newer_than_the_table_is_kept_as_a_number(tmp_path):
    p = tmp_path / "new-type.gguf"
    p.write_bytes(_gguf_bytes(977))
    info = read_gguf(p)
    assert [(t.name, t.shape, t.type) for t in info.tensors] == [("blk.0.attn_q.weight", (64, 4), "type977")]
    assert info.type_counts() == {"type977": 1}


def test_not_a_gguf_is_our_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00")
    with pytest.raises(MacftError, match="not a readable GGUF"):
        read_gguf(p)
