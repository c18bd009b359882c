"""The streaming merge: exactness against peft, shards, dtypes, naming schemes, mismatches,
QLoRA bases (bitsandbytes NF4 and MLX affine) and peak memory. No llama.cpp needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.dequant import BaseQuantization, read_base_quantization
from export.fixtures import random_adapter
from export.merge import merge, module_scale, plan_merge
from export.names import canonical
from export.safetensors_io import SafetensorsFile, from_f32, to_f32
from macft.adapter import AdapterSpec, write_peft_adapter
from macft.errors import MacftError


def _load(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(path.glob("*.safetensors")):
        sf = SafetensorsFile(p)
        for t in sf.ordered():
            out[t.name] = sf.read_f32(t)
    return out


def test_bf16_conversion_is_bit_exact_with_torch():
    import torch

    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 3
    x[:4] = [0.0, -0.0, 1e-40, 65504.0]
    ours = from_f32(x, "BF16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert ours == theirs
    back = to_f32(ours, "BF16")
    assert np.array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_names_map_across_checkpoint_schemes():
    for name in ("model.language_model.layers.3.mlp.up_proj", "language_model.model.layers.3.mlp.up_proj",
                 "model.layers.3.mlp.up_proj", "base_model.model.model.layers.3.mlp.up_proj"):
        assert canonical(name) == "layers.3.mlp.up_proj"
    assert canonical("model.vision_tower.encoder.layers.3.mlp.fc1") == "vision_tower.encoder.layers.3.mlp.fc1"


def test_scale_follows_peft(tmp_path):
    cfg = {"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}
    assert module_scale(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert module_scale(cfg, "model.layers.0.self_attn.v_proj", 8) == 0.5
    assert module_scale({"lora_alpha": 16, "use_rslora": True}, "x", 4) == 8.0


def test_merge_matches_peft_merge_and_unload(tiny_gemma, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=8, b_scale=0.05)
    res = merge(plan_merge(tiny_gemma, adapter, None), tmp_path / "merged")
    assert res.merged == 42 and res.tensors == len(SafetensorsFile(tiny_gemma / "model.safetensors").tensors)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    ours = _load(tmp_path / "merged")
    assert set(ours) <= set(ref)
    worst = max(float(np.abs(ours[k] - ref[k].numpy()).max()) for k in ours)
    assert worst < 1e-6
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json",
              "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / f).is_file(), f


def test_sharded_bf16_base_keeps_its_layout(tiny_gemma, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base-bf16"
    m = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.bfloat16)
    m.save_pretrained(str(base), max_shard_size="2MB")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_gemma / f, base / f)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    adapter = random_adapter(base, tmp_path / "adapter", rank=4)
    merge(plan_merge(base, adapter, None), tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    assert (json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
            == json.loads((base / "model.safetensors.index.json").read_text()))
    # each adapted weight is bf16(W + scale * B @ A), computed in fp32 and rounded once
    name = "model.layers.2.mlp.down_proj"
    a = SafetensorsFile(adapter / "adapter_model.safetensors")
    A = a.read_f32(a.tensors[f"base_model.model.{name}.lora_A.weight"])
    B = a.read_f32(a.tensors[f"base_model.model.{name}.lora_B.weight"])
    w = _load(base)[f"{name}.weight"]
    want = torch.from_numpy(w + 4.0 * (B @ A)).to(torch.bfloat16).float().numpy()  # alpha 16 / rank 4
    got = _load(tmp_path / "merged")[f"{name}.weight"]
    assert SafetensorsFile(next((tmp_path / "merged").glob("*.safetensors"))).ordered()[0].dtype == "BF16"
    assert np.array_equal(got, want)


def _write_model(path: Path, tensors: dict[str, np.ndarray], arch: str = "Gemma3ForConditionalGeneration") -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "gemma3"}))
    return path


def test_gemma3_4b_names_and_every_mismatch_listed(tmp_path):
    rng = np.random.default_rng(0)
    w = {  # a checkpoint saved by older transformers: language_model.model.* plus a vision tower
        "language_model.model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 16), dtype=np.float32),
        "language_model.model.layers.0.mlp.down_proj.weight": rng.standard_normal((16, 24), dtype=np.float32),
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8), dtype=np.float32),
    }
    base = _write_model(tmp_path / "base", w)
    spec = AdapterSpec("google/gemma-3-4b-it", 2, 4.0, 0.0, ["q_proj", "down_proj"])
    a, b = rng.standard_normal((2, 16), dtype=np.float32), rng.standard_normal((32, 2), dtype=np.float32)
    good = write_peft_adapter(tmp_path / "good", {"model.language_model.layers.0.self_attn.q_proj": (a, b)}, spec) \
        or tmp_path / "good"
    res = merge(plan_merge(base, good, None), tmp_path / "merged")
    assert res.merged == 1
    got = _load(tmp_path / "merged")
    np.testing.assert_allclose(got["language_model.model.layers.0.self_attn.q_proj.weight"],
                               w["language_model.model.layers.0.self_attn.q_proj.weight"] + 2.0 * b @ a, rtol=1e-6)
    np.testing.assert_array_equal(got["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                                  w["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    bad = tmp_path / "bad"
    write_peft_adapter(bad, {
        "model.language_model.layers.0.self_attn.q_proj": (rng.standard_normal((2, 20), dtype=np.float32), b),
        "model.language_model.layers.0.mlp.down_proj": (rng.standard_normal((2, 24), dtype=np.float32),
                                                        rng.standard_normal((99, 2), dtype=np.float32)),
        "model.language_model.layers.7.self_attn.q_proj": (a, b),
    }, spec)
    with pytest.raises(MacftError) as e:
        plan_merge(base, bad, None)
    msg = str(e.value)
    assert "3 mismatches" in msg and "layers.7" in msg and "[32, 20]" in msg and "[99, 24]" in msg
    assert "google/gemma-3-4b-it" in msg  # the fix names the base the adapter claims


def test_refuses_adapters_it_cannot_merge(tmp_path, tiny_gemma):
    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=2)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MacftError, match="DoRA"):
        plan_merge(tiny_gemma, adapter, None)


def test_base_quantization_record_is_validated(tmp_path):
    (tmp_path / "base_quantization.json").write_text(json.dumps({"method": "gptq", "bits": 3, "group_size": 7}))
    with pytest.raises(MacftError) as e:
        read_base_quantization(tmp_path)
    assert "method is 'gptq'" in str(e.value) and "group size 7" in str(e.value)
    (tmp_path / "base_quantization.json").write_text(json.dumps(
        {"method": "bnb-nf4", "double_quant": True, "blocksize": 64, "unquantized": ["lm_head"]}))
    q = read_base_quantization(tmp_path)
    assert q.applies_to("model.layers.0.mlp.up_proj", (512, 256))
    assert not q.applies_to("model.embed_tokens", (1024, 256))  # bitsandbytes leaves embeddings
    assert not q.applies_to("model.layers.0.input_layernorm", (256,))
    mlx = BaseQuantization("mlx-affine", bits=4, group_size=64, unquantized={"layers.1.mlp.up_proj"})
    assert mlx.applies_to("model.embed_tokens", (1024, 256))  # mlx-lm quantizes embeddings too
    assert not mlx.applies_to("model.layers.1.mlp.up_proj", (512, 256))


def test_mlx_affine_trained_base(tiny_gemma, tmp_path):
    import mlx.core as mx

    q = BaseQuantization("mlx-affine", bits=4, group_size=64)
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    rt = q.roundtrip(w)
    want = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=64, bits=4), group_size=64, bits=4))
    np.testing.assert_array_equal(rt, want)
    assert all(len(np.unique(g)) <= 16 for g in rt.reshape(-1, 64))  # 4-bit levels per group
    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=4)
    res = merge(plan_merge(tiny_gemma, adapter, q), tmp_path / "merged")
    assert res.dequantized == 43  # 42 projections + the embedding
    got = _load(tmp_path / "merged")["model.layers.0.mlp.up_proj.weight"]
    base = _load(tiny_gemma)["model.layers.0.mlp.up_proj.weight"]
    a = SafetensorsFile(adapter / "adapter_model.safetensors")
    A = a.read_f32(a.tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"])
    B = a.read_f32(a.tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"])
    np.testing.assert_allclose(got, q.roundtrip(base) + 4.0 * (B @ A), atol=1e-6)


@pytest.mark.slow
def test_nf4_trained_base_reproduces_the_bitsandbytes_model(tiny_gemma, tmp_path):
    """The QLoRA training-time model, run by bitsandbytes itself (NF4, fp32 compute on CPU) with
    the adapter by peft, against our merge into the dequantized base and into the original."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cuda_backend.model import no_cpu_repacking

    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=8, b_scale=0.05)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), quantization_config=qcfg, dtype=torch.float32)
    no_cpu_repacking(trained)  # else bf16 kernels in eval mode on CPUs with AVX512-BF16 (0.07 off)
    trained = PeftModel.from_pretrained(trained, str(adapter)).eval()
    ids = torch.tensor([[2, 4, 300, 301, 302, 5, 6, 4, 310, 311, 6, 40, 41, 42]])
    quant = BaseQuantization("bnb-nf4", bits=4, group_size=64, double_quant=True, unquantized={"lm_head"})
    diffs = {}
    with torch.no_grad():
        want = trained(ids).logits
        for label, q in (("trained", quant), ("original", None)):
            out = tmp_path / label
            merge(plan_merge(tiny_gemma, adapter, q), out)
            m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            diffs[label] = float((m(ids).logits - want).abs().max())
    print("max logit difference to the bitsandbytes model:", diffs)
    assert diffs["trained"] < 1e-4, diffs
    assert diffs["original"] > 100 * diffs["trained"], diffs


