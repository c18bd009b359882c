"""PyTorch backend: NVIDIA GPUs (QLoRA with bitsandbytes), several GPUs under
``accelerate launch``, and the CPU (fp32; also how CI tests the 4-bit path).

Importing this package is cheap: torch, transformers, peft and bitsandbytes load
only when a backend method runs, so the registry in :mod:`macft.backends` and
``macft --help`` never pay for them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TorchBackend"]


def __getattr__(name: str) -> Any:
    if name == "TorchBackend":
        from .backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module 'cuda_backend' has no attribute {name!r}")
