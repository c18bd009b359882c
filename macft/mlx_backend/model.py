"""Load an HF model into mlx-lm's model code, quantize the frozen base, add LoRA.

mlx-lm provides the architectures; macft maps the HF config explicitly because
mlx-lm reads ``rope_theta`` / ``rope_scaling`` / ``sliding_window_pattern`` while
transformers 5 saves ``rope_parameters`` and ``layer_types`` instead (a Gemma-3 4B
config re-saved by transformers 5 would silently lose its linear x8 rope scaling).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MacftError

# Architectures macft tests with MLX; others mlx-lm knows are allowed with a note.
TESTED = ("gemma3_text", "gemma3", "llama", "mistral", "qwen2", "qwen3")
GROUP_SIZE = 64


@dataclass
class LoadedModel:
    model: nn.Module
    config: dict[str, Any]
    model_type: str
    prequantized: dict[str, Any] | None
    quantized: list[str] = field(default_factory=list)  # mlx module paths
    unquantized: list[str] = field(default_factory=list)  # left in full precision (width)
    lora_modules: list[str] = field(default_factory=list)  # mlx module paths with LoRA
    notes: list[str] = field(default_factory=list)


def mlx_model_type(config: dict[str, Any]) -> str:
    from mlx_lm.utils import MODEL_REMAPPING

    mt = config.get("model_type", "")
    return MODEL_REMAPPING.get(mt, mt)


def architecture_problem(config: dict[str, Any]) -> str | None:
    mt = config.get("model_type")
    if not mt:
        return "config.json has no model_type"
    target = mlx_model_type(config)
    if importlib.util.find_spec(f"mlx_lm.models.{target}") is None:
        return (f"mlx-lm has no model code for architecture '{mt}' "
                f"(architectures: {config.get('architectures')}); MLX-supported families include "
                f"{', '.join(TESTED)}. Use --backend cuda, or a model of a supported family.")
    return None


def hf_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm config keys derived from transformers-5 style fields."""

    def rope_keys(rp: dict[str, Any], theta_key: str = "rope_theta") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "rope_theta" in rp:
            out[theta_key] = rp["rope_theta"]
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype and rtype != "default":
            scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
            scaling["type"] = rtype
            scaling["rope_type"] = rtype
            out["rope_scaling"] = scaling
        return out

    def text_overrides(tc: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rp = tc.get("rope_parameters")
        if isinstance(rp, dict):
            if "full_attention" in rp or "sliding_attention" in rp:  # per layer type (Gemma-3)
                out.update(rope_keys(rp.get("full_attention") or {}))
                local = rp.get("sliding_attention") or {}
                if "rope_theta" in local:
                    out["rope_local_base_freq"] = local["rope_theta"]
            else:
                out.update(rope_keys(rp))
        lt = tc.get("layer_types")
        if isinstance(lt, list) and "full_attention" in lt and tc.get("model_type", "").startswith("gemma3"):
            out["sliding_window_pattern"] = lt.index("full_attention") + 1
        elif "_sliding_window_pattern" in tc and "sliding_window_pattern" not in tc:
            out["sliding_window_pattern"] = tc["_sliding_window_pattern"]
        return out

    if isinstance(config.get("text_config"), dict):
        tc = dict(config["text_config"])
        tc.update(text_overrides(tc))
        return {"text_config": tc}
    return text_overrides(config)


def load(path: Path, dtype: Any) -> LoadedModel:
    """Load weights (HF safetensors or an mlx-community quantized model) in ``dtype``."""
    from mlx_lm.utils import load_config, load_model

    config = load_config(path)
    problem = architecture_problem(config)
    if problem:
        raise MacftError(f"{path}: {problem}")
    try:
        model, config = load_model(path, model_config=hf_overrides(config))
    except FileNotFoundError as e:
        raise MacftError(f"{path}: {e}", "The model directory needs its *.safetensors weight files.") from None
    except ValueError as e:
        raise MacftError(f"mlx-lm could not load {path}: {e}") from None
    preq = config.get("quantization")
    if not preq:
        # Cast the (frozen) base to the compute dtype; quantized checkpoints keep their packing.
        model.set_dtype(dtype)
    model.freeze()
    return LoadedModel(model, config, mlx_model_type(config), preq)


def quantize(lm: LoadedModel, bits: int) -> None:
    """Quantize the frozen base in memory; layers whose width does not divide the group stay."""
    if lm.prequantized:
        q = lm.prequantized
        raise MacftError(
            f"The model is already quantized ({q.get('bits')}-bit, group size {q.get('group_size')}); "
            f"--quantize {bits}bit would quantize it twice.",
            "Drop --quantize (LoRA on a quantized base is QLoRA already), or start from the 16-bit model.")
    skipped: list[str] = []
    done: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % GROUP_SIZE != 0:
            skipped.append(path)
            return False
        done.append(path)
        return True

    nn.quantize(lm.model, group_size=GROUP_SIZE, bits=bits, class_predicate=predicate)
    lm.quantized, lm.unquantized = done, skipped
    if skipped:
        lm.notes.append(f"{len(skipped)} layer(s) left unquantized (width not a multiple of "
                        f"{GROUP_SIZE}): {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}")


def resolve_lora_keys(model: nn.Module, targets: list[str], num_layers: int) -> tuple[list[str], list[int]]:
    """Module keys inside a transformer block (``self_attn.q_proj``) to adapt, and the block ids.

    ``all-linear`` means every linear layer of the attention and MLP blocks.
    """
    layers = model.layers
    n = len(layers)
    use = list(range(n)) if num_layers in (-1, 0) or num_layers >= n else list(range(n - num_layers, n))
    linear_types = (nn.Linear, nn.QuantizedLinear)
    found: list[str] = [k for k, m in layers[0].named_modules() if isinstance(m, linear_types)]
    if "all-linear" in targets:
        keys = [k for k in found if k.split(".")[0] in ("self_attn", "mlp", "attention", "feed_forward")]
    else:
        keys = [k for k in found if k.split(".")[-1] in targets or k in targets]
        missing = [t for t in targets if not any(k.split(".")[-1] == t or k == t for k in found)]
        if missing:
            raise MacftError(f"--lora-targets names modules this model does not have: {', '.join(missing)}.",
                             f"Linear layers in each block: {', '.join(found)} (or use all-linear).")
    if not keys:
        raise MacftError("No linear layer to adapt was found in the model's blocks.",
                         "Set --lora-targets to module names such as q_proj,v_proj.")
    return keys, use


def add_lora(lm: LoadedModel, rank: int, alpha: float, dropout: float, targets: list[str],
             num_layers: int) -> tuple[list[str], list[int]]:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys, use = resolve_lora_keys(lm.model, targets, num_layers)
    linear_to_lora_layers(lm.model, len(use), {"rank": rank, "scale": alpha / rank,
                                               "dropout": dropout, "keys": keys})
    from mlx_lm.tuner.lora import LoRALinear

    lm.lora_modules = [name for name, m in lm.model.named_modules() if isinstance(m, LoRALinear)]
    return keys, use


def count_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
        if isinstance(m, nn.QuantizedLinear) or isinstance(m, nn.QuantizedEmbedding):
            total += m.weight.size * 32 // m.bits
        else:
            total += sum(v.size for _, v in tree_flatten(m.parameters()))
    return trainable, total


def hf_module_name(mlx_name: str, model_type: str) -> str:
    """mlx-lm module path -> the HF (PEFT) module path of the same layer."""
    if model_type == "gemma3" and mlx_name.startswith("language_model.model."):
        # Gemma3ForConditionalGeneration (transformers 5): model.language_model.layers...
        return "model.language_model." + mlx_name[len("language_model.model."):]
    return mlx_name


def mx_dtype(name: str) -> Any:
    return {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[name]
