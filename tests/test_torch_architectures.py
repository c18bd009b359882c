"""PyTorch backend and the streaming merge on the published checkpoint layouts.

Tiny random-init models written the way their hub repositories are (config.json with the
hub's keys, sparse where the hub's is; safetensors with the published tensor names):

- GPT-2: openai-community/gpt2 (``h.0...``, no ``transformer.`` prefix, tied lm_head) and
  rinna/japanese-gpt2-medium (``transformer.h.0...``); Conv1D projections, stored [in, out]
- GPT-NeoX with transformers-4.26 keys: rinna 3.6b (``rotary_pct`` 1.0, sequential residual,
  ``embed_out``) and pythia (``rotary_pct`` 0.25, parallel residual)
- Gemma-3 4B: ``Gemma3ForConditionalGeneration``, a ``text_config`` without head counts or
  head_dim, ``language_model.model.*`` + vision tower in two shards
- Llama (``model.layers...``, untied lm_head)

For each: LoRA targets resolve to exactly the text decoder's projections by full module
path; the adapter a short training writes reloads with PEFT on the original checkpoint and
gives the training process's logits; export's merge on the published layout gives a model
with PEFT's logits (which proves the naming and the Conv1D transpose). One tiny QLoRA case
(GPT-2 in 4 bits). The same on the faithful layouts of tests/checkpoints (published dtypes,
old buffers, real configs). About 30 s together on 2 cores.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

VOCAB = 300
SEQ = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- published layouts


def _write(out: Path, hub_config: dict, state: dict[str, Any], rename: Callable[[str], str | None],
           shards: int = 1) -> Path:
    """config.json as published, and the state dict under the published names (None: left out),
    in fp32 (``torch_dtype`` in the config says what the hub's files hold; the logits compare
    at fp32 precision)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hub_config, indent=1))
    tensors = {}
    for k, v in state.items():
        name = rename(k)
        if name is not None:
            tensors[name] = v.detach().to(torch.float32).contiguous()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _random_model(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def gpt2(out: Path, prefixed: bool) -> Path:
    """openai-community/gpt2 (prefixed False) or rinna/japanese-gpt2-medium (True)."""
    from transformers import GPT2Config

    hub = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
           "n_ctx": 64, "n_embd": 64, "n_head": 2, "n_layer": 2, "n_positions": 64,
           "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    model = _random_model(GPT2Config(**{k: v for k, v in hub.items() if k != "architectures"},
                                     initializer_range=0.2))

    def rename(k: str) -> str | None:
        if k == "lm_head.weight":  # tied to wte: not in the published files
            return None
        return k if prefixed else k.removeprefix("transformer.")
    return _write(out, hub, model.state_dict(), rename)


def gpt_neox(out: Path, pythia: bool) -> Path:
    """rinna/japanese-gpt-neox-3.6b (pythia False) or EleutherAI/pythia (True): 4.26 keys."""
    from transformers import AutoConfig

    hub = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
           "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
           "max_position_embeddings": 64, "layer_norm_eps": 1e-5, "vocab_size": VOCAB,
           "rotary_pct": 0.25 if pythia else 1.0, "rotary_emb_base": 10000,
           "use_parallel_residual": pythia, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "float16", "transformers_version": "4.26.0"}
    probe = out.parent / f"{out.name}-config"
    probe.mkdir()
    (probe / "config.json").write_text(json.dumps({**hub, "initializer_range": 0.2}))
    model = _random_model(AutoConfig.from_pretrained(str(probe)))
    assert model.config.rope_parameters["partial_rotary_factor"] == hub["rotary_pct"]
    return _write(out, hub, model.state_dict(),
                  lambda k: "embed_out.weight" if k == "lm_head.weight" else k)


