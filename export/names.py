"""Match adapter module names to base weight names across checkpoint naming schemes.

The same Gemma-3 4B language-model layer is called
``model.language_model.layers.0.self_attn.q_proj`` (transformers >= 4.52, and the adapters
both backends write), ``language_model.model.layers.0.self_attn.q_proj`` (checkpoints saved
by older transformers, and mlx-lm's module tree), and ``model.layers.0.self_attn.q_proj`` in
a text-only ``*ForCausalLM``. GPT-2's first block is ``transformer.h.0`` in transformers'
module tree (so in adapters) and in some checkpoints (rinna's), but plain ``h.0`` in
openai-community/gpt2's safetensors; GPT-NeoX's output layer is ``embed_out`` on disk and
``lm_head`` in transformers 5. :func:`canonical` maps all of them to one key
(``layers.0.self_attn.q_proj``, ``h.0.attn.c_attn``); the towers of multimodal models keep
their own prefixes (``vision_tower...``), so they never collide with the language model.

GPT-2's projections are ``Conv1D`` layers whose weights are stored [in, out], the transpose
of a linear layer's [out, in]: :func:`stored_in_out` says which weights of a checkpoint
are stored that way.
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
# Longest first: "model.language_model." must win over "model.". "transformer." is GPT-2's
# (and Falcon's, BLOOM's, ...) base-model prefix, which un-prefixed checkpoints leave out.
LM_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.",
               "language_model.", "model.", "transformer.")
# Output layers renamed by transformers 5 on load (checkpoint name -> module name).
RENAMED = {"embed_out": "lm_head"}  # GPT-NeoX

# model_type of the transformers architectures built from Conv1D (transformers.pytorch_utils):
# every 2-D weight in their blocks is stored [in, out]; embeddings and lm_head are not.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")
NOT_CONV1D_LEAVES = ("wte", "wpe", "lm_head", "tokens_embed", "positions_embed")


def canonical(module: str) -> str:
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    for p in LM_PREFIXES:
        if module.startswith(p):
            module = module[len(p):]
            break
    return RENAMED.get(module, module)


def weight_index(tensor_names: list[str]) -> dict[str, list[str]]:
    """canonical module -> the base tensor names (``<module>.weight``) that map to it."""
    index: dict[str, list[str]] = {}
    for name in tensor_names:
        if name.endswith(".weight"):
            index.setdefault(canonical(name[:-7]), []).append(name)
    return index


def stored_in_out(model_type: str, module: str, shape: tuple[int, ...]) -> bool:
    """Whether the checkpoint of a ``model_type`` model stores ``module``'s 2-D weight as
    [in, out] (a Conv1D), not [out, in] (a linear layer)."""
    if model_type not in CONV1D_MODEL_TYPES or len(shape) != 2:
        return False
    return canonical(module).rsplit(".", 1)[-1] not in NOT_CONV1D_LEAVES
