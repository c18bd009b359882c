"""Load the base model (optionally 4/8-bit with bitsandbytes) and add seeded LoRA.

- ``AutoModelForCausalLM`` picks the class from config.json. For Gemma-3 4B and
  up that is ``Gemma3ForConditionalGeneration``: LoRA then goes on the text part
  only (``model.language_model``), and the vision tower and projector stay
  unquantized (they are not trained, and export keeps them as they were).
- 4-bit: NF4, double quantization, compute dtype bf16 on GPUs with bf16, else fp32
  (QLoRA, as in the QLoRA paper). 8-bit: LLM.int8. ``prepare_model_for_kbit_training``
  then freezes the base and casts its remaining 16-bit weights (norms, embeddings)
  to fp32 for stable training.
- LoRA targets are resolved to exact module names here (see :func:`resolve_targets`)
  so the layers trained, the adapter written and the adapter PEFT reloads agree. The
  adapter names every module by its full path in transformers' module tree
  (``transformer.h.0.attn.c_attn``), on every architecture.
- GPT-2's projections are ``Conv1D`` layers, whose weights are stored [in, out]: PEFT
  adapts them with ``fan_in_fan_out=True``, and the adapter says so. Quantized,
  transformers turns them into bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` holding the
  transposed ([out, in]) weight, which LoRA adapts like any linear layer; the adapter still
  says ``fan_in_fan_out`` because it belongs to the 16-bit checkpoint, where they are Conv1D.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macft.adapter import AdapterSpec
from macft.config import RunConfig
from macft.errors import MacftError
from macft.model_info import ModelInfo, read_model_info
from macft.run import write_quantization

from .hardware import Precision

NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights; recorded from the weights
# Never quantized: not trained, and export keeps them as they were.
MULTIMODAL_SKIP = ["vision_tower", "multi_modal_projector", "audio_tower", "lm_head"]
# Module-name parts that mark a non-text tower; LoRA never goes there.
NON_TEXT = ("vision_tower", "vision_model", "multi_modal_projector", "audio_tower", "visual")


@dataclass
class LoadedModel:
    model: Any  # peft.PeftModel
    lora_modules: dict[str, Any]  # HF module name -> peft LoRA layer
    spec: AdapterSpec
    quant_record: dict[str, Any] | None


def quantization_config(quantize: str, precision: Precision, multimodal: bool) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    # None lets transformers skip its defaults (lm_head, tied weights); a list replaces them.
    skip = MULTIMODAL_SKIP if multimodal else None
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision.name == "bf16" else torch.float32,
            llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base(path: Path, model_info: ModelInfo | None, quantize: str, precision: Precision,
              device: str) -> Any:
    """The base model, as ``AutoModelForCausalLM`` builds it (``model_info`` None: read here)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        # bf16 base on bf16 GPUs (half the memory); fp32 on CPUs and fp16-only GPUs
        "dtype": torch.bfloat16 if precision.name == "bf16" else torch.float32,
        "attn_implementation": "sdpa",
    }
    if quantize in ("4bit", "8bit"):
        info = model_info or read_model_info(path)
        kwargs["quantization_config"] = quantization_config(quantize, precision, info.multimodal)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MacftError(
            f"transformers could not load {path} as a causal language model: {first}",
            "Check that the directory holds a complete Hugging Face checkpoint of a text-generation "
            "model (config.json + *.safetensors); for new architectures: pip install -U transformers.",
        ) from None
    if "quantization_config" not in kwargs:
        model.to(device)
    elif device == "cpu":
        no_cpu_repacking(model)
    return model


def no_cpu_repacking(model: Any) -> None:
    """Keep bitsandbytes' 4-bit layers on the path training uses, on CPUs with AVX512-BF16.

    There, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight for a bf16 kernel the first
    time it runs in eval mode without gradients (our validation passes), for good. Measured
    after such a pass: logits off by ~0.07 (bf16), no gradient flows back through the layer
    (the kernel has no autograd: earlier layers' LoRA then trains on wrong gradients,
    silently), and layers with a bias (GPT-2) fail with "a view of a leaf Variable that
    requires grad is being used in an in-place operation".
    """
    for mod in model.modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------- LoRA targets


