"""PyTorch backend: hardware checks with injected facts, precision policy, bad input, import cost.

No GPU needed: every hardware situation is a :class:`HardwareFacts` value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cuda_backend import hardware
from cuda_backend.hardware import CUDA_TORCH_FIX, HardwareFacts, choose_precision, problems
from macft.model_info import ModelInfo


def _info(raw: dict) -> ModelInfo:
    """A ModelInfo as read_model_info builds it, from a config.json dictionary."""
    from transformers import AutoConfig

    rest = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    return ModelInfo(Path("config.json"), raw, AutoConfig.for_model(raw["model_type"], **rest))


GEMMA = _info({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]})
GEMMA_4B = _info({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                  "text_config": {"model_type": "gemma3_text"}, "vision_config": {}})
QWEN = _info({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})

CPU_BOX = HardwareFacts(torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False,
                        bitsandbytes=True, machine="x86_64", cpu_count=2)
WRONG_WHEEL = replace(CPU_BOX, nvidia_driver="/proc/driver/nvidia")
A100 = HardwareFacts(torch_version="2.13.0+cu128", torch_cuda="12.8", cuda_available=True,
                     gpu_name="NVIDIA A100-SXM4-40GB", gpu_capability=(8, 0), bf16_supported=True,
                     gpu_count=1, nvidia_driver="/proc/driver/nvidia", bitsandbytes=True)
T4 = replace(A100, gpu_name="Tesla T4", gpu_capability=(7, 5), bf16_supported=False)


def test_cpu_box_with_4bit_is_fine():
    assert problems("4bit", "auto", GEMMA, CPU_BOX) == []


def test_cpu_only_torch_on_an_nvidia_machine_names_the_pip_command():
    (msg,) = problems("none", "auto", GEMMA, WRONG_WHEEL)
    assert "CPU-only build" in msg and "/proc/driver/nvidia" in msg
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu128" in msg
    assert CUDA_TORCH_FIX in msg


def test_4bit_without_bitsandbytes():
    (msg,) = problems("4bit", "auto", GEMMA, replace(CPU_BOX, bitsandbytes=False))
    assert "bitsandbytes" in msg and "pip install" in msg
    assert problems("none", "auto", GEMMA, replace(CPU_BOX, bitsandbytes=False)) == []


@pytest.mark.parametrize("facts", [CPU_BOX, T4, A100], ids=["cpu", "t4", "a100"])
def test_fp16_refused_for_gemma_anywhere(facts):
    (msg,) = problems("none", "fp16", GEMMA, facts)
    assert "Gemma-3" in msg and "overflow" in msg and "--precision" in msg
    (msg4b,) = problems("4bit", "fp16", GEMMA_4B, facts)
    assert "Gemma-3" in msg4b


def test_fp16_gemma_known_by_name_before_the_config_is_read():
    (msg,) = problems("none", "fp16", None, T4, model_name="google/gemma-3-1b-it")
    assert "Gemma-3" in msg and "overflow" in msg


def test_fp16_refused_for_other_models_too():
    (msg,) = problems("none", "fp16", QWEN, T4)
    assert "loss scaling" in msg and "Gemma" not in msg


def test_bf16_on_a_gpu_without_bf16():
    (msg,) = problems("none", "bf16", GEMMA, T4)
    assert "Tesla T4" in msg and "7.5" in msg and "--precision fp32" in msg
    assert problems("none", "bf16", GEMMA, A100) == []


def test_precision_policy():
    assert choose_precision("auto", A100, GEMMA).name == "bf16"
    assert choose_precision("auto", A100, GEMMA).autocast
    assert choose_precision("fp32", A100, GEMMA).name == "fp32"
    p = choose_precision("auto", T4, GEMMA)
    assert p.name == "fp32" and not p.autocast and "Gemma-3" in p.note and "Tesla T4" in p.note
    cpu = choose_precision("auto", CPU_BOX, GEMMA)
    assert cpu.name == "fp32" and cpu.note is None
    assert "fp32" in choose_precision("bf16", CPU_BOX, GEMMA).note
    assert choose_precision("auto", A100, GEMMA).compute_dtype_name == "bfloat16"


def test_architectures():
    assert hardware.architecture_problem(GEMMA) is None
    assert hardware.architecture_problem(GEMMA_4B) is None
    not_lm = hardware.architecture_problem(_info({"model_type": "vit", "architectures": ["ViTModel"]}))
    assert "no causal language model class" in not_lm
    # (an unknown model_type never gets this far: read_model_info refuses it, see the CLI test)


def test_describe():
    assert hardware.describe(A100) == "NVIDIA A100-SXM4-40GB (CUDA 12.8)"
    assert hardware.describe(CPU_BOX) == "CPU (x86_64, 2 cores)"


def test_probe_on_this_machine():
    f = hardware.probe()
    assert f.torch_version
    if not f.cuda_available:
        assert f.gpu_name is None and not f.bf16_supported


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def fake_hardware(monkeypatch):
    def use(facts: HardwareFacts) -> None:
        monkeypatch.setattr(hardware, "probe", lambda: facts)
    return use


def test_cli_wrong_wheel_message(tiny_gemma, nya_dir, tmp_path, run_cli, fake_hardware):
    fake_hardware(WRONG_WHEEL)
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--output", tmp_path / "run")
    flat = " ".join(err.split())
    assert rc == 2
    assert "The 'cuda' backend cannot run here" in flat
    assert "pip uninstall -y torch && pip install torch --index-url" in flat
    assert not (tmp_path / "run").exists()


def test_cli_fp16_gemma_message(tiny_gemma, nya_dir, tmp_path, run_cli, fake_hardware):
    fake_hardware(T4)
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--precision", "fp16", "--output", tmp_path / "run")
    assert rc == 2 and "overflow" in " ".join(err.split())


def test_cli_unknown_architecture(nya_dir, tmp_path, run_cli, tiny_gemma):
    model = tmp_path / "weird"
    model.mkdir()
    for f in tiny_gemma.iterdir():  # a real tokenizer, an architecture nobody knows
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            (model / f.name).write_bytes(f.read_bytes())
    (model / "config.json").write_text(json.dumps({"model_type": "zorblax", "architectures": ["ZorblaxLM"]}))
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", model, "--data", nya_dir,
                         "--output", tmp_path / "run")
    flat = " ".join(err.split())
    assert rc == 2 and "zorblax" in flat and "pip install -U transformers" in flat


def test_unloadable_weights_message(tmp_path, tiny_gemma):
    """A known architecture whose weights are missing: transformers' error, rephrased."""
    from cuda_backend.model import load_base
    from macft.errors import MacftError

    model = tmp_path / "noweights"
    model.mkdir()
    (model / "config.json").write_text((tiny_gemma / "config.json").read_text())
    with pytest.raises(MacftError) as e:
        load_base(model, None, "none",
                  hardware.Precision("fp32", False), "cpu")
    assert "could not load" in str(e.value) and "safetensors" in str(e.value)


# --------------------------------------------------------------------------- import cost


def test_importing_the_backend_and_help_stay_light():
    code = (
        "import sys, contextlib, io\n"
        "import cuda_backend\n"
        "from macft.backends import get_backend\n"
        "get_backend('cuda')\n"
        "from macft.cli import main\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print([m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_torch_at_all():
    (msg,) = problems("none", "auto", GEMMA, replace(CPU_BOX, torch_version=None))
    assert "PyTorch is not installed" in msg and "pip install" in msg


def test_cpu_notes():
    assert hardware.cpu_note(A100) is None
    assert "No CUDA GPU" in hardware.cpu_note(CPU_BOX)
    broken = replace(A100, cuda_available=False, gpu_name=None)  # CUDA wheel, driver, no GPU seen
    assert "nvidia-smi" in hardware.cpu_note(broken) and "CUDA_VISIBLE_DEVICES" in hardware.cpu_note(broken)
