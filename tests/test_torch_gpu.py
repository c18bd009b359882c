"""PyTorch backend on an NVIDIA GPU: bf16 compute, NF4 with bf16 compute dtype, paged 8-bit
AdamW, CUDA peak memory. Skipped (by conftest) where there is no CUDA GPU."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_gpu_facts_and_precision():
    from cuda_backend.hardware import choose_precision, probe

    f = probe()
    assert f.cuda_available and f.torch_cuda and f.gpu_name
    from macft.model_info import model_info_from_dict

    p = choose_precision("auto", f, model_info_from_dict({"model_type": "gemma3_text"}))
    assert p.name == ("bf16" if f.bf16_supported else "fp32")
    assert p.autocast == f.bf16_supported


def test_paged_8bit_adamw_on_gpu():
    import bitsandbytes as bnb
    import torch

    from cuda_backend.optim import make_optimizer

    w = torch.nn.Parameter(torch.zeros(64, 64, device="cuda"))
    opt, name, note = make_optimizer([w], on_gpu=True, quantized=True, weight_decay=0.0, have_bnb=True)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit) and name == "paged AdamW 8-bit" and note is None


def test_qlora_trains_in_bf16_on_gpu(tiny_gemma, nya_dir, tmp_path, run_cli):
    import torch

    run = tmp_path / "gpu"
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--quantize", "4bit", "--grad-checkpoint", "--iters", "20",
                         "--learning-rate", "3e-3", "--eval-every", "10", "--log-every", "5",
                         "--output", run)
    assert rc == 0, err
    rec = json.loads((run / "base_quantization.json").read_text())
    bf16 = torch.cuda.is_bf16_supported()
    assert rec["method"] == "bnb-nf4" and rec["compute_dtype"] == ("bfloat16" if bf16 else "float32")
    summary = json.loads((run / "summary.json").read_text())
    assert any("paged AdamW 8-bit" in n for n in summary["notes"])
    assert not any("CPU" in n for n in summary["notes"])
    # torch.cuda.max_memory_allocated: tensors on the GPU, far below a CPU process's RSS
    assert 0 < summary["peak_memory_gb"] < 2
    vals = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in x]
    assert vals[-1] < vals[0]


def test_adapter_trained_on_gpu_loads_on_cpu(tiny_gemma, nya_dir, tmp_path, run_cli):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "gpu_fp"
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--iters", "10", "--output", run)
    assert rc == 0, err
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[2, 4, 100, 200]]), use_cache=False).logits
    assert torch.isfinite(out).all()
