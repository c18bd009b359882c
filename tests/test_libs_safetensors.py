"""macft.safetensors_header, the one header reader, against the safetensors library itself."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from export.safetensors_io import SafetensorsFile, to_f32
from macft.errors import MacftError
from macft.safetensors_header import BrokenFile, read_header


def _same_as_safe_open(path) -> None:
    h = read_header(path)
    with safe_open(str(path), framework="numpy") as f:
        assert set(h.tensors) == set(f.keys())
        assert h.metadata == (f.metadata() or {})
        for name in f.keys():
            s = f.get_slice(name)
            t = h.tensors[name]
            assert (t.dtype, list(t.shape)) == (s.get_dtype(), s.get_shape()), name
            if t.dtype != "BF16":  # numpy has no bf16: safe_open cannot read it, export.safetensors_io can
                with open(path, "rb") as fh:
                    fh.seek(t.begin)
                    raw = fh.read(t.nbytes)
                np.testing.assert_array_equal(to_f32(raw, t.dtype).reshape(t.shape), f.get_tensor(name))
    assert h.file_size == path.stat().st_size


def test_header_agrees_with_safe_open(tiny_gemma, tmp_path):
    _same_as_safe_open(tiny_gemma / "model.safetensors")
    p = tmp_path / "mixed.safetensors"
    rng = np.random.default_rng(0)
    save_file({"b": rng.standard_normal((3, 5)).astype(np.float16), "a": rng.standard_normal(7).astype(np.float32),
               "empty": np.zeros((0, 4), np.float32)}, str(p), metadata={"format": "pt", "x": "y"})
    _same_as_safe_open(p)


def test_bf16_reads_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    x = torch.randn(4, 6).to(torch.bfloat16)
    p = tmp_path / "bf16.safetensors"
    save_torch({"w": x}, str(p))
    sf = SafetensorsFile(p)
    np.testing.assert_array_equal(sf.read_f32(sf.tensors["w"]), x.float().numpy())
    np.testing.assert_array_equal(sf.read_f32(sf.tensors["w"], rows=(1, 3)), x[1:3].float().numpy())


def _file(header: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header


@pytest.mark.parametrize("data", [b"", b"\x01\x02", _file(b"{}", length=16), _file(b"[]"), _file(b"{nope"),
                                  _file(b'{"a": {"dtype": "F32"}}'),
                                  _file(b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'),
                                  _file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}')])
def test_damaged_headers(tmp_path, data):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    with pytest.raises(BrokenFile):
        read_header(p)
    with pytest.raises(MacftError, match="not a readable safetensors file"):
        SafetensorsFile(p)
    with pytest.raises(SafetensorError), safe_open(str(p), framework="numpy"):  # the library refuses them too
        pass
