"""The base a QLoRA adapter was trained on: quantize and dequantize, as training did, in fp32.

A run directory holds ``base_quantization.json`` when the base was quantized in training::

    {"method": "bnb-nf4", "double_quant": true, "blocksize": 64, "unquantized": [...]}
    {"method": "mlx-affine", "bits": 4, "group_size": 64, "unquantized": [...]}

Which weights training quantized (the trainers follow their libraries' rules):

- ``bnb-nf4`` (PyTorch backend, transformers + bitsandbytes): every 2-D weight of a linear
  layer; embeddings and ``lm_head`` stay in 16 bits (transformers' default skip list).
- ``bnb-int8`` (PyTorch backend, ``--quantize 8bit``): the same modules, LLM.int8 row-wise
  absmax of the fp16 weight (bitsandbytes' ``int8_vectorwise_quant``; the merged weights equal
  the int8 weights training used exactly; LLM.int8's quantization of the *activations* at
  training time has no counterpart in a merged 16-bit model).
- ``mlx-affine`` (MLX backend, mlx-lm): every 2-D weight of a linear layer *and* of an
  embedding whose last dimension is a multiple of ``group_size``.

GPT-2's projections are ``Conv1D`` layers whose checkpoint weights are stored [in, out].
Both trainers quantize the [out, in] transpose (transformers turns each Conv1D into a
bitsandbytes linear layer holding ``weight.T``; mlx-lm transposes them on load), so the
merge hands :meth:`BaseQuantization.roundtrip` the transposed weight and its ``applies_to``
the [out, in] shape (see :mod:`export.merge`).

Minus the modules listed in ``unquantized``. An optional ``"quantized": [...]`` list, when
present, names the quantized modules exactly and replaces the rules. An optional
``"dtype"`` (default ``float32``) is the dtype the weights were quantized from (mlx-affine:
the scales take that dtype).

bitsandbytes and mlx are imported only here, and only when such a base is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macft.errors import MacftError
from macft.run import QUANTIZATION, read_quantization

from .names import canonical

METHODS = ("bnb-nf4", "bnb-int8", "mlx-affine")


@dataclass
class BaseQuantization:
    method: str
    bits: int = 4
    group_size: int = 64
    double_quant: bool = True
    unquantized: set[str] = field(default_factory=set)  # canonical module names
    quantized: set[str] | None = None
    dtype: str = "float32"

    def describe(self) -> str:
        if self.method == "bnb-nf4":
            dq = ", double quant" if self.double_quant else ""
            return f"bitsandbytes NF4 (blocksize {self.group_size}{dq})"
        if self.method == "bnb-int8":
            return "bitsandbytes LLM.int8 (row-wise absmax of the fp16 weights)"
        return f"MLX affine {self.bits}-bit (group size {self.group_size}, {self.dtype})"

    @property
    def row_blockable(self) -> bool:
        """Whether rows can be processed in blocks (bnb's double quant uses a global mean)."""
        return self.method == "mlx-affine"

    def applies_to(self, module: str, shape: tuple[int, ...]) -> bool:
        """Whether training saw this weight (HF module name, no ``.weight``; ``shape`` as
        training saw it, [out, in]) quantized."""
        if len(shape) != 2:
            return False
        c = canonical(module)
        if c in self.unquantized:
            return False
        if self.quantized is not None:
            return c in self.quantized
        leaf = c.rsplit(".", 1)[-1]
        is_embedding = "embed" in leaf or leaf in ("wte", "wpe")
        if self.method in ("bnb-nf4", "bnb-int8"):
            return not is_embedding and leaf != "lm_head"
        return shape[-1] % self.group_size == 0

    def roundtrip(self, w: np.ndarray) -> np.ndarray:
        """``w`` (fp32, [out, in] as training held it) quantized and dequantized as in
        training, in fp32."""
        if self.method == "bnb-nf4":
            return _bnb_nf4(w, self.group_size, self.double_quant)
        if self.method == "bnb-int8":
            return _bnb_int8(w)
        return _mlx_affine(w, self.bits, self.group_size, self.dtype)


def read_base_quantization(run_dir: Path | None) -> BaseQuantization | None:
    """The run's record (:func:`macft.run.read_quantization`), checked; None without one."""
    d = read_quantization(run_dir)
    if d is None:
        return None
    p = Path(run_dir) / QUANTIZATION  # type: ignore[arg-type]
    problems = []
    method = d.get("method")
    if method not in METHODS:
        problems.append(f"method is {method!r}; expected one of {', '.join(METHODS)}")
    bits = int(d.get("bits", 4))
    if method == "bnb-nf4" and bits != 4:
        problems.append(f"bnb-nf4 has 4 bits, not {bits}")
    if method == "bnb-int8":
        bits = 8
    if method == "mlx-affine" and bits not in (2, 3, 4, 5, 6, 8):
        problems.append(f"bits is {bits}; MLX affine quantization has 2, 3, 4, 5, 6 or 8")
    group = int(d.get("blocksize", d.get("group_size", 64)))
    if group not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        problems.append(f"block/group size {group} is not a power of two between 32 and 4096")
    dtype = d.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype {dtype!r} is not float32, bfloat16 or float16")
    if problems:
        raise MacftError(f"{p} is not a valid base quantization record:\n"
                         + "\n".join(f"  - {x}" for x in problems),
                         "Restore the file written by `macft train`, or delete it to merge into "
                         "the 16-bit base (same as --merge-base original).")
    def strip(n: str) -> str:
        return canonical(n[:-7] if n.endswith(".weight") else n)

    quantized = d.get("quantized")
    return BaseQuantization(
        method=method, bits=bits, group_size=group, double_quant=bool(d.get("double_quant", True)),
        unquantized={strip(n) for n in d.get("unquantized") or []},
        quantized={strip(n) for n in quantized} if quantized is not None else None, dtype=dtype)


def _bnb_nf4(w: np.ndarray, blocksize: int, double_quant: bool) -> np.ndarray:
    try:
        import torch
        from bitsandbytes import functional as bnbf
    except ImportError as e:
        raise MacftError(f"Merging into the NF4 base as training saw it needs bitsandbytes and torch ({e}).",
                         "pip install bitsandbytes torch, or pass --merge-base original.") from None
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    q, state = bnbf.quantize_4bit(t, blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).to(torch.float32).numpy()


def _bnb_int8(w: np.ndarray) -> np.ndarray:
    try:
        import torch
        from bitsandbytes import functional as bnbf
    except ImportError as e:
        raise MacftError(f"Merging into the int8 base as training saw it needs bitsandbytes and torch ({e}).",
                         "pip install bitsandbytes torch, or pass --merge-base original.") from None
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(torch.float16)
    cb, scb, _ = bnbf.int8_vectorwise_quant(t)
    return bnbf.int8_vectorwise_dequant(cb, scb).to(torch.float32).numpy()


def _mlx_affine(w: np.ndarray, bits: int, group_size: int, dtype: str) -> np.ndarray:
    try:
        import mlx.core as mx
    except ImportError as e:
        raise MacftError(f"Merging into the MLX-quantized base as training saw it needs mlx ({e}).",
                         "pip install mlx (mlx[cpu] on Linux), or pass --merge-base original.") from None
    x = mx.array(np.ascontiguousarray(w, dtype=np.float32))
    if dtype != "float32":
        x = x.astype(getattr(mx, dtype))
    wq, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    out = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    return np.array(out, copy=True)