def test_int8_trained_base_holds_the_weights_bitsandbytes_trained(tiny_gemma, tmp_path):
    """--quantize 8bit on the PyTorch backend: the merged weight of every quantized module is the
    int8 weight bitsandbytes held (CB * SCB / 127) plus the LoRA delta."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=8, b_scale=0.05)
    qcfg = BitsAndBytesConfig(load_in_8bit=True)
    held = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), quantization_config=qcfg, dtype=torch.float32)
    quant = BaseQuantization("bnb-int8", bits=8, group_size=64, unquantized={"lm_head"})
    merge(plan_merge(tiny_gemma, adapter, quant), tmp_path / "trained")
    merge(plan_merge(tiny_gemma, adapter, None), tmp_path / "original")
    trained, original, base = (_load(tmp_path / "trained"), _load(tmp_path / "original"),
                               _load(tiny_gemma))
    checked, worst, moved = 0, 0.0, 0.0
    for name, mod in held.named_modules():
        if type(mod).__name__ != "Linear8bitLt":
            continue
        w = mod.weight
        int8 = (w.data.to(torch.float32) * w.SCB.to(torch.float32)[:, None] / 127).numpy()
        key = name + ".weight"
        expect = int8 + (original[key] - base[key])  # the int8 weight plus the LoRA delta
        worst = max(worst, float(np.abs(trained[key] - expect).max()))
        moved = max(moved, float(np.abs(trained[key] - original[key]).max()))
        checked += 1
    print(f"{checked} int8 modules; max difference to bitsandbytes' weights + delta {worst:.2e}; "
          f"to the original merge {moved:.2e}")
    assert checked >= 7
    assert worst < 1e-3, worst
    assert moved > 10 * worst


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_stays_near_a_block_not_the_model(tmp_path):
    """Merging a 256 MB weight raises the process's peak RSS by far less than the weight."""
    rng = np.random.default_rng(0)
    rows, cols = 8192, 8192
    base = _write_model(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight":
                                            rng.standard_normal((rows, cols), dtype=np.float32)},
                        arch="LlamaForCausalLM")
    spec = AdapterSpec("x", 4, 8.0, 0.0, ["up_proj"])
    write_peft_adapter(tmp_path / "adapter", {"model.layers.0.mlp.up_proj": (
        rng.standard_normal((4, cols), dtype=np.float32), rng.standard_normal((rows, 4), dtype=np.float32))}, spec)
    # VmHWM (peak RSS of this process image; ru_maxrss would carry pytest's own over the exec)
    code = """
import re, sys
from pathlib import Path
from export.merge import merge, plan_merge
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
plan = plan_merge(Path(sys.argv[1]), Path(sys.argv[2]), None)
before = hwm()
merge(plan, Path(sys.argv[3]))
print((hwm() - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code, str(base), str(tmp_path / "adapter"), str(tmp_path / "out")],
                       capture_output=True, text=True, check=True)
    grew_mb = int(r.stdout.split()[-1])
    print(f"peak RSS grew by {grew_mb} MB")
    assert grew_mb < 80, f"peak RSS grew by {grew_mb} MB merging a 256 MB weight"
