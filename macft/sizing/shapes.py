"""The dimensions that decide training memory, read through :class:`macft.model_info.ModelInfo`
(transformers' config classes: sparse hub configs get their defaults, GPT-2's ``n_embd``
is ``hidden_size``).

No torch, no mlx. The parameter count comes from the safetensors headers when the
weights are on disk (exact), else from the dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..model_info import Block, ModelInfo


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
    linears: tuple[Block, ...] = ()  # the linear layers of one block
    file_bytes: int = 0  # size of the *.safetensors files, when they are on disk

    @property
    def linear_params_per_layer(self) -> int:
        return sum(b.fan_in * b.fan_out for b in self.linears)

    @property
    def linear_rows_per_layer(self) -> int:
        return sum(b.fan_out for b in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, rank: int, targets: list[str], layers: int) -> int:
        chosen = [b for b in self.linears
                  if "all-linear" in targets or b.short in targets or b.name in targets]
        n = min(layers, self.layers) if layers > 0 else self.layers
        return n * sum(rank * (b.fan_in + b.fan_out) for b in chosen)


def shape_from_config(info: ModelInfo, weights_dir: Path | None = None) -> ModelShape:
    shape = ModelShape(
        vocab=info.vocab_size, hidden=info.hidden_size, layers=info.num_layers, heads=info.num_heads,
        kv_heads=info.num_kv_heads, head_dim=info.head_dim, intermediate=info.intermediate_size,
        tied=info.tied, params=0, linears=info.block_linears)
    counted = count_safetensors_params(weights_dir, text_only=True) if weights_dir else 0
    if not counted:
        hidden = shape.hidden
        norms = shape.layers * (4 * hidden + 2 * shape.head_dim) + hidden
        counted = shape.layers * shape.linear_params_per_layer + shape.embedding_params + norms
    files = sum(f.stat().st_size for f in Path(weights_dir).glob("*.safetensors")) if weights_dir else 0
    return ModelShape(**{**shape.__dict__, "params": counted, "file_bytes": files})


def count_safetensors_params(path: Path, text_only: bool = True) -> int:
    """Parameters in the ``*.safetensors`` files of ``path`` (headers only). With
    ``text_only``, a multimodal checkpoint's vision tower and projector are left out
    (training loads the text model only)."""
    from ..errors import MacftError, os_error_message
    from ..safetensors_header import BrokenFile, read_header

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            tensors = read_header(f).tensors
        except BrokenFile as e:
            raise MacftError(f"{f} is damaged: {e}.", "Download or copy the model again.") from None
        except OSError as e:
            raise MacftError(*os_error_message(e, "reading the model's weights")) from None
        total += sum(t.numel for k, t in tensors.items()
                     if not (text_only and ("vision" in k or "multi_modal" in k)))
    return total
