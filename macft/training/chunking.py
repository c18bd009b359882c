"""How many tokens go through the output layer at once in both engines' chunked loss.

One rule for MLX (:mod:`macft.mlx_backend.loss`), PyTorch (:mod:`cuda_backend.loss`) and
the memory estimate (:mod:`macft.sizing.memory`): a chunk holds at most ``CHUNK_LOGITS``
logits, 64 MiB in fp32 (64 tokens of Gemma-3's 262,144-entry vocabulary). Each chunk reads
the whole output layer once, so smaller chunks trade weight reads for memory.
"""

from __future__ import annotations

CHUNK_LOGITS = 1 << 24


def chunk_rows(vocab: int, limit: int = CHUNK_LOGITS) -> int:
    """Tokens per chunk so that one chunk's logits hold at most ``limit`` values."""
    return max(1, limit // max(vocab, 1))
