"""MLX on every checkpoint layout users train: tiny random models in the published config
and weight namings (sparse Gemma-3 4B text_config, GPT-NeoX of transformers 4.26, GPT-2 with
and without the `transformer.` prefix, Llama-3.2's llama3 rope) against transformers' own
model of the same files: logits, LoRA targets, and the PEFT adapter's names and numbers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

# Each layout: the config.json as published (shrunk), the weight dtype on disk, how the
# published files name the weights (from transformers 5's in-memory names).
LAYOUTS: dict[str, dict] = {
    "gpt2": {  # openai-community/gpt2: no prefix, attn.bias buffers, no lm_head
        "config": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
                   "bos_token_id": 0, "embd_pdrop": 0.1, "eos_token_id": 0, "initializer_range": 0.02,
                   "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64, "n_embd": 64, "n_head": 4,
                   "n_layer": 2, "n_positions": 64, "resid_pdrop": 0.1, "vocab_size": 300},
        "dtype": "float32", "rename": [("transformer.", "")], "drop": ["lm_head.weight"],
        "buffers": ["h.{i}.attn.bias"],
    },
    "rinna-gpt2": {  # rinna/japanese-gpt2-medium: `transformer.` prefix, lm_head.weight, both buffers
        "config": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "bos_token_id": 2,
                   "eos_token_id": 3, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64,
                   "n_embd": 64, "n_head": 4, "n_inner": None, "n_layer": 2, "n_positions": 64,
                   "transformers_version": "4.5.0", "vocab_size": 300},
        "dtype": "float32", "rename": [], "drop": [],
        "buffers": ["transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"],
    },
    "rinna-neox": {  # rinna/japanese-gpt-neox-3.6b: 4.26 keys, sequential residual, full rotary
        "config": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 2, "eos_token_id": 3,
                   "hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 256, "layer_norm_eps": 1e-05,
                   "max_position_embeddings": 64, "model_type": "gpt_neox", "num_attention_heads": 4,
                   "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 1.0,
                   "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.26.0",
                   "use_parallel_residual": False, "vocab_size": 300},
        "dtype": "float16", "rename": [("lm_head.", "embed_out.")], "drop": [],
        "buffers": ["gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
                    "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"],
    },
    "pythia": {  # EleutherAI/pythia: rotary_pct 0.25, parallel residual
        "config": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
                   "hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 256, "layer_norm_eps": 1e-05,
                   "max_position_embeddings": 64, "model_type": "gpt_neox", "num_attention_heads": 4,
                   "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                   "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0",
                   "use_parallel_residual": True, "vocab_size": 300},
        "dtype": "float16", "rename": [("lm_head.", "embed_out.")], "drop": [],
        "buffers": ["gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"],
    },
    "gemma3-4b": {  # google/gemma-3-4b-it: sparse text_config, SigLIP tower, two shards
        "config": {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
                   "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
                   "initializer_range": 0.02, "mm_tokens_per_image": 4, "model_type": "gemma3",
                   "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma3_text",
                                   "num_hidden_layers": 6, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                   "sliding_window": 1024},
                   "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
                   "vision_config": {"hidden_size": 32, "image_size": 28, "intermediate_size": 64,
                                     "model_type": "siglip_vision_model", "num_attention_heads": 2,
                                     "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False}},
        "dtype": "bfloat16", "shards": 2, "drop": ["lm_head.weight"], "buffers": [],
        "rename": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                   ("model.multi_modal_projector.", "multi_modal_projector.")],
    },
    "llama-3.2": {  # meta-llama/Llama-3.2-1B: llama3 rope scaling, tied (a short original context
        # so that the scaling changes most frequencies of this tiny head)
        "config": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
                   "eos_token_id": [2, 3], "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
                   "intermediate_size": 128, "max_position_embeddings": 131072, "mlp_bias": False,
                   "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
                   "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 16, "rope_type": "llama3"},
                   "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
                   "transformers_version": "4.45.0.dev0", "vocab_size": 300},
        "dtype": "float32", "rename": [], "drop": ["lm_head.weight"], "buffers": [],
    },
    "elyza-llama2": {  # elyza/ELYZA-japanese-Llama-2-7b: untied, fp16, old rotary buffers
        "config": {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                   "hidden_size": 64, "intermediate_size": 192, "max_position_embeddings": 4096,
                   "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
                   "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
                   "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.30.2",
                   "vocab_size": 300},
        "dtype": "float16", "rename": [], "drop": [], "buffers": ["model.layers.{i}.self_attn.rotary_emb.inv_freq"],
    },
    "mistral": {  # mistralai/Mistral-7B-v0.1: sliding_window 4096 (full attention at these lengths)
        "config": {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                   "hidden_size": 64, "intermediate_size": 192, "max_position_embeddings": 32768,
                   "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 2,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 300},
        "dtype": "bfloat16", "rename": [], "drop": [], "buffers": [],
    },
    "qwen2.5": {
        "config": {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                   "hidden_size": 64, "intermediate_size": 192, "max_position_embeddings": 32768,
                   "max_window_layers": 2, "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                   "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
                   "vocab_size": 300},
        "dtype": "float32", "rename": [], "drop": ["lm_head.weight"], "buffers": [],
    },
    "qwen3": {
        "config": {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 1,
                   "eos_token_id": 2, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
                   "intermediate_size": 192, "max_position_embeddings": 40960, "model_type": "qwen3",
                   "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
                   "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
                   "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 300},
        "dtype": "float32", "rename": [], "drop": ["lm_head.weight"], "buffers": [],
    },
    "gemma-2b": {  # google/gemma-2b: exact GELU named by hidden_act, head_dim != hidden / heads
        "config": {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "bos_token_id": 2,
                   "eos_token_id": 1, "head_dim": 32, "hidden_act": "gelu", "hidden_size": 64,
                   "intermediate_size": 256, "max_position_embeddings": 8192, "model_type": "gemma",
                   "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1, "pad_token_id": 0,
                   "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
                   "vocab_size": 300},
        "dtype": "bfloat16", "rename": [], "drop": ["lm_head.weight"], "buffers": [],
    },
    "gemma3-1b": {  # google/gemma-3-1b-it; like its 1152, sqrt(80) is not a bf16 number
        "config": {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
                   "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 32,
                   "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 80, "intermediate_size": 256,
                   "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
                   "num_hidden_layers": 6, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 32,
                   "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
                   "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 300},
        "dtype": "bfloat16", "rename": [], "drop": ["lm_head.weight"], "buffers": [],
    },
}
FAMILY = {"gpt2": "gpt2", "rinna-gpt2": "gpt2", "rinna-neox": "gpt_neox", "pythia": "gpt_neox",
          "gemma3-4b": "gemma3"}

# all-linear, by the module path inside a block
BLOCK_LINEARS = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["attention.dense", "attention.query_key_value", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"],
    "gemma3": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
               "self_attn.q_proj", "self_attn.v_proj"],
}
BLOCK_LINEARS["llama"] = BLOCK_LINEARS["gemma3"]
# the first block's path in transformers 5's AutoModelForCausalLM
HF_BLOCK = {"gpt2": "transformer.h.0.", "gpt_neox": "gpt_neox.layers.0.", "gemma3": "model.language_model.layers.0.",
            "llama": "model.layers.0."}
IDS = [[1, 17, 250, 3, 99, 42, 7, 7, 180, 5, 64, 2, 33, 120, 8, 11, 290, 4, 60, 21]]


def _buffer(name: str, cfg: dict):
    import torch

    n = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    if name.endswith("masked_bias"):
        return torch.tensor(-1e4)
    if name.endswith("inv_freq"):
        dim = int(cfg["hidden_size"] // cfg["num_attention_heads"] * cfg.get("rotary_pct", 1.0))
        return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)


def build(layout: str, out: Path) -> Path:
    """A random-init model (initializer_range 0.2, so that errors show) in the layout's files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = LAYOUTS[layout]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(spec["config"], indent=2))
    config = AutoConfig.from_pretrained(out)
    for c in {id(x): x for x in (config, config.get_text_config())}.values():
        c.initializer_range = 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dtype = getattr(torch, spec["dtype"])
    tensors = {}
    for k, v in model.state_dict().items():
        if k in spec["drop"]:
            continue
        for old, new in spec["rename"]:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        tensors[k] = v.detach().to(dtype).clone().contiguous()
    layers = spec["config"].get("n_layer") or spec["config"].get("num_hidden_layers")
    for b in spec["buffers"]:
        for i in range(layers):
            tensors[b.format(i=i)] = _buffer(b, spec["config"])
    names = sorted(tensors)
    shards = spec.get("shards", 1)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s::shards]}
            save_file(part, str(out / fn), metadata={"format": "pt"})
            index.update(dict.fromkeys(part, fn))
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            cache[layout] = build(layout, root / layout)
        return cache[layout]

    return get


def hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def mlx_logits(lm) -> np.ndarray:
    import mlx.core as mx

    return np.array(lm.model(mx.array(IDS)).astype(mx.float32))


def family(layout: str) -> str:
    return FAMILY.get(layout, "llama")  # the rest name their modules as Llama does


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mlx_logits_match_transformers(layouts, layout):
    """The config mapping (sparse defaults, old keys, partial rotary, rope scaling, GELU
    flavour, MLP width) and the weight names: MLX computes what transformers computes."""
    import mlx.core as mx

    from macft.mlx_backend.model import load

    path = layouts(layout)
    lm = load(path, mx.float32)
    ref = hf_logits(hf_model(path))
    got = mlx_logits(lm)
    assert got.shape == ref.shape
    diff = np.abs(got - ref).max()
    assert diff < 1e-4 * max(1.0, np.abs(ref).max()), (diff, np.abs(ref).max())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_split_gives_the_models_own_logits(layouts, layout):
    """The training loss runs the backbone and the output layer apart (only trained positions
    reach the output layer): on every published layout, in full precision and 4-bit, the
    split reproduces the model's logits, so no layout falls back to full logits."""
    import mlx.core as mx

    from macft.mlx_backend.engine import loss_split
    from macft.mlx_backend.model import load, quantize

    lm = load(layouts(layout), mx.float32)
    for bits in (None, 4):
        if bits:
            quantize(lm, bits)
        split, note = loss_split(lm)
        assert note is None, (layout, bits)
        got = np.array(split.head(split.hidden(mx.array(IDS))).astype(mx.float32))
        assert np.abs(got - mlx_logits(lm)).max() < 1e-5 * max(1.0, np.abs(got).max())


