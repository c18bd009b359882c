"""Read and write safetensors files one tensor (or one block of rows) at a time, with numpy.

The header is read by :mod:`macft.safetensors_header` (names, dtypes, shapes and where
each tensor's bytes are). Handling the data directly (rather than through
``safetensors.numpy``) lets the merge stream rows without loading a whole file, and read
bf16 without torch: numpy has no bfloat16 (nor does ``safe_open(framework="numpy")``), so
bf16 is widened to fp32 bit-exactly and narrowed back with round-to-nearest-even, as torch does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from macft.errors import MacftError
from macft.safetensors_header import BrokenFile, TensorInfo, read_header

__all__ = ["FLOAT_DTYPES", "SafetensorsFile", "SafetensorsWriter", "TensorInfo", "from_f32", "to_f32"]

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
COPY_CHUNK = 16 << 20


class SafetensorsFile:
    """The header of one safetensors file, and reads of its tensors by offset."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            header = read_header(self.path)
        except (OSError, BrokenFile) as e:
            raise MacftError(f"{self.path} is not a readable safetensors file: {e}",
                             "Check that the file is complete (re-download the model if needed).") from None
        self.metadata: dict[str, str] = header.metadata
        self.tensors: dict[str, TensorInfo] = header.tensors

    def ordered(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)

    def read_raw(self, t: TensorInfo, start: int = 0, length: int | None = None) -> bytes:
        length = t.nbytes - start if length is None else length
        with open(self.path, "rb") as f:
            f.seek(t.begin + start)
            data = f.read(length)
        if len(data) != length:
            raise MacftError(f"{self.path} is truncated (tensor {t.name}).",
                             "Re-download or re-create the model files.")
        return data

    def read_f32(self, t: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows r0:r1 of its first dimension) widened to fp32."""
        if t.dtype not in FLOAT_DTYPES:
            raise MacftError(f"{self.path}: tensor {t.name} has dtype {t.dtype}; only float tensors "
                             "can be merged or dequantized.")
        shape = t.shape
        start, length = 0, t.nbytes
        if rows is not None:
            r0, r1 = rows
            row_bytes = t.nbytes // shape[0]
            start, length = r0 * row_bytes, (r1 - r0) * row_bytes
            shape = (r1 - r0, *shape[1:])
        return to_f32(self.read_raw(t, start, length), t.dtype).reshape(shape)

    def copy_raw(self, t: TensorInfo, out: BinaryIO) -> None:
        with open(self.path, "rb") as f:
            f.seek(t.begin)
            left = t.nbytes
            while left:
                block = f.read(min(COPY_CHUNK, left))
                if not block:
                    raise MacftError(f"{self.path} is truncated (tensor {t.name}).")
                out.write(block)
                left -= len(block)


def to_f32(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8").astype(np.float32)
    raise ValueError(f"not a float dtype: {dtype}")


def from_f32(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4", copy=False).tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "F64":
        return x.astype("<f8").tobytes()
    if dtype == "BF16":
        u = x.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            rounded[nan] = np.uint16(0x7FC0)
        return rounded.astype("<u2", copy=False).tobytes()
    raise ValueError(f"not a float dtype: {dtype}")


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, tensor after tensor.

    The header goes first, so data can be streamed in without holding the file in memory.
    Call :meth:`begin` for each tensor in order, then :meth:`write` its bytes (any number
    of pieces), and :meth:`close` at the end (it checks every byte was written).
    """

    def __init__(self, path: Path, tensors: Iterable[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(tensors)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        off = 0
        self.sizes: list[int] = []
        for t in self.entries:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
            self.sizes.append(t.nbytes)
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.i = -1
        self.left = 0

    def begin(self, name: str) -> None:
        if self.left:
            raise RuntimeError(f"{self.entries[self.i].name}: {self.left} bytes not written")
        self.i += 1
        if self.entries[self.i].name != name:
            raise RuntimeError(f"expected tensor {self.entries[self.i].name}, got {name}")
        self.left = self.sizes[self.i]

    def write(self, data: bytes) -> None:
        if len(data) > self.left:
            raise RuntimeError(f"{self.entries[self.i].name}: too many bytes")
        self.f.write(data)
        self.left -= len(data)

    @property
    def stream(self) -> BinaryIO:
        return self.f

    def done_raw(self, n: int) -> None:
        """Account for ``n`` bytes written straight to :attr:`stream`."""
        self.left -= n

    def close(self) -> None:
        if self.left or self.i != len(self.entries) - 1:
            self.f.close()
            raise RuntimeError(f"{self.path}: not every tensor was written")
        self.f.close()

    def abort(self) -> None:
        self.f.close()
