"""PyTorch backend, in-process on the tiny Gemma-3: the loss on one batch, packing,
LoRA target resolution, the 4-bit quantization record. A few seconds each."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def nya_examples(tiny_gemma, nya_dir):
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_gemma))
    data = build_data(str(nya_dir), None, Renderer(tok), fmt="auto", max_seq_len=512,
                      valid_fraction=0.1, seed=0, split="train")
    return data.train


@pytest.fixture(scope="module")
def base_model(tiny_gemma):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.float32).eval()


def _per_example(batch, losses):
    """Summed loss of each example, in row order then segment order."""
    seg = batch.segment_ids[:, 1:]  # losses[:, t] belongs to the token at t + 1
    out = []
    for i in range(seg.shape[0]):
        for s in range(1, int(seg[i].max()) + 1):
            out.append(float(losses[i][torch.from_numpy(seg[i] == s)].sum()))
    return np.array(out)


def test_packed_batch_gives_the_same_per_example_losses(base_model, nya_examples):
    from cuda_backend.engine import token_losses
    from macft.data.batching import collate

    ex = nya_examples[:7]
    padded = collate([[e] for e in ex], pad_id=0, packed=False)
    packed = collate([ex[:3], ex[3:5], ex[5:]], pad_id=0, packed=True)
    assert packed.packed and packed.shape[0] == 3
    with torch.no_grad():
        a = _per_example(padded, token_losses(base_model, padded, "cpu"))
        b = _per_example(packed, token_losses(base_model, packed, "cpu"))
    assert np.allclose(a, b, rtol=1e-5, atol=1e-4), np.abs(a - b).max()
    # the check has teeth: without the position restarts the examples see each other
    leaky = collate([ex[:3], ex[3:5], ex[5:]], pad_id=0, packed=False)
    with torch.no_grad():
        c = _per_example(leaky, token_losses(base_model, leaky, "cpu"))
    assert np.abs(a[1:3] - c[1:3]).max() > 1e-2


def test_batch_loss_matches_transformers_own_loss(base_model, nya_examples):
    from cuda_backend.engine import batch_loss
    from macft.data.batching import collate

    e = nya_examples[0]
    batch = collate([[e]], pad_id=0, packed=False)
    ids = torch.tensor(batch.input_ids, dtype=torch.long)
    labels = ids.clone()
    labels[torch.from_numpy(batch.loss_mask) == 0] = -100
    with torch.no_grad():
        ref = base_model(input_ids=ids, labels=labels).loss * batch.n_trained
        ours, n = batch_loss(base_model, batch, "cpu")
    assert n == batch.n_trained > 0
    assert abs(float(ours) - float(ref)) < 1e-3 * float(ref)


def test_targets_all_linear_and_last_layers(base_model):
    from cuda_backend.model import resolve_targets

    t = resolve_targets(base_model, ["all-linear"], -1)
    assert len(t.modules) == 6 * 7 and t.modules == sorted(t.modules) and t.layers == list(range(6))
    assert t.modules[:2] == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"]
    assert not t.fan_in_fan_out
    t2 = resolve_targets(base_model, ["q_proj", "v_proj"], 2)
    assert t2.modules == [f"model.layers.{i}.self_attn.{p}" for i in (4, 5) for p in ("q_proj", "v_proj")]
    assert t2.layers == [4, 5]


def test_unknown_target_is_a_clear_error(base_model):
    from cuda_backend.model import resolve_targets
    from macft.errors import MacftError

    with pytest.raises(MacftError) as e:
        resolve_targets(base_model, ["qkv_proj"], -1)
    assert "qkv_proj" in str(e.value) and "q_proj" in str(e.value)


def _tiny_gemma3_4b_layout():
    """A tiny Gemma3ForConditionalGeneration (text + vision tower), the class of Gemma-3 4B+."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3Config,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tc = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          query_pre_attn_scalar=32)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4)
    return cfg, AutoModelForCausalLM.from_config(cfg)


def test_gemma3_4b_layout_adapts_the_text_part_only():
    """Gemma-3 4B+ loads as Gemma3ForConditionalGeneration: LoRA must skip the vision tower."""
    from pathlib import Path

    from cuda_backend.model import resolve_targets
    from macft.model_info import ModelInfo

    cfg, model = _tiny_gemma3_4b_layout()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert ModelInfo(Path("."), cfg.to_dict(), cfg).multimodal
    t = resolve_targets(model, ["all-linear"], -1)
    assert len(t.modules) == 2 * 7 and t.modules == sorted(t.modules)
    # q_proj alone would also hit the vision tower: the adapter names modules by full path
    assert all(m.startswith("model.language_model.layers.") for m in t.modules)


def test_4bit_quantization_record(tiny_gemma):
    from cuda_backend.hardware import Precision
    from cuda_backend.model import load_base, quant_record

    model = load_base(tiny_gemma, {}, "4bit", Precision("fp32", False), "cpu")
    rec = quant_record(model, "4bit", Precision("fp32", False))
    assert rec["method"] == "bnb-nf4" and rec["double_quant"] is True and rec["blocksize"] == 64
    assert rec["compute_dtype"] == "float32"
    assert rec["unquantized"] == ["lm_head"]
    assert len(rec["quantized"]) == 42