@pytest.mark.parametrize("layout", ["rinna-gpt2", "pythia", "gemma3-4b", "llama-3.2"])
def test_checkpoint_saved_by_transformers_5_loads_the_same(layouts, layout, tmp_path):
    """transformers 5's save_pretrained writes rope_parameters / layer_types (which mlx-lm's
    own config reading ignores) and its own weight names."""
    import mlx.core as mx

    from macft.mlx_backend.model import load

    model = hf_model(layouts(layout))
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "rope_scaling" not in json.dumps(saved) or layout == "gemma3-4b"
    ref = hf_logits(model)
    got = mlx_logits(load(tmp_path / "resaved", mx.float32))
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("layout", ["gpt2", "rinna-neox", "gemma3-4b", "llama-3.2"])
def test_all_linear_and_named_targets(layouts, layout):
    import mlx.core as mx

    from macft.errors import MacftError
    from macft.mlx_backend.model import load, resolve_lora_keys

    lm = load(layouts(layout), mx.float32)
    keys, use = resolve_lora_keys(lm.model, ["all-linear"], -1)
    assert keys == BLOCK_LINEARS[family(layout)]
    assert use == list(range(len(lm.model.layers)))
    # the same list as ModelInfo's (what the estimate and the CUDA backend use)
    assert sorted(b.name for b in lm.info.block_linears) == keys
    short = keys[-1].split(".")[-1]
    assert resolve_lora_keys(lm.model, [short], 1)[0] == [k for k in keys if k.endswith("." + short)]
    if family(layout) == "gpt2":
        assert resolve_lora_keys(lm.model, ["c_attn"], -1)[0] == ["attn.c_attn"]
        assert resolve_lora_keys(lm.model, ["mlp.c_proj"], -1)[0] == ["mlp.c_proj"]
    with pytest.raises(MacftError, match="does not have: nonesuch"):
        resolve_lora_keys(lm.model, ["nonesuch"], -1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peft_adapter_loads_in_transformers_with_the_same_logits(layouts, layout, tmp_path):
    import mlx.core as mx
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from macft.adapter import write_peft_adapter
    from macft.mlx_backend.infer import apply_peft_adapter
    from macft.mlx_backend.model import adapter_spec, add_lora, load, lora_weights

    path = layouts(layout)
    lm = load(path, mx.float32)
    add_lora(lm, 4, 8.0, 0.0, ["all-linear"], -1)
    mx.random.seed(1)
    lm.model.load_weights([(k, mx.random.normal(v.shape) * 0.2) for k, v in _lora_params(lm.model)], strict=False)
    mlx = mlx_logits(lm)

    adapter = tmp_path / "adapter"
    spec = adapter_spec(lm, str(path), 4, 8.0, 0.0)
    write_peft_adapter(adapter, lora_weights(lm), spec)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    fam = family(layout)
    n_layers = len(lm.model.layers)
    expected = sorted(f"{HF_BLOCK[fam][:-2]}{i}.{k}" for i in range(n_layers) for k in BLOCK_LINEARS[fam])
    assert cfg["target_modules"] == expected
    assert cfg["layers_to_transform"] is None
    assert cfg["fan_in_fan_out"] is (fam == "gpt2")

    base = hf_model(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, str(adapter)).eval()
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))
    assert adapted == expected  # exactly these: no vision tower, no output layer
    res = set_peft_model_state_dict(pm, load_peft_weights(str(adapter)))
    assert not res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora_" in k]
    hf = hf_logits(pm)
    with pm.disable_adapter():
        hf_base = hf_logits(pm)
    scale = max(1.0, np.abs(hf).max())
    assert np.abs(hf - hf_base).max() > 100 * 1e-4 * scale  # the adapter matters
    diff = np.abs(mlx - hf).max()
    assert diff < 1e-4 * scale, (diff, scale)

    # chat / eval read the PEFT adapter back into MLX: same logits
    lm2 = load(path, mx.float32)
    apply_peft_adapter(lm2, adapter)
    assert np.abs(mlx_logits(lm2) - mlx).max() < 1e-5 * scale


