"""Presets for the models macft names first: settings that work, so nobody spends hours on them.

A preset is a config layer between the defaults and the user's YAML / flags
(defaults < preset < YAML < CLI): ``macft train --preset gemma3-1b --data my.jsonl``.
The chat template and end tokens come from the model's own tokenizer; the preset
records what they must be, and training checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import MacftError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    description: str
    config: dict[str, Any]
    chat_template: str  # template family the tokenizer must carry
    end_tokens: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


PRESETS: dict[str, Preset] = {
    "gemma3-1b": Preset(
        name="gemma3-1b", hub_id="google/gemma-3-1b-it",
        description="Gemma-3 1B instruction-tuned (text only, 26 layers, width 1152)",
        config={
            "model": {"name": "google/gemma-3-1b-it"},
            "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["all-linear"], "layers": -1},
            "data": {"max_seq_len": 1024, "loss_on": "assistant"},
            "train": {"learning_rate": 2e-4, "epochs": 3.0, "batch_size": 4, "grad_accum": 2,
                      "schedule": "cosine", "warmup_ratio": 0.05, "precision": "auto"},
        },
        chat_template="gemma3", end_tokens=("<end_of_turn>", "<eos>"),
        notes=("width 1152 is not a multiple of 256: llama.cpp's k-quants fall back to q5_0/q8_0 "
               "for some tensors (export lists them)",)),
    "gemma3-4b": Preset(
        name="gemma3-4b", hub_id="google/gemma-3-4b-it",
        description="Gemma-3 4B instruction-tuned (text part of Gemma3ForConditionalGeneration)",
        config={
            "model": {"name": "google/gemma-3-4b-it", "quantize": "4bit"},
            "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["all-linear"], "layers": -1},
            "data": {"max_seq_len": 1024, "loss_on": "assistant"},
            "train": {"learning_rate": 1e-4, "epochs": 2.0, "batch_size": 2, "grad_accum": 4,
                      "schedule": "cosine", "warmup_ratio": 0.05, "grad_checkpoint": True,
                      "precision": "auto"},
        },
        chat_template="gemma3", end_tokens=("<end_of_turn>", "<eos>"),
        notes=("4-bit base and gradient checkpointing so that it fits 16 GB Macs and 12 GB GPUs",)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MacftError(f"Unknown preset '{name}'.", f"Use one of: {', '.join(PRESETS)} (see `macft models`).")
    return PRESETS[name]