def test_8bit_quantization_record(tiny_gemma):
    from cuda_backend.hardware import Precision
    from cuda_backend.model import load_base, quant_record

    model = load_base(tiny_gemma, {}, "8bit", Precision("fp32", False), "cpu")
    rec = quant_record(model, "8bit", Precision("fp32", False))
    assert rec["method"] == "bnb-int8" and rec["threshold"] == 6.0
    assert rec["unquantized"] == ["lm_head"] and len(rec["quantized"]) == 42


def test_checkpointing_gives_the_same_gradients(tiny_gemma, nya_examples):
    """Non-reentrant activation checkpointing recomputes, it must not change the math
    (dropout included: the recomputation replays the RNG state)."""
    from cuda_backend.engine import batch_loss
    from cuda_backend.hardware import Precision
    from cuda_backend.model import apply_lora, enable_checkpointing, load_base, resolve_targets
    from macft.config import RunConfig
    from macft.data.batching import collate

    batch = collate([[e] for e in nya_examples[:4]], pad_id=0, packed=False)
    cfg = RunConfig()
    grads = []
    for ckpt in (False, True):
        model = load_base(tiny_gemma, {}, "none", Precision("fp32", False), "cpu")
        if ckpt:
            enable_checkpointing(model)
        peft_model = apply_lora(model, cfg, resolve_targets(model, ["all-linear"], -1))
        peft_model.train()
        with torch.no_grad():  # B starts at zero: give it values so A gets gradients too
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.full_like(p, 0.01))
        torch.manual_seed(1)
        loss, _ = batch_loss(peft_model, batch, "cpu")
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert grads[0].abs().max() > 0


def test_loss_on_the_gemma3_4b_class():
    """The loss (backbone + output head) works on Gemma3ForConditionalGeneration (text only)."""
    from cuda_backend.engine import batch_loss, token_losses
    from macft.data.batching import collate
    from macft.data.dataset import Example

    model = _tiny_gemma3_4b_layout()[1].eval()
    rng = np.random.default_rng(0)
    ex = [Example(ids=rng.integers(5, 290, n).astype(np.int32),
                  mask=(np.arange(n) > n // 2).astype(np.uint8), where="x") for n in (9, 14)]
    batch = collate([[e] for e in ex], pad_id=0, packed=False)
    with torch.no_grad():
        ours, n = batch_loss(model, batch, "cpu")
        ids = torch.tensor(batch.input_ids, dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=torch.tensor(batch.segment_ids > 0).long()).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        ref = (ce * torch.from_numpy(batch.loss_mask[:, 1:])).sum()
    assert n == batch.n_trained
    assert abs(float(ours) - float(ref)) < 1e-4 * float(ref)
    assert token_losses(model, batch, "cpu").shape == (2, batch.shape[1] - 1)


def test_cpu_peak_memory_is_this_process_not_its_launcher():
    """ru_maxrss survives exec: a run started from a big process (pytest here, a notebook for a
    user) must not report that process's peak as its own."""
    import subprocess
    import sys

    ballast = bytearray(800 * 1024 * 1024)  # this process now peaks above 800 MB
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c", "from cuda_backend.engine import peak_rss_bytes; "
                          "print(peak_rss_bytes())"], capture_output=True, text=True, check=True)
    del ballast
    assert int(out.stdout) < 400 * 1024 * 1024, int(out.stdout)


@pytest.mark.parametrize("kind", ["AdamW", "AdamW8bit"])
def test_optimizer_and_rng_state_round_trip_without_pickle(kind):
    """The checkpoint's optimizer state (torch AdamW, bitsandbytes' 8-bit AdamW with its
    nested, shared quantization tensors) and RNG states go through safetensors + JSON and
    continue exactly as the original."""
    import json
    import random

    from safetensors.torch import load, save

    from cuda_backend.engine import _decode, _encode, _numpy_rng_state, _set_numpy_rng_state

    def make(params):
        if kind == "AdamW":
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=0.01, min_8bit_size=0)

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen)),
              torch.nn.Parameter(torch.randn(8, 300, generator=gen))]
    opt = make(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    tensors: dict = {}
    meta = json.dumps({"optimizer": _encode(opt.state_dict(), "optimizer", tensors),
                       "rng": _encode({"python": random.getstate(), "numpy": _numpy_rng_state(),
                                       "torch": torch.get_rng_state()}, "rng", tensors)})
    blob = save(tensors)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(params2)
    back = json.loads(meta)
    loaded = load(blob)
    opt2.load_state_dict(_decode(back["optimizer"], loaded))
    rng = _decode(back["rng"], loaded)
    random.setstate(rng["python"])
    _set_numpy_rng_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]  # a tuple again
    for p, q in zip(params, params2):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
