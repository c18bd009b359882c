"""Block-diagonal attention for packed batches in mlx-lm models.

mlx-lm's models build their causal mask internally (``create_attention_mask``)
and take no mask argument. For a packed row we replace that function, while the
model runs, by one that also forbids attention across examples (and keeps the
sliding window). Positions are not reset for RoPE models, whose attention scores
depend only on relative positions, so an example attending only to itself sees
exactly what it would see alone; GPT-2's learned positions restart per example
(:func:`segment_positions`, used by its position embedding).

The segment ids come from the step's inputs (a traced array under
``mx.compile``), handed over through a module-level slot for the duration of one
forward pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

_SEGMENTS: list[Any] = [None]


def _packed_mask(h: Any, cache: Any = None, window_size: int | None = None,
                 return_array: bool = False) -> Any:
    seg = _SEGMENTS[0]
    n = h.shape[1]
    idx = mx.arange(n)
    causal = idx[:, None] >= idx[None, :]
    if window_size is not None:
        causal = causal & (idx[:, None] < idx[None, :] + window_size)
    same = seg[:, :, None] == seg[:, None, :]  # [B, L, L]
    return (causal[None] & same)[:, None]  # [B, 1, L, L]


def current_segments() -> Any:
    """The packed batch's segment ids [B, L] while a packed forward pass runs, else None."""
    return _SEGMENTS[0]


def segment_positions(seg: Any) -> mx.array:
    """Each token's position within its own example: [[1,1,1,2,2]] -> [[0,1,2,0,1]]."""
    idx = mx.arange(seg.shape[1])
    first = mx.concatenate([mx.ones((seg.shape[0], 1), dtype=mx.bool_), seg[:, 1:] != seg[:, :-1]], axis=1)
    return idx - mx.cummax(mx.where(first, idx, 0), axis=1)


@contextmanager
def packed_attention(model_module_names: list[str], segments: Any) -> Iterator[None]:
    """Within this block, the named mlx-lm model modules build block-diagonal masks."""
    mods = [importlib.import_module(m) for m in model_module_names]
    saved = [m.create_attention_mask for m in mods]
    _SEGMENTS[0] = segments
    try:
        for m in mods:
            m.create_attention_mask = _packed_mask
        yield
    finally:
        for m, f in zip(mods, saved):
            m.create_attention_mask = f
        _SEGMENTS[0] = None


def model_modules(model: Any) -> list[str]:
    """The mlx_lm.models modules whose code builds this model's masks."""
    names = set()
    for _, m in model.named_modules():
        mod = type(m).__module__
        if mod.startswith("mlx_lm.models.") and hasattr(importlib.import_module(mod), "create_attention_mask"):
            names.add(mod)
    return sorted(names)
