"""A model's configuration, read once through transformers' own config classes.

Published ``config.json`` files are sparse (Gemma-3 4B's ``text_config`` holds only the
keys that differ from the defaults), use each architecture's own names (GPT-2's
``n_embd`` / ``n_head`` / ``n_layer``) and carry keys of older transformers versions
(GPT-NeoX's ``rotary_pct`` / ``rotary_emb_base``). ``AutoConfig`` fills the defaults, maps
the names and upgrades the old keys; reading the raw dictionary does none of that. So
everything that needs a dimension or a family rule asks a :class:`ModelInfo`.

``ModelInfo.raw`` keeps ``config.json`` as written, for the few places that must know
what is on disk (a pre-quantized checkpoint's ``quantization`` block, the weight naming).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import MacftError

# Families whose activations overflow fp16 (the loss turns NaN): one rule for every backend,
# applied by fp16_problem.
FP16_UNSAFE_PREFIXES = ("gemma",)
FP16_UNSAFE_NAME = "Gemma-3"  # how help texts name them


@dataclass(frozen=True)
class Block:
    """One linear layer inside a transformer block: its path below the block, and its
    (input, output) widths."""

    name: str  # e.g. "self_attn.q_proj", "attn.c_attn"
    fan_in: int
    fan_out: int

    @property
    def short(self) -> str:
        return self.name.split(".")[-1]


@dataclass(frozen=True, eq=False)
class ModelInfo:
    path: Path
    raw: dict[str, Any]  # config.json as written on disk
    config: Any  # transformers.PretrainedConfig (AutoConfig)

    # -- identity ------------------------------------------------------------------------
    @cached_property
    def text(self) -> Any:
        """The language model's config (``text_config`` of multimodal models, else the config)."""
        get = getattr(self.config, "get_text_config", None)
        return get() if get else self.config

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "") or self.raw.get("model_type", ""))

    @property
    def text_model_type(self) -> str:
        return str(getattr(self.text, "model_type", "") or self.model_type)

    @property
    def architectures(self) -> list[str]:
        return list(self.raw.get("architectures") or getattr(self.config, "architectures", None) or [])

    @property
    def architecture(self) -> str:
        return self.architectures[0] if self.architectures else ""

    @property
    def multimodal(self) -> bool:
        """A text model inside a multimodal one (Gemma-3 4B+: a vision tower and projector)."""
        return self.text is not self.config and any(
            getattr(self.config, k, None) is not None for k in ("vision_config", "audio_config"))

    @property
    def family(self) -> str:
        return self.text_model_type

    # -- dimensions ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.text.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.text.hidden_size)  # GPT-2's n_embd through its attribute_map

    @property
    def num_layers(self) -> int:
        return int(self.text.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        i = getattr(self.text, "intermediate_size", None)
        if i is None:
            i = getattr(self.text, "n_inner", None)  # GPT-2: None means 4 x width
        return int(i or 4 * self.hidden_size)

    @property
    def tied(self) -> bool:
        for c in (self.config, self.text):
            v = getattr(c, "tie_word_embeddings", None)
            if v is not None:
                return bool(v)
        return True

    @property
    def block_linears(self) -> tuple[Block, ...]:
        """The linear layers of one transformer block, by the HF module names."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mt = self.text_model_type
        if mt == "gpt2":  # Conv1D projections, fused q/k/v
            return (Block("attn.c_attn", h, 3 * h), Block("attn.c_proj", h, h),
                    Block("mlp.c_fc", h, i), Block("mlp.c_proj", i, h))
        if mt == "gpt_neox":
            return (Block("attention.query_key_value", h, 3 * h), Block("attention.dense", h, h),
                    Block("mlp.dense_h_to_4h", h, i), Block("mlp.dense_4h_to_h", i, h))
        return (Block("self_attn.q_proj", h, q), Block("self_attn.k_proj", h, kv),
                Block("self_attn.v_proj", h, kv), Block("self_attn.o_proj", q, h),
                Block("mlp.gate_proj", h, i), Block("mlp.up_proj", h, i), Block("mlp.down_proj", i, h))

    @property
    def quantization(self) -> dict[str, Any] | None:
        """A pre-quantized checkpoint's record (mlx-community's ``quantization``, or a
        transformers ``quantization_config``), as written."""
        for d in (self.raw, self.raw.get("text_config") or {}):
            q = d.get("quantization") or d.get("quantization_config")
            if q:
                return q
        return None

    def describe(self) -> str:
        return f"{self.architecture or self.model_type} ({self.text_model_type})"


def fp16_unsafe_family(model_info: ModelInfo | None, model_name: str | None = None) -> str | None:
    """The family's name (e.g. "Gemma-3") when its activations overflow fp16, else None.
    Before the config is read (``model_info`` None) the model's name decides."""
    if model_info is not None:
        if not model_info.family.startswith(FP16_UNSAFE_PREFIXES):
            return None
        family = model_info.family.lower()
    else:
        family = (model_name or "").lower().rsplit("/", 1)[-1]
        if not any(p in family for p in FP16_UNSAFE_PREFIXES):
            return None
    # gemma3_text, gemma-3-1b-it -> Gemma-3; gemma-2b (the first Gemma, 2B) -> Gemma
    m = re.search(r"gemma-?(\d)(?![\d.]*b)", family)
    if m:
        return f"Gemma-{m.group(1)}"
    if "gemma" in family:
        return "Gemma"
    return model_info.describe() if model_info is not None else str(model_name)


