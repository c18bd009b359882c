"""Match adapter module names to base weight names across checkpoint naming schemes.

The same Gemma-3 4B language-model layer is called
``model.language_model.layers.0.self_attn.q_proj`` (transformers >= 4.52, and the adapters
both backends write), ``language_model.model.layers.0.self_attn.q_proj`` (checkpoints saved
by older transformers, and mlx-lm's module tree), and ``model.layers.0.self_attn.q_proj`` in
a text-only ``*ForCausalLM``. :func:`canonical` maps all of them to one key
(``layers.0.self_attn.q_proj``); the towers of multimodal models keep their own prefixes
(``vision_tower...``), so they never collide with the language model.
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
# Longest first: "model.language_model." must win over "model.".
LM_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.",
               "language_model.", "model.")


def canonical(module: str) -> str:
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    for p in LM_PREFIXES:
        if module.startswith(p):
            return module[len(p):]
    return module


def weight_index(tensor_names: list[str]) -> dict[str, list[str]]:
    """canonical module -> the base tensor names (``<module>.weight``) that map to it."""
    index: dict[str, list[str]] = {}
    for name in tensor_names:
        if name.endswith(".weight"):
            index.setdefault(canonical(name[:-7]), []).append(name)
    return index
