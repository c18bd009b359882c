"""What this machine can do, and what the PyTorch backend refuses or adapts to.

The facts (:class:`HardwareFacts`) are gathered once by :func:`probe`; every
decision below is a plain function of the facts and the config, so tests inject
facts ("an fp16-only T4", "an NVIDIA driver but a CPU-only torch wheel") without
owning that hardware.

Precision policy (:func:`choose_precision`):

- CUDA GPU with bf16 (Ampere and newer): bf16 autocast over a bf16 (or 4/8-bit)
  base; LoRA weights and optimizer state stay fp32.
- CUDA GPU without bf16 (T4, V100, ...): fp32. Gemma's activations overflow
  fp16 (:func:`macft.model_info.fp16_problem`), and fp16 for other models would need
  loss scaling, which this backend does not do, so fp16 is refused outright.
- CPU: fp32 always; bf16 matmuls run 10-60x slower than fp32 on CPUs without
  AVX512-BF16 (FIELD-NOTES).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from macft.model_info import fp16_problem, fp16_unsafe_family

if TYPE_CHECKING:
    from macft.model_info import ModelInfo

# The CUDA build of torch that matches current NVIDIA drivers (CUDA 12.8 runtime).
CUDA_WHEEL_INDEX = "https://download.pytorch.org/whl/cu128"
# `pip install torch` alone is a no-op when the CPU wheel is installed ("Requirement
# already satisfied"), hence the uninstall first.
CUDA_TORCH_FIX = f"pip uninstall -y torch && pip install torch --index-url {CUDA_WHEEL_INDEX}"
BNB_FIX = "pip install 'bitsandbytes>=0.45'"


@dataclass(frozen=True)
class HardwareFacts:
    torch_version: str | None  # None: torch is not installed
    torch_cuda: str | None  # torch.version.cuda; None for a CPU-only build
    cuda_available: bool
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    bf16_supported: bool = False
    gpu_count: int = 0
    nvidia_driver: str | None = None  # how an NVIDIA driver was seen, or None
    bitsandbytes: bool = False
    machine: str = ""
    cpu_count: int = 1


def probe() -> HardwareFacts:
    """Look at this machine (imports torch)."""
    import importlib.util

    try:
        import torch
    except ImportError:  # problems() turns this into the install command
        return HardwareFacts(torch_version=None, torch_cuda=None, cuda_available=False,
                             nvidia_driver=nvidia_driver_seen(), machine=platform.machine(),
                             cpu_count=os.cpu_count() or 1)

    name = cap = None
    bf16 = False
    count = 0
    avail = torch.cuda.is_available()
    if avail:
        count = torch.cuda.device_count()
        idx = torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        cap = tuple(torch.cuda.get_device_capability(idx))
        bf16 = bool(torch.cuda.is_bf16_supported())
    return HardwareFacts(
        torch_version=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=avail,
        gpu_name=name, gpu_capability=cap, bf16_supported=bf16, gpu_count=count,  # type: ignore[arg-type]
        nvidia_driver=nvidia_driver_seen(),
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        machine=platform.machine(), cpu_count=os.cpu_count() or 1)


def nvidia_driver_seen() -> str | None:
    """Evidence of an NVIDIA GPU that does not depend on torch: the kernel driver or nvidia-smi."""
    if os.path.exists("/proc/driver/nvidia"):
        return "/proc/driver/nvidia"
    smi = shutil.which("nvidia-smi")
    return smi


def describe(f: HardwareFacts) -> str:
    if f.cuda_available and f.gpu_name:
        extra = f" x{f.gpu_count}" if f.gpu_count > 1 else ""
        return f"{f.gpu_name}{extra} (CUDA {f.torch_cuda})"
    return f"CPU ({f.machine or 'unknown'}, {f.cpu_count} cores)"


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" or "fp32"
    autocast: bool  # bf16 autocast around forward passes
    note: str | None = None  # said once to the user when the choice is not the obvious one

    @property
    def compute_dtype_name(self) -> str:
        return "bfloat16" if self.name == "bf16" else "float32"


def choose_precision(requested: str, facts: HardwareFacts, model_info: ModelInfo | None) -> Precision:
    """The compute precision for a config that :func:`problems` accepted."""
    if not facts.cuda_available:
        note = None
        if requested in ("bf16", "fp16"):
            note = (f"--precision {requested} ignored on the CPU: computing in fp32 "
                    "(bf16/fp16 matmuls are 10-60x slower than fp32 on CPUs).")
        return Precision("fp32", False, note)
    if requested == "fp32":
        return Precision("fp32", False)
    if facts.bf16_supported:
        return Precision("bf16", True)
    unsafe = fp16_unsafe_family(model_info)
    why = f"{unsafe}'s activations overflow fp16" if unsafe else "fp16 would need loss scaling"
    return Precision("fp32", False,
                     f"{facts.gpu_name} has no bf16 support: computing in fp32 ({why}). "
                     "Expect about twice the memory and time of a bf16 GPU.")


def cpu_note(facts: HardwareFacts) -> str | None:
    """The one message for training on the CPU (None when a GPU is used)."""
    if facts.cuda_available:
        return None
    if facts.torch_cuda and facts.nvidia_driver:
        return (f"torch {facts.torch_version} is a CUDA build and an NVIDIA driver is present "
                f"({facts.nvidia_driver}), but torch sees no usable GPU (check `nvidia-smi`, the "
                "driver version and CUDA_VISIBLE_DEVICES): training on the CPU in fp32, slowly.")
    return "No CUDA GPU: training on the CPU in fp32. Slow; fine for tiny models and tests."


# --------------------------------------------------------------------------- problems


def problems(quantize: str, precision: str, model_info: ModelInfo | None,
             facts: HardwareFacts, model_name: str | None = None) -> list[str]:
    """Everything that keeps this backend from running here; each line says what was
    found, what is expected and the exact fix. ``model_info`` is None in the early
    check (before any download): the model's family is then guessed from its name."""
    out: list[str] = []
    if facts.torch_version is None:
        return [f"PyTorch is not installed. Fix: pip install 'macft[cuda]' (on an NVIDIA "
                f"machine first: pip install torch --index-url {CUDA_WHEEL_INDEX})"]
    if facts.torch_cuda is None and facts.nvidia_driver:
        out.append(
            f"this machine has an NVIDIA GPU (found {facts.nvidia_driver}) but torch "
            f"{facts.torch_version} is a CPU-only build (torch.version.cuda is None), so "
            f"training would run on the CPU. Fix: {CUDA_TORCH_FIX}")
    if quantize in ("4bit", "8bit") and not facts.bitsandbytes:
        out.append(f"--quantize {quantize} needs the bitsandbytes package, which is not installed. "
                   f"Fix: {BNB_FIX} (or train without --quantize)")
    if precision == "fp16":
        refused = fp16_problem(model_info, model_name)
        if refused:
            out.append(f"{refused}. Fix: --precision auto (bf16 where the GPU supports it, else fp32) "
                       "or --precision fp32")
        else:
            out.append("--precision fp16 is not supported by the cuda backend (it would need "
                       "loss scaling). Fix: --precision auto (bf16 where the GPU supports it, "
                       "else fp32) or --precision fp32")
    if precision == "bf16" and facts.cuda_available and not facts.bf16_supported:
        cap = ".".join(map(str, facts.gpu_capability)) if facts.gpu_capability else "?"
        out.append(f"--precision bf16 was asked for, but {facts.gpu_name} (compute capability "
                   f"{cap}) has no bf16 support (it needs 8.0, Ampere, or newer). "
                   "Fix: --precision fp32 (or auto, which picks fp32 here)")
    if model_info is not None:
        arch = architecture_problem(model_info)
        if arch:
            out.append(arch)
    return out


def architecture_problem(model_info: ModelInfo) -> str | None:
    """None if transformers can build a causal LM for this model, else why not. (A
    model_type transformers does not know is refused earlier, by ``read_model_info``.)"""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return "the transformers package is missing. Fix: pip install 'transformers>=4.51'"
    mt = model_info.model_type
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(model_info.architectures) or "none listed"
        return (f"transformers has no causal language model class for model_type '{mt}' "
                f"(architectures: {archs}); macft fine-tunes text generation models only. "
                "Fix: pick a causal LM (Gemma-3, Llama, Qwen, GPT-NeoX, GPT-2, ...)")
    return None