def gemma3_4b(out: Path) -> Path:
    """google/gemma-3-4b-it's layout: sparse text_config, language_model.model.*, two shards."""
    from transformers import AutoConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma3_text",
            "num_hidden_layers": 2, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 16}  # no vocab_size either: 262,208
    vision = {"hidden_size": 32, "image_size": 28, "intermediate_size": 64, "model_type": "siglip_vision_model",
              "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False}
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
           "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
           "mm_tokens_per_image": 4, "model_type": "gemma3", "text_config": text,
           "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "vision_config": vision}
    probe = out.parent / f"{out.name}-config"
    probe.mkdir()
    (probe / "config.json").write_text(json.dumps(hub))
    config = AutoConfig.from_pretrained(str(probe))
    config.initializer_range = config.text_config.initializer_range = 0.2
    model = _random_model(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert config.text_config.num_attention_heads == 8 and config.text_config.head_dim == 256  # defaults

    def rename(k: str) -> str | None:
        for new, old in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):
            if k.startswith(new):
                return old + k[len(new):]
        return None if k == "lm_head.weight" else k
    return _write(out, hub, model.state_dict(), rename, shards=2)


def llama(out: Path) -> Path:
    from transformers import LlamaConfig

    hub = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "max_position_embeddings": 64, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
    model = _random_model(LlamaConfig(**{k: v for k, v in hub.items() if k != "architectures"},
                                      initializer_range=0.2))
    return _write(out, hub, model.state_dict(), lambda k: k)


GPT2_BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NEOX_BLOCK = ("attention.dense", "attention.query_key_value", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h")
LLAMA_BLOCK = ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
               "self_attn.q_proj", "self_attn.v_proj")
# layout id: (builder, blocks' module path in transformers 5, linears in a block, Conv1D)
LAYOUTS = {
    "gpt2": (lambda p: gpt2(p, prefixed=False), "transformer.h", GPT2_BLOCK, True),
    "rinna-gpt2": (lambda p: gpt2(p, prefixed=True), "transformer.h", GPT2_BLOCK, True),
    "rinna-neox": (lambda p: gpt_neox(p, pythia=False), "gpt_neox.layers", NEOX_BLOCK, False),
    "pythia": (lambda p: gpt_neox(p, pythia=True), "gpt_neox.layers", NEOX_BLOCK, False),
    "gemma3-4b": (gemma3_4b, "model.language_model.layers", LLAMA_BLOCK, False),
    "llama": (llama, "model.layers", LLAMA_BLOCK, False),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {k: build(root / k) for k, (build, *_) in LAYOUTS.items()}


# --------------------------------------------------------------------------- helpers


def _load(path: Path) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in fp32, eval; every weight must be found."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def _ids() -> Any:
    return torch.from_numpy(np.random.default_rng(1).integers(3, VOCAB, (2, SEQ)))


def _logits(model: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=_ids(), use_cache=False).logits.float()


def _train_briefly(path: Path, adapter: Path, quantize: str = "none", steps: int = 3) -> tuple[Any, Any]:
    """``load_for_training`` + the engine's own steps and ``save_adapter`` (what ``macft train``
    does, minus the data pipeline). Returns (the engine, whose model is the training model,
    the :class:`~cuda_backend.model.LoadedModel`)."""
    from cuda_backend.distributed import DistContext
    from cuda_backend.engine import TorchEngine
    from cuda_backend.hardware import Precision
    from cuda_backend.model import load_for_training
    from macft.config import RunConfig
    from macft.data.batching import collate
    from macft.data.dataset import Example
    from macft.model_info import read_model_info

    cfg = RunConfig()
    cfg.model.name, cfg.model.quantize = str(path), quantize
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    precision = Precision("fp32", False)
    loaded = load_for_training(cfg, path, read_model_info(path), precision, "cpu")
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    engine = TorchEngine(loaded.model, loaded.lora_modules, loaded.spec, torch.optim.AdamW(params, lr=0.05),
                         DistContext(), precision, seed=0, device_label="CPU")
    ids = _ids().numpy().astype(np.int32)
    batch = collate([[Example(ids=row, mask=np.ones(SEQ, np.uint8), where="x")] for row in ids],
                    pad_id=0, packed=False)
    engine.eval_batch(batch)  # as the loop's step-0 validation (bitsandbytes must not repack after it)
    losses = []
    for _ in range(steps):
        loss, n = engine.train_micro(batch)
        engine.optimizer_step(0.05, n, 1.0)
        losses.append(loss / n)
    assert losses[-1] < losses[0], losses
    engine.save_adapter(adapter)
    return engine, loaded


def _peft_reload(base: Path, adapter: Path) -> Any:
    """The adapter on the original checkpoint, as a user loads it; every LoRA weight in the
    file must land in a layer, and every LoRA layer must get one."""
    from peft import PeftModel
    from safetensors.numpy import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(_load(base), str(adapter)).eval()
    odd = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert not odd, odd
    in_file = {k.replace(".weight", "") for k in load_file(str(adapter / "adapter_model.safetensors"))}
    in_model = {k.replace(".default.weight", "") for k, _ in model.named_parameters() if ".lora_" in k}
    assert in_file == in_model
    return model


def _merge(base: Path, adapter: Path, out: Path, quant: Any = None) -> Any:
    from export.merge import merge, plan_merge

    return merge(plan_merge(base, adapter, quant), out)


# --------------------------------------------------------------------------- (a) targets


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_all_linear_is_the_text_decoders_projections_by_full_path(layouts, layout):
    from cuda_backend.model import resolve_targets

    _, blocks, linears, conv1d = LAYOUTS[layout]
    model = _load(layouts[layout])
    t = resolve_targets(model, ["all-linear"], -1)
    assert t.modules == sorted(f"{blocks}.{i}.{sub}" for i in range(2) for sub in linears)
    assert t.fan_in_fan_out is conv1d and t.conv1d is conv1d
    # the names are the ones transformers' module tree has (no vision tower, no lm_head)
    names = dict(model.named_modules())
    assert all(m in names for m in t.modules)
    last = resolve_targets(model, ["all-linear"], 1)
    assert last.modules == sorted(f"{blocks}.1.{sub}" for sub in linears) and last.layers == [1]


def test_named_targets_on_gpt2s_conv1d(layouts):
    from cuda_backend.model import resolve_targets
    from macft.errors import MacftError

    model = _load(layouts["gpt2"])
    assert resolve_targets(model, ["c_attn"], -1).modules == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    # c_proj is in attn and mlp; a longer name picks one
    assert len(resolve_targets(model, ["c_proj"], -1).modules) == 4
    assert resolve_targets(model, ["attn.c_proj"], -1).modules == [f"transformer.h.{i}.attn.c_proj" for i in (0, 1)]
    with pytest.raises(MacftError) as e:
        resolve_targets(model, ["q_proj"], -1)
    assert "q_proj" in str(e.value) and "c_attn" in str(e.value) and "c_fc" in str(e.value)


# --------------------------------------------------------------------------- (b) + (c)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adapter_reloads_with_peft_and_merges_on_the_published_layout(layouts, layout, tmp_path):
    _, blocks, linears, conv1d = LAYOUTS[layout]
    base = layouts[layout]
    engine, _ = _train_briefly(base, tmp_path / "adapter")
    trained = _logits(engine.model.eval())

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(f"{blocks}.{i}.{sub}" for i in range(2) for sub in linears)
    assert cfg["layers_to_transform"] is None and cfg["fan_in_fan_out"] is conv1d

    peft_model = _peft_reload(base, tmp_path / "adapter")
    reloaded = _logits(peft_model)
    assert torch.allclose(reloaded, trained, atol=1e-5), float((reloaded - trained).abs().max())
    with peft_model.disable_adapter():
        assert float((_logits(peft_model) - reloaded).abs().max()) > 1e-2  # the adapter does something

    res = _merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert res.merged == 2 * len(linears)
    src = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == src
    merged = _logits(_load(tmp_path / "merged"))
    assert torch.allclose(merged, reloaded, atol=1e-4), float((merged - reloaded).abs().max())


def test_canonical_names_across_gpt2_and_neox_checkpoints():
    from export.names import canonical, stored_in_out

    assert canonical("transformer.h.0.attn.c_attn") == canonical("h.0.attn.c_attn") == "h.0.attn.c_attn"
    assert canonical("base_model.model.transformer.h.0.attn.c_attn") == "h.0.attn.c_attn"
    assert canonical("gpt_neox.layers.0.attention.dense") == "gpt_neox.layers.0.attention.dense"
    assert canonical("embed_out") == canonical("lm_head") == "lm_head"  # GPT-NeoX on disk / loaded
    assert stored_in_out("gpt2", "h.0.mlp.c_fc", (64, 256))
    assert not stored_in_out("gpt2", "transformer.wte", (300, 64))
    assert not stored_in_out("gpt_neox", "gpt_neox.layers.0.attention.dense", (64, 64))


# --------------------------------------------------------------------------- QLoRA on GPT-2


def test_gpt2_qlora_quantizes_the_conv1d_layers_and_export_rebuilds_that_base(layouts, tmp_path):
    """transformers turns GPT-2's Conv1D layers into bitsandbytes Linear4bit holding the
    transposed weight, and QLoRA trains on them. The record lists them; export quantizes the
    transposed stored weight and merges the update transposed, which reproduces the training
    model."""
    pytest.importorskip("bitsandbytes")
    from cuda_backend.model import write_quant_record
    from export.dequant import read_base_quantization

    base = layouts["gpt2"]
    engine, loaded = _train_briefly(base, tmp_path / "adapter", quantize="4bit", steps=2)
    rec = loaded.quant_record
    assert rec["method"] == "bnb-nf4" and rec["double_quant"] is True
    assert rec["quantized"] == sorted(f"transformer.h.{i}.{s}" for i in range(2) for s in GPT2_BLOCK)
    assert rec["unquantized"] == ["lm_head"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    # (eval mode: on CPUs with AVX512-BF16 bitsandbytes would repack the 4-bit weights for a bf16
    # kernel here, unless load_base stops it; the training steps after a validation pass then
    # failed on GPT-2's biases)
    trained = _logits(engine.model.eval())

    write_quant_record(tmp_path, rec)
    quant = read_base_quantization(tmp_path)
    res = _merge(base, tmp_path / "adapter", tmp_path / "merged", quant)
    assert res.merged == 8 and res.dequantized == 8
    merged = _logits(_load(tmp_path / "merged"))
    assert torch.allclose(merged, trained, atol=1e-4), float((merged - trained).abs().max())
    # without the training-time roundtrip the merged model is measurably another model
    _merge(base, tmp_path / "adapter", tmp_path / "original")
    assert float((_logits(_load(tmp_path / "original")) - trained).abs().max()) > 1e-2


# --------------------------------------------------------------------------- tests/checkpoints layouts

# The published layouts of tests/checkpoints (real configs, published dtypes and shards, the
# old buffers of 4.x-era checkpoints). Their bases are fp16/bf16, so the merged weights are
# compared with PEFT's own merge rounded to that dtype (one unit in the last place apart at
# most), not the logits.
PUBLISHED = {  # layout id: (blocks' module path, linears in a block, Conv1D)
    "gpt2": ("transformer.h", GPT2_BLOCK, True),
    "rinna-gpt2-medium": ("transformer.h", GPT2_BLOCK, True),
    "rinna-neox-3.6b": ("gpt_neox.layers", NEOX_BLOCK, False),
    "pythia": ("gpt_neox.layers", NEOX_BLOCK, False),
    "gemma3-4b": ("model.language_model.layers", LLAMA_BLOCK, False),
    "elyza-llama2-7b": ("model.layers", LLAMA_BLOCK, False),
}
ULP = {"F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("layout", list(PUBLISHED))
def test_published_layout_trains_reloads_and_merges(layout, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export.names import canonical
    from export.safetensors_io import SafetensorsFile
    from tests.checkpoints.layouts import build

    blocks, linears, conv1d = PUBLISHED[layout]
    base = build(layout, tmp_path / "base")
    _train_briefly(base, tmp_path / "adapter", steps=2)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    n_layers = len(targets) // len(linears)
    assert targets == sorted(f"{blocks}.{i}.{sub}" for i in range(n_layers) for sub in linears)
    assert cfg["fan_in_fan_out"] is conv1d

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    assert sum(1 for k, _ in peft_model.named_parameters() if ".lora_A." in k) == len(targets)
    ref = {canonical(k[:-7]): v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()
           if k.endswith(".weight")}

    assert _merge(base, tmp_path / "adapter", tmp_path / "merged").merged == len(targets)
    adapted = {canonical(m) for m in targets}
    checked = 0
    for shard in sorted((tmp_path / "merged").glob("*.safetensors")):
        sf, src = SafetensorsFile(shard), SafetensorsFile(base / shard.name)
        for t in sf.ordered():
            c = canonical(t.name[:-7]) if t.name.endswith(".weight") else None
            if c not in adapted:  # copied byte for byte, old buffers included
                assert sf.read_raw(t) == src.read_raw(src.tensors[t.name]), t.name
                continue
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.dtype]
            want = torch.from_numpy(ref[c]).to(dtype).float().numpy()  # PEFT's merge, rounded
            ulp = ULP[t.dtype] * float(np.abs(want).max())
            np.testing.assert_allclose(sf.read_f32(t), want, rtol=0, atol=ulp, err_msg=t.name)
            checked += 1
    assert checked == len(targets)
