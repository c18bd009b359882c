"""The optimizer: AdamW, 8-bit and paged where that helps.

- GPU: bitsandbytes ``PagedAdamW8bit`` (the QLoRA recipe): 8-bit moments, and the
  optimizer state pages to CPU memory instead of failing on a memory spike.
- CPU with a quantized base: bitsandbytes ``AdamW8bit``, unpaged (paging needs
  CUDA unified memory; bitsandbytes would fall back with a warning per tensor).
  This keeps CI's QLoRA path the same optimizer family as the GPU's.
- CPU without quantization (and GPU without bitsandbytes): ``torch.optim.AdamW``
  in fp32.

The learning rate is set by the shared loop before every step, so the value
given here is a placeholder.
"""

from __future__ import annotations

from typing import Any

BETAS = (0.9, 0.999)
EPS = 1e-8


def make_optimizer(params: list[Any], *, on_gpu: bool, quantized: bool, weight_decay: float,
                   have_bnb: bool) -> tuple[Any, str, str | None]:
    """(optimizer, its name, a note to show once or None)."""
    import torch

    if on_gpu and have_bnb:
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit(params, lr=0.0, betas=BETAS, eps=EPS, weight_decay=weight_decay),
                "paged AdamW 8-bit", None)
    if quantized and have_bnb:
        import bitsandbytes as bnb

        return (bnb.optim.AdamW8bit(params, lr=0.0, betas=BETAS, eps=EPS, weight_decay=weight_decay),
                "AdamW 8-bit",
                "Paged optimizers need a CUDA GPU: using bitsandbytes' unpaged 8-bit AdamW on the CPU.")
    note = None
    if on_gpu:
        note = "bitsandbytes is not installed: using torch's fp32 AdamW (more optimizer memory)."
    return (torch.optim.AdamW(params, lr=0.0, betas=BETAS, eps=EPS, weight_decay=weight_decay),
            "AdamW", note)
