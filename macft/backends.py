"""Backends: a small protocol, a registry with lazy imports, and ``auto``.

A backend does the math of training on one kind of hardware; everything else
(config, data, batches, schedule, loop, checkpoints, run directory) is shared. It also
loads a fine-tune to talk to (:meth:`Backend.load_chat_model`, for chat, generate and eval).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig
from .data.batching import Batch, BatchPlan
from .data.dataset import TokenizedData
from .errors import BackendUnavailable, MacftError
from .inference import ChatModel
from .model_info import ModelInfo
from .training.events import TrainingCallback
from .training.loop import LoopResult, LoopSettings


@dataclass
class TrainJob:
    """Everything a backend needs to train; prepared once by the train command."""

    cfg: RunConfig
    model_path: Path
    model_info: ModelInfo  # config.json read through transformers' config classes
    tokenizer: Any
    data: TokenizedData
    plan: BatchPlan
    valid_batches: list[Batch]
    settings: LoopSettings
    run_dir: Path
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)  # filled by the backend, shown in the summary


class Backend(Protocol):
    name: str

    def check(self, cfg: RunConfig, model_info: ModelInfo | None = None) -> list[str]:
        """Problems that keep this backend from running ``cfg`` here (empty: fine). Called
        twice: before anything is downloaded (``model_info`` None) and once the config is read,
        before any weight is loaded: an architecture this backend cannot train is refused here."""

    def device(self) -> str:
        """Human-readable device, e.g. 'Apple M2 (Metal)', 'NVIDIA RTX 3060', 'CPU'."""

    def train(self, job: TrainJob, callback: TrainingCallback) -> LoopResult:
        """Load the model, add LoRA, run the shared loop, write the adapters."""

    def memory_target(self, cfg: RunConfig, model_info: ModelInfo) -> Any:
        """A :class:`macft.sizing.memory.Target`: device, compute dtype and memory budget."""

    def load_chat_model(self, model_path: Path, adapter_dir: Path | None, end_tokens: list[str]) -> ChatModel:
        """The base model (with the adapter, when given) to talk to and score with
        (:mod:`macft.chat_session`); the implementation is imported only here."""

    # Optional: ``check_checkpoint(path) -> None`` raises a MacftError for a checkpoint this
    # backend cannot (or must not) load; `macft train --resume` calls it before any weight
    # is loaded. The engine's ``load_state`` checks again.


REGISTRY: dict[str, tuple[str, str, str]] = {
    # name: (module, class, install hint)
    "mlx": ("macft.mlx_backend", "MLXBackend", "pip install 'macft[mlx]'"),
    "cuda": ("cuda_backend", "TorchBackend", "pip install 'macft[cuda]' (see README for the CUDA build of torch)"),
}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise MacftError(f"Unknown backend '{name}'.", f"Use one of: auto, {', '.join(REGISTRY)}.")
    module, cls, hint = REGISTRY[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(name, [f"its packages are not installed ({e})"], hint) from None
    return getattr(mod, cls)()


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_auto() -> tuple[str, str | None]:
    """(backend, warning or None) for ``--backend auto``."""
    if is_apple_silicon() and has_module("mlx") and has_module("mlx_lm"):
        return "mlx", None
    if has_module("torch"):
        import torch

        if torch.cuda.is_available():
            return "cuda", None
        if has_module("mlx") and has_module("mlx_lm") and sys.platform == "darwin":
            return "mlx", None
        return "cuda", ("No NVIDIA GPU (or no CUDA build of torch) and no Apple silicon found: "
                        "training on the CPU with the PyTorch backend, in fp32. This is slow; "
                        "fine for tiny models and tests. `macft doctor` checks your set-up.")
    if has_module("mlx") and has_module("mlx_lm"):
        return "mlx", ("PyTorch is not installed: using MLX on the CPU, which is slow. "
                       "On an NVIDIA machine install the cuda extra.")
    raise BackendUnavailable("auto", ["neither PyTorch nor MLX is installed"],
                             "On a Mac: pip install 'macft[mlx]'. On NVIDIA or CPU: pip install 'macft[cuda]'.")
