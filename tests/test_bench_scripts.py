"""The benchmark scripts' own logic, without running them: bench/gpu_check.sh is only ever run
on a rented GPU, where a typo costs the whole rental, and bench/torch_vs_hf_trainer.py's FLOP
count and MFU table decide the numbers it reports."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "bench" / "gpu_check.sh"


def _bench():
    spec = importlib.util.spec_from_file_location("torch_vs_hf_trainer", REPO / "bench" / "torch_vs_hf_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


b = _bench()


# --------------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_is_valid_bash_and_refuses_unknown_arguments():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    p = subprocess.run(["bash", str(GPU_CHECK), "--dryrun"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown argument '--dryrun'" in p.stderr
    p = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--dry-run" in p.stdout


def test_gpu_check_calls_the_benchmark_with_flags_it_accepts():
    """The benchmark command in gpu_check.sh, with its variables filled in, parses."""
    text = GPU_CHECK.read_text()
    m = re.search(r'"\$PY" bench/torch_vs_hf_trainer\.py((?:[^\n]*\\\n)*[^\n]*)', text)
    assert m, "gpu_check.sh no longer runs bench/torch_vs_hf_trainer.py"
    line = m.group(1).replace("\\\n", " ")
    values = {"$LAYERS": "26", "$STEPS": "30", "$MAX_LENGTH": "512", "$PRECISION": "bf16", "$1": "4bit",
              "$2": "/tmp/x.json", "$WORK": "/tmp"}
    for var, value in values.items():
        line = line.replace(f'"{var}', f'"{value}').replace(var, value)
    line = re.sub(r"\$\{extra\[@\]\+\"\$\{extra\[@\]\}\"\}", "--peak-tflops 989", line)
    assert "$" not in line, line
    a = b.parse_args(shlex.split(line))
    assert (a.shape, a.layers, a.steps, a.precision, a.quantize, a.max_length) == (
        "gemma3-1b", 26, 30, "bf16", "4bit", 512)
    assert a.warmup_steps == 5 and a.peak_tflops == 989


# --------------------------------------------------------------------------- arguments


def test_benchmark_arguments():
    a = b.parse_args([])
    assert (a.shape, a.precision, a.quantize, a.steps, a.warmup_steps) == ("tiny", "fp32", "none", 120, 5)
    assert b.parse_args(["--steps", "3"]).warmup_steps == 0
    for bad in (["--steps", "0"], ["--steps", "10", "--warmup-steps", "10"], ["--layers", "0"],
                ["--precision", "fp16"], ["--shape", "gemma3-4b"]):
        with pytest.raises(SystemExit):
            b.parse_args(bad)


# --------------------------------------------------------------------------- FLOPs and MFU


def gemma3_1b_config(layers: int = 26) -> dict:
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return {"hidden_size": 1152, "intermediate_size": 6912, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": layers,
            "vocab_size": 262144, "sliding_window": 512, "layer_types": kinds}


def test_flop_model_counts_gemma3_1b_weights():
    fm = b.FlopModel.from_config(gemma3_1b_config())
    # google/gemma-3-1b-pt has 999,885,952 parameters: these matmul weights plus 134,272 norm weights
    # (26 layers x (4 x 1152 + 2 x 256) + 1152)
    assert fm.layer_params + fm.head_params == 999_885_952 - 134_272
    assert fm.windows.count(None) == 4 and fm.windows[5] is None and fm.windows[0] == 512
    assert fm.flops_per_position == 4 * fm.layer_params + 6 * fm.lora_params
    assert fm.flops_per_trained_token == 4 * 262144 * 1152


def test_flop_model_matches_the_real_model_and_peft():
    """The parameter counts behind the FLOPs are the model's and peft's own (built on the meta device)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in gemma3_1b_config(7).items() if k != "layer_types"},
                                        tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(cfg)
    fm = b.FlopModel.from_config(cfg.to_dict())
    assert fm.windows == (512,) * 5 + (None, 512)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert fm.layer_params == linear
    assert fm.head_params == model.get_output_embeddings().weight.numel()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=b.RANK, target_modules=list(b.LORA_TARGETS)))
    assert fm.lora_params == lora.get_nb_trainable_parameters()[0]


def test_causal_pairs_and_attention_flops():
    for w in (None, 1, 3, 8):
        for L in range(0, 20):
            assert b.causal_pairs(L, w) == sum(min(i, w or i) for i in range(1, L + 1))
    fm = b.FlopModel.from_config(gemma3_1b_config(6))
    # 5 sliding layers (window 512) + 1 global: past the window only the global layer grows quadratically
    L = 1024
    assert fm.attention_flops(L) == 12 * 4 * 256 * (5 * (512 * 513 // 2 + 512 * 512) + L * (L + 1) // 2)


def test_step_flops_count_padding_only_in_the_second_number():
    fm = b.FlopModel.from_config(gemma3_1b_config(2))
    steps = [b.StepTokens(lengths=[10, 30], processed=2 * 64, trained=12)]
    useful, with_padding = b.step_flops(fm, steps)
    assert useful == fm.example_flops(10) + fm.example_flops(30) + 12 * fm.flops_per_trained_token
    assert with_padding - useful == (128 - 40) * fm.flops_per_position


def test_mfu_peak_table():
    peak = b.peak_tflops_for
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989
    assert peak("NVIDIA H100 PCIe") == 756 and peak("NVIDIA H100 NVL") == 835
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312
    assert peak("NVIDIA L4") == 121 and peak("NVIDIA A10") == 125
    assert peak("NVIDIA GeForce RTX 3060") == 25.6
    for unknown in ("NVIDIA A10G", "NVIDIA L40S", "NVIDIA GeForce RTX 3060 Ti", "Tesla T4", None):
        assert peak(unknown) is None, unknown
    gpu = {"cuda": True, "name": "NVIDIA H200"}
    assert b.mfu_peak(b.parse_args(["--precision", "bf16"]), gpu)[0] == 989
    assert b.mfu_peak(b.parse_args(["--precision", "fp32"]), gpu)[0] is None  # the table is bf16
    assert b.mfu_peak(b.parse_args([]), {"cuda": False, "name": None})[0] is None
    assert b.mfu_peak(b.parse_args(["--peak-tflops", "100"]), {"cuda": False, "name": None})[0] == 100


def test_add_speed_uses_the_timed_steps_only():
    fm = b.FlopModel.from_config(gemma3_1b_config(2))
    steps = [{"lengths": [100], "processed": 512, "trained": 50}] * 2 + [
        {"lengths": [40, 60], "processed": 1024, "trained": 30}]
    arm = {"steps": steps, "timed_from_step": 3, "timed_seconds": 0.5, "timed_trained": 30}
    b.add_speed(arm, fm, peak_tflops=100.0)
    flops, _ = b.step_flops(fm, [b.StepTokens(**steps[2])])
    assert arm["tokens_per_sec"] == 60 and arm["timed_real"] == 100 and arm["timed_processed"] == 1024
    assert arm["mfu"] == pytest.approx(flops / 0.5 / 100e12)
    assert arm["mfu_incl_padding"] > arm["mfu"]
    unknown = {"steps": None, "timed_from_step": 1, "timed_seconds": 1.0, "timed_trained": 5}
    b.add_speed(unknown, fm, peak_tflops=100.0)
    assert unknown["mfu"] is None and unknown["tokens_per_sec"] == 5