def _lora_params(model):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.trainable_parameters())]


def test_module_names_map_both_ways():
    from macft.mlx_backend.architectures import ARCHITECTURES
    from macft.mlx_backend.supported import SUPPORTED

    assert set(ARCHITECTURES) == set(SUPPORTED)
    cases = {
        "gpt2": [("model.h.3.attn.c_attn", "transformer.h.3.attn.c_attn"), ("model.wte", "transformer.wte")],
        "gpt_neox": [("model.h.0.attention.query_key_value", "gpt_neox.layers.0.attention.query_key_value"),
                     ("model.embed_in", "gpt_neox.embed_in"), ("model.embed_out", "lm_head"),
                     ("model.final_layer_norm", "gpt_neox.final_layer_norm")],
        "gemma3": [("language_model.model.layers.2.mlp.up_proj", "model.language_model.layers.2.mlp.up_proj"),
                   ("language_model.lm_head", "lm_head")],
        "gemma3_text": [("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj")],
        "llama": [("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"), ("lm_head", "lm_head")],
    }
    for mt, pairs in cases.items():
        names = ARCHITECTURES[mt].names
        for mlx, hf in pairs:
            assert names.to_hf(mlx) == hf, (mt, mlx)
            assert names.to_mlx(hf) == mlx, (mt, hf)


