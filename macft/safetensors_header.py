"""The header of a safetensors file: what each tensor is and where its bytes are.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header, plus an optional ``__metadata__`` of strings), then the raw little-endian data.

Every reader in macft goes through :func:`read_header`: the integrity check of a base
(:mod:`macft.models`), the parameter count (:mod:`macft.sizing.shapes`), the base
fingerprint (:mod:`macft.fingerprint`), the streaming merge (:mod:`export.safetensors_io`).

Why not ``safetensors.safe_open``: it gives names, dtypes, shapes and the metadata, but not
where a tensor's bytes start, which the merge needs to stream rows and the fingerprint to
read a tensor's first elements; its numpy framework cannot read bf16; and it reports every
damaged file as "incomplete metadata, file not fully covered", where the check below says
how many bytes are missing. Light on purpose: the standard library only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
            "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1, "C64": 8}
SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")  # packed below one byte per element: no byte count to check


class BrokenFile(Exception):
    """A safetensors file is not what the format says; the message completes "<file> is
    damaged: ..." (callers add the file and the fix)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    length: int  # bytes of the JSON header (after the 8-byte length field)
    tensors: dict[str, TensorInfo]  # in the header's order
    metadata: dict[str, str]

    @property
    def file_size(self) -> int:
        """What the file's size must be: the length field, the header and every tensor's data."""
        return max((t.end for t in self.tensors.values()), default=8 + self.length)

    def check_byte_counts(self) -> None:
        """Each tensor's dtype known and its byte count what its dtype and shape need;
        else :class:`BrokenFile`."""
        for t in self.tensors.values():
            if t.dtype not in ITEMSIZE:
                raise BrokenFile(f"its header gives {t.name!r} the unknown dtype {t.dtype!r}")
            need = t.numel * ITEMSIZE[t.dtype]
            if t.dtype not in SUB_BYTE and t.nbytes != need:
                raise BrokenFile(f"its header gives {t.name!r} {t.nbytes} bytes, but {t.dtype} {list(t.shape)} "
                                 f"needs {need}")


def read_header(path: Path) -> Header:
    """The header of the safetensors file ``path``, with each entry's shape and offsets
    checked. Raises :class:`BrokenFile` when the header cannot be what the format says,
    OSError when the file cannot be read (callers word both)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise BrokenFile(f"it holds {size} bytes, not even the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise BrokenFile(f"its header length field says {n} bytes but the file holds {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BrokenFile("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BrokenFile("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], h["shape"], h["data_offsets"]
            if not (isinstance(dtype, str) and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e):
                raise ValueError
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise BrokenFile(f"its header entry for {name!r} is malformed") from None
        tensors[name] = TensorInfo(name, dtype, tuple(shape), base + b, base + e)
    return Header(path, n, tensors, metadata if isinstance(metadata, dict) else {})