def fp16_problem(model_info: ModelInfo | None, model_name: str | None = None) -> str | None:
    """Why ``--precision fp16`` is refused for this model, None when it is not: the one
    message of every backend (each adds the fix its hardware allows)."""
    family = fp16_unsafe_family(model_info, model_name)
    if family is None:
        return None
    return (f"--precision fp16 is refused for {family}: its activations overflow fp16 "
            "(values beyond 65504) and the loss turns to NaN")


def read_model_info(path: Path) -> ModelInfo:
    """``config.json`` of a model directory through ``AutoConfig``, with our own errors."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MacftError(f"{path} has no config.json, so it is not a Hugging Face model directory.",
                         "Pass the directory that holds config.json and the *.safetensors weights.")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MacftError(f"{cfg_file} is not valid JSON: {e}",
                         "Restore the file from the model's repository.") from None
    if not isinstance(raw, dict):
        raise MacftError(f"{cfg_file} holds a {type(raw).__name__}, not a JSON object.",
                         "Restore the file from the model's repository.")
    if not raw.get("model_type"):
        raise MacftError(f"{cfg_file} has no 'model_type', so no library can tell which architecture "
                         "to build.", "Use a Hugging Face transformers checkpoint (its config.json names "
                         "a model_type).")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise MacftError("The 'transformers' package is missing.", "pip install 'transformers>=4.51'") from None
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers parsing a file we do not control
        if isinstance(e, OSError) and e.errno is not None:
            from .errors import os_error_message

            raise MacftError(*os_error_message(e, f"reading {cfg_file}")) from None
        import transformers

        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MacftError(
            f"transformers {transformers.__version__} cannot read {cfg_file} "
            f"(model_type '{raw.get('model_type')}', architectures {raw.get('architectures')}): {first}",
            "If config.json was edited or damaged, restore it from the model's repository; for an "
            "architecture transformers does not know yet: pip install -U transformers, or pick a "
            "supported model (Gemma-3, Llama, Qwen, Mistral, GPT-NeoX, GPT-2, ...).") from None
    info = ModelInfo(path, raw, config)
    _check_dimensions(info, cfg_file)
    return info


def _check_dimensions(info: ModelInfo, cfg_file: Path) -> None:
    """The dimensions every command reads, as positive integers; else our error naming the file
    (a hand-edited or damaged config.json: ``"hidden_size": "64"``, ``null``, a list)."""
    bad = []
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size"):
        try:
            v = getattr(info, name)
            ok = v > 0
        except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError):
            ok = False
        if not ok:
            bad.append(name)
    if not bad:
        try:
            info.tied, info.block_linears, info.quantization  # noqa: B018 - read once to check
            ok = True
        except (TypeError, ValueError, AttributeError):
            bad.append("tie_word_embeddings / quantization")
    if bad:
        raise MacftError(f"{cfg_file} does not give valid values for {', '.join(bad)} "
                         f"(model_type '{info.model_type}'): positive integers are expected.",
                         "Restore the file from the model's repository.")


def model_info_from_dict(raw: dict[str, Any], path: Path | None = None) -> ModelInfo:
    """A :class:`ModelInfo` from a config dictionary (as config.json would hold it)."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    return ModelInfo(Path(path or "."), dict(raw), AutoConfig.for_model(raw["model_type"], **kwargs))