def test_packed_positions_restart_per_example():
    import mlx.core as mx

    from macft.mlx_backend.packing import segment_positions

    seg = mx.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def _info(tmp_path: Path, config: dict):
    from macft.model_info import read_model_info

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return read_model_info(tmp_path)


def test_unsupported_architectures_are_refused_before_loading(tmp_path):
    from macft.config import RunConfig
    from macft.mlx_backend import MLXBackend

    cfg = RunConfig()
    cfg.train.precision = "fp32"
    opt = _info(tmp_path / "opt", {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 64,
                                    "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 128,
                                    "word_embed_proj_dim": 64, "vocab_size": 300})
    problems = MLXBackend().check(cfg, opt)
    assert len(problems) == 1 and "--backend cuda" in problems[0] and "OPTForCausalLM" in problems[0]
    assert "\n" not in problems[0]
    # a supported family in a variant mlx-lm computes differently
    yarn = dict(LAYOUTS["llama-3.2"]["config"], rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 16})
    problems = MLXBackend().check(cfg, _info(tmp_path / "yarn", yarn))
    assert len(problems) == 1 and "yarn" in problems[0] and "--backend cuda" in problems[0]
    untied = dict(LAYOUTS["gpt2"]["config"], tie_word_embeddings=False)
    problems = MLXBackend().check(cfg, _info(tmp_path / "untied", untied))
    assert len(problems) == 1 and "untied output layer" in problems[0]
    for layout in LAYOUTS:
        assert MLXBackend().check(cfg, _info(tmp_path / layout, LAYOUTS[layout]["config"])) == []


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mapping_gives_every_model_args_field(layout, tmp_path):
    """Every field of mlx-lm's ModelArgs comes from the mapping (none from mlx-lm's defaults,
    no misspelt key silently dropped by ModelArgs.from_dict)."""
    import dataclasses
    import importlib

    from macft.mlx_backend.architectures import mlx_args

    arch, args, problems = mlx_args(_info(tmp_path, LAYOUTS[layout]["config"]))
    assert not problems
    code = importlib.import_module(f"mlx_lm.models.{arch.mlx_type}")
    fields = {f.name for f in dataclasses.fields(code.ModelArgs)}
    assert set(args) == fields, (set(args) ^ fields)
    if "text_config" in args:
        text = importlib.import_module("mlx_lm.models.gemma3_text").ModelArgs
        assert set(args["text_config"]) == {f.name for f in dataclasses.fields(text)}


def test_sparse_gemma3_config_maps_the_defaults(tmp_path):
    from macft.mlx_backend.architectures import mlx_args

    arch, args, problems = mlx_args(_info(tmp_path, LAYOUTS["gemma3-4b"]["config"]))
    assert not problems
    text = args["text_config"]
    assert args["vocab_size"] == text["vocab_size"] == 262208
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (8, 4, 256)
    assert text["rope_scaling"] == {"factor": 8.0, "type": "linear", "rope_type": "linear"}
    assert (text["rope_theta"], text["rope_local_base_freq"], text["sliding_window_pattern"]) == (1e6, 1e4, 6)
    assert arch.blocks == "language_model.model.layers"


