"""The MLX backend: LoRA / QLoRA with mlx-lm's model code, on Apple silicon (Metal) or,
through ``mlx[cpu]``, on Linux CPUs (how CI tests it).

This module is imported by the backend registry only when MLX is chosen; it
imports mlx lazily so that a missing install gives one clear message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import MacftError
from ..model_info import ModelInfo, fp16_problem
from .blas import preload_fast_blas
from .device import INSTALL_HINT, import_mlx, on_metal

# Must happen before anything imports mlx.core (see blas.py).
preload_fast_blas()

class MLXBackend:
    name = "mlx"

    def device(self) -> str:
        mx = import_mlx()
        if on_metal():
            info = mx.device_info()
            mem = info.get("memory_size", 0) / 2**30
            return f"{info.get('device_name', 'Apple GPU')} (Metal, {mem:.0f} GB unified memory)"
        return "CPU (mlx[cpu])"

    def precision(self, cfg: Any, model_info: ModelInfo) -> str:
        p = cfg.train.precision
        if p == "auto":
            return "bf16" if on_metal() else "fp32"
        if p == "fp16" and (refused := fp16_problem(model_info)):
            raise MacftError(f"{model_info.describe()}: {refused}.", "Use --precision bf16 (Apple silicon) or fp32.")
        return p

    def memory_target(self, cfg: Any, model_info: ModelInfo) -> Any:
        from ..sizing.memory import Target
        from .train import memory_budget

        metal = on_metal()
        label = ("Metal's recommended working set" if metal else "available RAM")
        if os.environ.get("MACFT_MLX_MEMORY_LIMIT_GB"):
            label += " (capped by MACFT_MLX_MEMORY_LIMIT_GB)"
        return Target("mlx", "metal" if metal else "cpu",
                      4 if self.precision(cfg, model_info) == "fp32" else 2, memory_budget(), label)

    def check(self, cfg: Any, model_info: ModelInfo | None = None) -> list[str]:
        problems: list[str] = []
        try:
            import_mlx()
        except MacftError as e:
            return [f"{e.message} ({INSTALL_HINT})"]
        from .model import architecture_problem, quantization_problem

        if model_info is not None:
            if (p := architecture_problem(model_info)):
                problems.append(p)
            if (p := quantization_problem(model_info, cfg.model.quantize)):
                problems.append(p)
            if cfg.train.precision == "fp16" and (refused := fp16_problem(model_info)):
                problems.append(f"{refused}: use --precision bf16 or fp32")
        if sys.platform != "darwin" and not on_metal() and cfg.train.precision == "bf16":
            problems.append("bf16 on this CPU is 10-60x slower than fp32 and not supported for training "
                            "here: use --precision fp32 (or auto)")
        return problems

    def train(self, job: Any, callback: Any) -> Any:
        from .train import run_training

        return run_training(self, job, callback)

    def load_chat_model(self, model_path: Path, adapter_dir: Path | None, end_tokens: list[str]) -> Any:
        import_mlx()  # a missing mlx says how to install it
        from .infer import MLXChatModel

        return MLXChatModel(model_path, adapter_dir, end_tokens)

