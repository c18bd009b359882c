"""Load an HF model into mlx-lm's model code, quantize the frozen base, add LoRA.

mlx-lm provides the architectures; what macft maps for each of them (config fields,
weight names, module names, replaced modules) is in :mod:`.architectures`. The model is
built from that mapping alone, never from config.json as mlx-lm would read it: a sparse
or old-keyed config (Gemma-3 4B, GPT-NeoX of transformers 4.26) would silently give
mlx-lm's defaults, and transformers 5's ``rope_parameters`` are invisible to it (a
Gemma-3 4B would lose its linear x8 rope scaling).
"""

from __future__ import annotations

import glob
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..adapter import AdapterSpec
from ..errors import MacftError
from ..model_info import ModelInfo, read_model_info
from .architectures import Arch, mlx_args
from .supported import SUPPORTED

GROUP_SIZE = 64


@dataclass
class LoadedModel:
    model: nn.Module
    info: ModelInfo
    arch: Arch
    prequantized: dict[str, Any] | None  # an mlx-community checkpoint's quantization block
    quantized: list[str] = field(default_factory=list)  # mlx module paths
    unquantized: list[str] = field(default_factory=list)  # left in full precision (width)
    lora_modules: list[str] = field(default_factory=list)  # mlx module paths with LoRA
    notes: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return self.arch.model_type

    def hf_name(self, mlx_name: str) -> str:
        """The module's path in transformers 5's AutoModelForCausalLM (what PEFT names)."""
        return self.arch.names.to_hf(mlx_name)

    def mlx_name(self, hf_name: str) -> str:
        return self.arch.names.to_mlx(hf_name)


def _cuda_hint(info: ModelInfo) -> str:
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal,
        )
    except ImportError:  # without transformers nothing but mlx-lm could train it anyway
        causal = {}
    cls = causal.get(info.model_type)
    if cls:
        return f"Use --backend cuda (PyTorch: transformers' {cls} trains it)."
    return "transformers has no causal language model class for it either, so macft cannot fine-tune it."


def architecture_problem(info: ModelInfo) -> str | None:
    """None when MLX computes this model as transformers does; else a one-line refusal.
    Reads only the config: called before any weight is loaded."""
    arch, _, problems = mlx_args(info)
    if arch is None:
        return (f"the MLX backend cannot train {info.describe()}: macft trains these on MLX: "
                f"{', '.join(SUPPORTED)}. {_cuda_hint(info)}")
    if problems:
        return (f"the MLX backend cannot train this {info.describe()} checkpoint: macft's MLX mapping does "
                f"not cover {'; '.join(problems)}. {_cuda_hint(info)}")
    return None


def mlx_quantization(info: ModelInfo) -> dict[str, Any] | None:
    """The ``quantization`` block of an MLX-quantized (mlx-community) checkpoint."""
    for d in (info.raw, info.raw.get("text_config") or {}):
        if isinstance(d.get("quantization"), dict):
            return d["quantization"]
    return None


def quantization_problem(info: ModelInfo, quantize: str) -> str | None:
    q = info.quantization
    if not q:
        return None
    if mlx_quantization(info) is None:
        return (f"the model is quantized for transformers ({q.get('quant_method', 'unknown method')}); MLX "
                "loads 16/32-bit or MLX-quantized (mlx-community) weights: use the unquantized model "
                "(add --quantize 4bit for QLoRA), or --backend cuda")
    if quantize != "none":
        return (f"the model is already quantized ({q.get('bits')}-bit); --quantize {quantize} would quantize "
                "it twice: drop --quantize (training on it is QLoRA already)")
    return None