@dataclass
class Targets:
    modules: list[str]  # exact HF module names that get LoRA, sorted: the adapter's target_modules
    layers: list[int]  # indices of the decoder blocks adapted
    fan_in_fan_out: bool  # the checkpoint stores these weights [in, out] (GPT-2's Conv1D)
    conv1d: bool  # ... and they are Conv1D modules in this model (not quantized)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):  # GPT-2's projections
        return True
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; this catches other wrappers
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _stored_in_out(module: Any) -> bool:
    """Whether the checkpoint holds this layer's weight as [in, out]: a Conv1D, or a
    bitsandbytes layer transformers built from one (it records the class in ``source_cls``)."""
    conv1d = _conv1d_class()
    if conv1d is None:
        return False
    source = getattr(module, "source_cls", None)
    return isinstance(module, conv1d) or (isinstance(source, type) and issubclass(source, conv1d))


def _decoder_layers(model: Any) -> tuple[str, Any]:
    """(module name of the text decoder's block list, the ModuleList)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if any(p in name for p in NON_TEXT):
                continue
            candidates.append((name, mod))
    if decoder is not None:
        for name, mod in candidates:
            if any(mod is m for m in decoder.modules()):
                return name, mod
    if len(candidates) == 1:
        return candidates[0]
    raise MacftError(f"Could not find the transformer blocks of {type(model).__name__} "
                     f"(candidates: {[n for n, _ in candidates] or 'none'}).",
                     "This architecture is not supported yet by macft's cuda backend.")


def _matches(target: str, sub: str) -> bool:
    """``q_proj`` matches ``self_attn.q_proj``; ``attn.c_proj`` matches ``attn.c_proj`` but
    not ``mlp.c_proj`` (GPT-2 has both)."""
    return sub == target or sub.endswith("." + target)


def resolve_targets(model: Any, targets: list[str], last_n_layers: int) -> Targets:
    """Exact modules for ``lora.targets`` / ``lora.layers``.

    ``all-linear``: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, their bitsandbytes
    replacements) inside the text decoder's blocks: every attention and MLP projection,
    never a vision tower. Named targets: linear layers in those blocks whose path ends with
    the name (``q_proj``, ``c_attn``, ``attn.c_proj``). ``last_n_layers`` -1: all blocks, else
    the last N.

    The adapter lists the modules by full path (``model.language_model.layers.0.self_attn.q_proj``)
    with no ``layers_to_transform``: unambiguous on every architecture, where a short name
    could also match a vision tower's layer or depend on the block list's name.
    """
    prefix, blocks = _decoder_layers(model)
    n = len(blocks)
    chosen = list(range(n)) if last_n_layers == -1 else list(range(max(0, n - last_n_layers), n))
    want_all = any(t == "all-linear" for t in targets)
    wanted = [t for t in targets if t != "all-linear"]
    modules: list[str] = []
    in_out: list[bool] = []
    conv: list[bool] = []
    found: set[str] = set()
    available: set[str] = set()
    conv1d = _conv1d_class()
    for i in chosen:
        for sub, mod in blocks[i].named_modules():
            if not sub or not _is_linear(mod):
                continue
            available.add(sub.split(".")[-1])
            hit = [t for t in wanted if _matches(t, sub)]
            if want_all or hit:
                found.update(hit)
                modules.append(f"{prefix}.{i}.{sub}")
                in_out.append(_stored_in_out(mod))
                conv.append(conv1d is not None and isinstance(mod, conv1d))
    missing = [t for t in wanted if t not in found]
    if missing or not modules:
        raise MacftError(
            f"LoRA target(s) {', '.join(missing or targets)} match no linear layer in "
            f"the model's blocks; they have: {', '.join(sorted(available)) or 'none'}.",
            "Use --lora-targets all-linear, or names from that list.")
    if len(set(in_out)) > 1:
        # one fan_in_fan_out flag per adapter (PEFT's LoraConfig): no known causal LM mixes them
        raise MacftError(
            f"The chosen LoRA targets of {type(model).__name__} mix Conv1D layers (weights stored "
            f"[in, out]: {', '.join(m for m, f in zip(modules, in_out) if f)[:200]}) and linear "
            "layers; one adapter cannot describe both.",
            "Pick targets of one kind with --lora-targets.")
    order = sorted(range(len(modules)), key=lambda k: modules[k])
    return Targets([modules[k] for k in order], chosen, in_out[0], any(conv))


def apply_lora(model: Any, cfg: RunConfig, targets: Targets) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    # LoRA's A matrices are random (Kaiming); the same seed gives every process, and
    # every rerun, the same start.
    torch.manual_seed(cfg.train.seed)
    lcfg = LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(targets.modules), bias="none", task_type="CAUSAL_LM",
        # True on Conv1D layers; PEFT's bitsandbytes layers ignore it (their weight is [out, in])
        fan_in_fan_out=targets.conv1d)
    # autocast_adapter_dtype (default True) keeps LoRA weights in fp32 over a 16-bit base.
    with warnings.catch_warnings():  # peft asks the v5-deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lcfg)


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs, no hooks needed)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_for_training(cfg: RunConfig, model_path: Path, model_info: ModelInfo | None,
                      precision: Precision, device: str) -> LoadedModel:
    quantize = cfg.model.quantize
    model = load_base(model_path, model_info, quantize, precision, device)
    record = quant_record(model, quantize, precision) if quantize in ("4bit", "8bit") else None
    if quantize in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():  # peft calls the v5-deprecated checkpointing alias
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.train.grad_checkpoint,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.train.grad_checkpoint:
        enable_checkpointing(model)
    model.config.use_cache = False  # never build a KV cache while training (and packing needs it off)
    targets = resolve_targets(model, cfg.lora.targets, cfg.lora.layers)
    peft_model = apply_lora(model, cfg, targets)
    wanted = set(targets.modules)
    lora_modules = {name: mod for name, mod in peft_model.base_model.model.named_modules()
                    if name in wanted}
    if set(lora_modules) != wanted:
        raise MacftError("peft did not add LoRA to every resolved module "
                         f"({len(lora_modules)} of {len(targets.modules)}).",
                         "Report this with the model's config.json.")
    spec = AdapterSpec(base_model=str(cfg.model.name), rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       dropout=cfg.lora.dropout, target_modules=list(targets.modules),
                       layers=None, fan_in_fan_out=targets.fan_in_fan_out)
    return LoadedModel(peft_model, lora_modules, spec, record)


# --------------------------------------------------------------------------- quantization record


def quant_record(model: Any, quantize: str, precision: Precision) -> dict[str, Any]:
    """What export needs to rebuild the base exactly as training saw it: the method and
    its parameters, and the linear layers left unquantized and those quantized, by HF name."""
    unquantized, quantized, blocksize, nested = [], [], None, None
    for name, mod in model.named_modules():
        if not _is_linear(mod):
            continue
        if type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            quantized.append(name)
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None and blocksize is None:
                blocksize, nested = int(qs.blocksize), bool(qs.nested)
        else:
            unquantized.append(name)
    common = {
        "compute_dtype": precision.compute_dtype_name,
        # the dtype the weights had when bitsandbytes quantized them (the load dtype)
        "dtype": precision.compute_dtype_name,
        "unquantized": sorted(unquantized),
        "quantized": sorted(quantized),
    }
    if quantize == "4bit":
        return {"method": "bnb-nf4", "double_quant": bool(nested if nested is not None else True),
                "blocksize": blocksize or NF4_BLOCKSIZE, **common}
    qc = getattr(model.config, "quantization_config", None)
    threshold = qc.get("llm_int8_threshold") if isinstance(qc, dict) else getattr(qc, "llm_int8_threshold", None)
    return {"method": "bnb-int8", "threshold": float(threshold if threshold is not None else 6.0),
            **common}


def write_quant_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_quantization(run_dir, record)
