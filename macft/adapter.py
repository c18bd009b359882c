"""PEFT-format LoRA adapters: the one artifact both backends write and export reads.

Layout (what ``peft.PeftModel.from_pretrained`` loads)::

    adapter/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, ...
    adapter/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                                       base_model.model.<module>.lora_B.weight [out, r]

The update of a module's weight ``W [out, in]`` is ``(alpha / r) * B @ A``.
Numpy only: no torch or mlx needed to read or write one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MacftError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterSpec:
    base_model: str
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    layers: list[int] | None = None  # layers_to_transform; None = all
    # True for GPT-2's Conv1D projections, whose weights are stored [in, out]; the LoRA pair
    # keeps PEFT's orientation (A [r, in], B [out, r]) either way.
    fan_in_fan_out: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(self.target_modules),
            "layers_to_transform": self.layers,
            "layers_pattern": "layers" if self.layers is not None else None,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_dora": False,
            "use_rslora": False,
            "revision": None,
        }


def write_peft_adapter(path: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]],
                       spec: AdapterSpec) -> None:
    """``modules`` maps an HF module path (``model.layers.0.self_attn.q_proj``) to (A, B)
    in PEFT orientation: A [r, in], B [out, r]."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(spec.peft_config(), indent=2))


def read_peft_adapter(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """(modules -> (A, B), adapter_config) from a PEFT adapter directory."""
    from safetensors.numpy import load_file

    cfg_p, w_p = path / CONFIG_NAME, path / WEIGHTS_NAME
    missing = [p.name for p in (cfg_p, w_p) if not p.is_file()]
    if missing:
        raise MacftError(f"{path} is not a PEFT adapter: {', '.join(missing)} missing.",
                         "Pass the adapter/ directory of a macft run (or any PEFT LoRA adapter).")
    cfg = json.loads(cfg_p.read_text())
    raw = load_file(str(w_p))
    modules: dict[str, list] = {}
    for key, arr in raw.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if k.endswith(part):
                name = k[: -len(part)]
                # peft sometimes saves with the adapter name: ...q_proj.lora_A.default.weight
                modules.setdefault(name, [None, None])[idx] = arr
    for k in list(raw):
        if ".lora_A." in k and k.endswith(".weight") and not k.endswith(".lora_A.weight"):
            name = k[len(PREFIX):].split(".lora_A.")[0]
            modules.setdefault(name, [None, None])[0] = raw[k]
            modules[name][1] = raw[k.replace(".lora_A.", ".lora_B.")]
    out = {n: (a, b) for n, (a, b) in modules.items() if a is not None and b is not None}
    if not out:
        raise MacftError(f"{w_p} holds no LoRA weights (no *.lora_A.weight / *.lora_B.weight keys).")
    return out, cfg


def spec_from_config(cfg: dict) -> AdapterSpec:
    return AdapterSpec(
        base_model=cfg.get("base_model_name_or_path") or "",
        rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=list(cfg.get("target_modules") or []),
        layers=cfg.get("layers_to_transform"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))
