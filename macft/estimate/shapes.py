"""The dimensions that decide training memory, read from a model's ``config.json``.

Pure Python: no torch, no mlx. The parameter count comes from the safetensors headers
when the weights are on disk (exact), else from the dimensions (decoder-only
transformers with gated MLPs: Gemma, Llama, Qwen, Mistral).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import text_config

# (input width, output width) of each projection, as functions of the shape
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    params: int  # every parameter of the language model
    file_bytes: int = 0  # size of the *.safetensors files, when they are on disk

    def projection(self, name: str) -> tuple[int, int]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[name]

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in map(self.projection, PROJECTIONS))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, rank: int, targets: list[str], layers: int) -> int:
        names = PROJECTIONS if "all-linear" in targets else [t for t in PROJECTIONS if t in targets]
        n = min(layers, self.layers) if layers > 0 else self.layers
        return n * sum(rank * (a + b) for a, b in map(self.projection, names))


def shape_from_config(config: dict[str, Any], weights_dir: Path | None = None) -> ModelShape:
    tc = text_config(config)
    hidden = int(tc["hidden_size"])
    heads = int(tc["num_attention_heads"])
    head_dim = int(tc.get("head_dim") or hidden // heads)
    tied = bool(tc.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
    shape = ModelShape(
        vocab=int(tc["vocab_size"]), hidden=hidden, layers=int(tc["num_hidden_layers"]), heads=heads,
        kv_heads=int(tc.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate=int(tc["intermediate_size"]), tied=tied, params=0)
    counted = count_safetensors_params(weights_dir, text_only=True) if weights_dir else 0
    if not counted:
        norms = shape.layers * (4 * hidden + 2 * head_dim) + hidden
        counted = shape.layers * shape.linear_params_per_layer + shape.embedding_params + norms
    files = sum(f.stat().st_size for f in Path(weights_dir).glob("*.safetensors")) if weights_dir else 0
    return ModelShape(**{**shape.__dict__, "params": counted, "file_bytes": files})


def count_safetensors_params(path: Path, text_only: bool = True) -> int:
    """Parameters in the ``*.safetensors`` files of ``path`` (headers only). With
    ``text_only``, a multimodal checkpoint's vision tower and projector are left out
    (training loads the text model only)."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__" or (text_only and ("vision" in k or "multi_modal" in k)):
                continue
            size = 1
            for d in v["shape"]:
                size *= int(d)
            total += size
    return total