@pytest.mark.parametrize("layout", ["gpt2", "pythia", "llama-3.2"])
def test_packed_row_gives_each_example_its_own_logits(layouts, layout):
    """Packing: block-diagonal attention, and GPT-2's learned positions restart per example."""
    import mlx.core as mx

    from macft.mlx_backend.model import load
    from macft.mlx_backend.packing import model_modules, packed_attention

    lm = load(layouts(layout), mx.float32)
    a, b = IDS[0][:7], IDS[0][7:]
    seg = mx.array([[1] * len(a) + [2] * len(b)])
    with packed_attention(model_modules(lm.model), seg):
        packed = np.array(lm.model(mx.array([a + b])))
    alone = np.array(lm.model(mx.array([b])))
    assert np.abs(packed[0, len(a):] - alone[0]).max() < 1e-4


def test_qlora_and_training_steps_on_gpt2(layouts, tmp_path):
    """--quantize 4bit, LoRA on the quantized Conv1D projections, two real optimizer steps
    (packed), and the adapter and quantization record by transformers' names."""
    import mlx.core as mx

    from macft.adapter import read_peft_adapter
    from macft.data.batching import Batch
    from macft.mlx_backend.engine import MLXEngine
    from macft.mlx_backend.model import adapter_spec, add_lora, load, quantize

    lm = load(layouts("gpt2"), mx.float32)
    quantize(lm, 4)
    assert "model.h.0.attn.c_attn" in lm.quantized
    assert type(lm.model.model.wpe).__name__ == "QuantizedPackedPositionEmbedding"
    assert lm.hf_name("model.h.1.mlp.c_fc") == "transformer.h.1.mlp.c_fc"
    add_lora(lm, 4, 8.0, 0.0, ["c_attn", "c_fc"], -1)
    spec = adapter_spec(lm, "tiny", 4, 8.0, 0.0)
    engine = MLXEngine(lm, spec, weight_decay=0.0, packing=True, device="cpu", seed=0)
    ids = np.array(IDS * 2, np.int32)
    seg = np.array([[1] * 9 + [2] * 11, [1] * 20], np.int32)
    batch = Batch(ids, np.ones_like(ids, np.float32), np.zeros_like(ids), seg, 3, packed=True)
    losses = []
    for _ in range(3):
        loss, n = engine.train_micro(batch)
        losses.append(loss / n)
        engine.optimizer_step(1e-2, n, 1.0)
    assert losses[-1] < losses[0]
    engine.save_adapter(tmp_path / "adapter")
    modules, cfg = read_peft_adapter(tmp_path / "adapter")
    assert sorted(modules) == cfg["target_modules"] == [f"transformer.h.{i}.{k}" for i in (0, 1)
                                                        for k in ("attn.c_attn", "mlp.c_fc")]
    assert cfg["fan_in_fan_out"] is True
    assert all(np.abs(b).max() > 0 for _, b in modules.values())


def _shared_layout_ids() -> list:
    try:
        from checkpoints.layouts import LAYOUTS as SHARED
    except ImportError:
        return [pytest.param("none", marks=pytest.mark.skip(reason="tests/checkpoints/layouts.py is absent"))]
    return list(SHARED)


@pytest.mark.parametrize("layout_id", _shared_layout_ids())
def test_shared_published_layouts_match_transformers(layout_id, tmp_path):
    """The same check on tests/checkpoints/layouts.py's models (real vocabulary sizes, tokenizers)."""
    import mlx.core as mx
    from checkpoints.layouts import build

    from macft.config import RunConfig
    from macft.mlx_backend import MLXBackend
    from macft.mlx_backend.model import load
    from macft.model_info import read_model_info

    path = build(layout_id, tmp_path / layout_id)
    cfg = RunConfig()
    cfg.train.precision = "fp32"
    info = read_model_info(path)
    assert MLXBackend().check(cfg, info) == []
    ref = hf_logits(hf_model(path))
    lm = load(path, mx.float32, info)
    got = mlx_logits(lm)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    from macft.mlx_backend.engine import loss_split

    assert loss_split(lm)[1] is None  # the chunked loss applies