def _read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin"))[:3]
        raise MacftError(
            f"{path} has no model*.safetensors weight files{f' (only {other})' if other else ''}; "
            "MLX reads safetensors only.",
            "Pass the model's directory (or hub id) to macft as --model: it converts "
            "pytorch_model*.bin weights to safetensors once, at start (macft.models.resolve_model_path).")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def _prequantize(model: nn.Module, q: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turn the layers an mlx-community checkpoint stores packed into quantized layers, as
    mlx-lm's load does (per-layer overrides in the block, else read from the packing)."""
    from mlx_lm.utils import infer_quant_config

    def predicate(p: str, m: nn.Module) -> Any:
        if p in q:
            return q[p]
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return infer_quant_config(p, m, weights)

    nn.quantize(model, group_size=q.get("group_size", GROUP_SIZE), bits=q.get("bits", 4),
                mode=q.get("mode", "affine"), class_predicate=predicate)


def build(info: ModelInfo) -> tuple[nn.Module, Arch]:
    """mlx-lm's model for ``info``, from macft's mapping of the config (weights uninitialised)."""
    arch, args, _ = mlx_args(info)
    problem = architecture_problem(info)
    if problem or arch is None:
        raise MacftError(f"{info.path}: {problem}")
    code = importlib.import_module(f"mlx_lm.models.{arch.mlx_type}")
    model = code.Model(code.ModelArgs.from_dict(args))
    if arch.patch:
        arch.patch(model, info)
    return model, arch


def load(path: Path, dtype: Any, info: ModelInfo | None = None) -> LoadedModel:
    """Load HF safetensors (any published naming) or an mlx-community quantized model; the
    floating-point weights are cast to ``dtype`` (bf16/fp16 on disk -> fp32 on a CPU)."""
    path = Path(path)
    info = info or read_model_info(path)
    model, arch = build(info)
    weights = arch.rename(_read_weights(path), info)
    if hasattr(model, "sanitize"):
        try:
            weights = model.sanitize(weights)
        except KeyError as e:
            raise MacftError(f"The weights in {path} lack {e}, which {info.describe()} needs.",
                             "Check that the directory holds all of the model's *.safetensors files.") from None
    preq = mlx_quantization(info)
    if preq:
        _prequantize(model, preq, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MacftError(f"The weights in {path} do not fit {info.describe()} as its config.json "
                         f"describes it: {' '.join(str(e).split())[:600]}",
                         "Check that config.json belongs to these weights.") from None
    if not preq:
        # Cast the (frozen) base to the compute dtype; quantized checkpoints keep their packing.
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.freeze()
    return LoadedModel(model, info, arch, preq)


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
    """Module keys inside a transformer block (``self_attn.q_proj``, ``attn.c_attn``) to
    adapt, and the block ids.

    ``all-linear`` means every linear layer of the blocks (attention and MLP projections;
    never the embeddings or the output layer). A named target matches a key's last parts:
    ``c_proj`` both of GPT-2's, ``mlp.c_proj`` one.
    """
    layers = model.layers
    n = len(layers)
    use = list(range(n)) if num_layers in (-1, 0) or num_layers >= n else list(range(n - num_layers, n))
    linear_types = (nn.Linear, nn.QuantizedLinear)
    found: list[str] = [k for k, m in layers[0].named_modules() if isinstance(m, linear_types)]

    def match(k: str, t: str) -> bool:
        return k == t or k.endswith("." + t)

    if "all-linear" in targets:
        keys = found
    else:
        keys = [k for k in found if any(match(k, t) for t in targets)]
        missing = [t for t in targets if not any(match(k, t) for k in found)]
        if missing:
            raise MacftError(f"--lora-targets names modules this model does not have: {', '.join(missing)}.",
                             f"Linear layers in each block: {', '.join(sorted(found))} (or use all-linear).")
    if not keys:
        raise MacftError("No linear layer to adapt was found in the model's blocks.",
                         "Set --lora-targets to module names such as q_proj,v_proj.")
    return sorted(keys), use


def add_lora(lm: LoadedModel, rank: int, alpha: float, dropout: float, targets: list[str],
             num_layers: int) -> tuple[list[str], list[int]]:
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys, use = resolve_lora_keys(lm.model, targets, num_layers)
    linear_to_lora_layers(lm.model, len(use), {"rank": rank, "scale": alpha / rank,
                                               "dropout": dropout, "keys": keys})
    lm.lora_modules = [name for name, m in lm.model.named_modules() if isinstance(m, LoRALinear)]
    return keys, use


def lora_weights(lm: LoadedModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF module path -> (A [r, in], B [out, r]) in PEFT orientation. mlx-lm keeps
    ``lora_a`` [in, r] and ``lora_b`` [r, out] on Linear weights [out, in]; GPT-2's Conv1D
    weights are [out, in] here too (mlx-lm's sanitize transposes them), and PEFT's Conv1D
    LoRA keeps the same A/B orientation (only its merge transposes), so one rule fits all."""
    out = {}
    for name in lm.lora_modules:
        mod = lm.model
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        a = np.array(mod.lora_a.astype(mx.float32)).T
        b = np.array(mod.lora_b.astype(mx.float32)).T
        out[lm.hf_name(name)] = (a, b)
    return out


def adapter_spec(lm: LoadedModel, base_model: str, rank: int, alpha: float, dropout: float) -> AdapterSpec:
    """The PEFT adapter's config: targets by full module path, so PEFT attaches LoRA to exactly
    these modules (never, say, the same-named projections of Gemma-3's vision tower)."""
    return AdapterSpec(base_model=base_model, rank=rank, alpha=alpha, dropout=dropout,
                       target_modules=sorted(lm.hf_name(n) for n in lm.lora_modules), layers=None,
                       fan_in_fan_out=lm.arch.fan_in_fan_out)


def count_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)):
        if isinstance(m, nn.QuantizedLinear) or isinstance(m, nn.QuantizedEmbedding):
            total += m.weight.size * 32 // m.bits
        else:
            total += sum(v.size for _, v in tree_flatten(m.parameters()))
    return trainable, total


def mx_dtype(name: str) -> Any:
    return {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}[name]
