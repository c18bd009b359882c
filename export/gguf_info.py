"""Read a GGUF file's header: metadata and tensor types (not the tensor data).

A small reader of the published format (magic, version, key/value metadata, tensor
infos). Kept rather than ``gguf.GGUFReader`` (gguf-py), which reads the same fields
(tests/test_libs_gguf.py checks that they agree) but:

- takes about 50 times as long: it builds numpy views for every string of the vocabulary
  (about 20 s for Gemma's 262,144 tokens, against 0.4 s here), and ``macft chat --gguf``
  and export read a GGUF's header several times;
- raises on a tensor type its table does not know: PyPI gguf 0.19.0 lacks ``Q2_0`` (42),
  which the pinned llama.cpp writes; here an unknown type is kept as a number;
- is only a test dependency of macft, and the export needs no llama.cpp code in-process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from macft.errors import MacftError

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def type(self) -> str:
        return GGML_TYPES.get(self.type_id, f"type{self.type_id}")


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def tokens(self) -> list[str]:
        return self.metadata.get("tokenizer.ggml.tokens") or []

    @property
    def token_types(self) -> list[int]:
        return self.metadata.get("tokenizer.ggml.token_type") or []

    @property
    def add_bos(self) -> bool:
        return bool(self.metadata.get("tokenizer.ggml.add_bos_token", False))

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def token_type_of(self, text: str) -> int | None:
        try:
            i = self.tokens.index(text)
        except ValueError:
            return None
        types = self.token_types
        return types[i] if i < len(types) else None


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        (etype,) = struct.unpack("<I", f.read(4))
        (count,) = struct.unpack("<Q", f.read(8))
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            size = struct.calcsize(fmt)
            raw = f.read(size * count)
            return list(struct.unpack("<" + fmt[1] * count, raw)) if count else []
        return [_value(f, etype) for _ in range(count)]
    raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf(path: Path) -> GGUFInfo:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            (version,) = struct.unpack("<I", f.read(4))
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
            info = GGUFInfo(path, version)
            for _ in range(n_kv):
                key = _string(f)
                (vtype,) = struct.unpack("<I", f.read(4))
                info.metadata[key] = _value(f, vtype)
            for _ in range(n_tensors):
                name = _string(f)
                (n_dims,) = struct.unpack("<I", f.read(4))
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                (type_id,) = struct.unpack("<I", f.read(4))
                f.read(8)  # data offset
                info.tensors.append(GGUFTensor(name, tuple(dims), type_id))
    except (OSError, ValueError, struct.error) as e:
        raise MacftError(f"{path} is not a readable GGUF file: {e}") from None
    return info
