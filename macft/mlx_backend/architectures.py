"""What macft needs to know about each architecture it trains with MLX.

mlx-lm provides the model code; it reads its own ``ModelArgs`` from config.json and
assumes its own weight names. Published checkpoints are not that regular: Gemma-3 4B's
``text_config`` holds only the keys that differ from the defaults, GPT-NeoX configs carry
transformers-4.26 keys (``rotary_pct``) or transformers-5 ones (``rope_parameters``),
GPT-2 weights come with and without the ``transformer.`` prefix, and mlx-lm hard-codes
some choices the config makes (GPT-NeoX's exact GELU, GPT-2's MLP width). So for every
supported architecture this module states, from the config as transformers fills it
(:class:`~macft.model_info.ModelInfo`):

- ``args``: every field of mlx-lm's ``ModelArgs``, and the variants mlx-lm's code would
  compute differently from transformers (refused before any weight is read);
- ``rename``: the published weight namings -> the one mlx-lm's ``sanitize`` expects;
- ``patch``: the modules replaced so the model computes what transformers computes;
- ``names``: mlx-lm module paths <-> the paths in transformers 5's
  ``AutoModelForCausalLM`` (what a PEFT adapter names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..model_info import ModelInfo
from .packing import current_segments, segment_positions
from .supported import SUPPORTED

# Rope types whose mlx-lm implementation macft checked against transformers (logits).
ROPE_TYPES = ("default", "linear", "llama3")

# transformers' ACT2FN names -> MLX functions (checked to 1e-6 against transformers).
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
}


@dataclass(frozen=True)
class ModuleNames:
    """mlx-lm module path <-> the same module's path in transformers 5's
    ``AutoModelForCausalLM.from_pretrained(base)``. ``pairs`` are (mlx prefix, HF prefix),
    each ending in '.'; the first that matches wins, in either direction."""

    pairs: tuple[tuple[str, str], ...] = ()

    def to_hf(self, name: str) -> str:
        return self._swap(name, 0, 1)

    def to_mlx(self, name: str) -> str:
        return self._swap(name, 1, 0)

    def _swap(self, name: str, src: int, dst: int) -> str:
        dotted = name + "."
        for pair in self.pairs:
            if dotted.startswith(pair[src]):
                return (pair[dst] + dotted[len(pair[src]):])[:-1]
        return name


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' model_type (config.json)
    mlx_type: str  # the mlx_lm.models module
    args: Callable[[ModelInfo, list[str]], dict[str, Any]]  # appends what it cannot map
    blocks: str = "model.layers"  # mlx path of the transformer blocks
    names: ModuleNames = field(default_factory=ModuleNames)
    # on-disk prefix -> the prefix mlx-lm's sanitize expects, first match wins
    renames: tuple[tuple[str, str], ...] = ()
    drop_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)  # buffers of old checkpoints
    lm_head: str = "lm_head.weight"  # after renames; dropped when the embeddings are tied
    patch: Callable[[nn.Module, ModelInfo], None] | None = None
    fan_in_fan_out: bool = False  # HF stores the projections [in, out] (GPT-2's Conv1D)
    # the loss's split (macft.mlx_backend.loss): the module whose call gives the final hidden
    # states, and the output layer's possible paths, first present wins (an embedding: tied)
    backbone: str = "model"
    heads: tuple[str, ...] = ("lm_head", "model.embed_tokens")

    @property
    def description(self) -> str:
        return SUPPORTED[self.model_type]

    def rename(self, weights: dict[str, mx.array], info: ModelInfo) -> dict[str, mx.array]:
        """Every published naming of this architecture -> the names mlx-lm's sanitize takes."""
        out: dict[str, mx.array] = {}
        for k, v in weights.items():
            if k.endswith(self.drop_suffixes):
                continue
            for old, new in self.renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            out[k] = v
        if info.tied:
            out.pop(self.lm_head, None)
        return out


# --------------------------------------------------------------------------- config


def _rope(params: dict[str, Any] | None, problems: list[str], where: str = "") -> tuple[Any, dict | None]:
    """(rope theta, mlx-lm ``rope_scaling`` or None) from a transformers-5 rope_parameters dict."""
    rp = dict(params or {})
    theta = rp.pop("rope_theta", None)
    rtype = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("partial_rotary_factor", None)  # the architecture reads it (GPT-NeoX)
    if rtype not in ROPE_TYPES:
        problems.append(f"rope type '{rtype}'{where} (macft checked {', '.join(ROPE_TYPES)} on MLX)")
    if theta is None:
        problems.append(f"a config without rope_theta{where}")
    if rtype == "default":
        return theta, None
    return theta, {**rp, "type": rtype, "rope_type": rtype}


def _rope_parameters(t: Any) -> dict[str, Any]:
    rp = getattr(t, "rope_parameters", None)
    if isinstance(rp, dict):
        return rp
    return {"rope_theta": getattr(t, "rope_theta", None), **(getattr(t, "rope_scaling", None) or {})}


def _activation(name: Any, problems: list[str]) -> Callable[[mx.array], mx.array]:
    if name not in ACTIVATIONS:
        problems.append(f"activation '{name}'")
        return nn.gelu
    return ACTIVATIONS[name]


def _no_sliding(t: Any, problems: list[str]) -> None:
    if getattr(t, "use_sliding_window", False):
        problems.append("sliding-window attention (use_sliding_window; mlx-lm's code has none)")


def _llama_like(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    """Fields shared by mlx-lm's llama, qwen2 and qwen3 ModelArgs."""
    t = info.text
    theta, scaling = _rope(_rope_parameters(t), problems)
    act = getattr(t, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"activation '{act}' (mlx-lm's code has SwiGLU with silu)")
    return {
        "model_type": info.model_type, "hidden_size": info.hidden_size,
        "num_hidden_layers": info.num_layers, "intermediate_size": info.intermediate_size,
        "num_attention_heads": info.num_heads, "num_key_value_heads": info.num_kv_heads,
        "rms_norm_eps": float(t.rms_norm_eps), "vocab_size": info.vocab_size,
        "max_position_embeddings": getattr(t, "max_position_embeddings", None),
        "rope_theta": theta, "rope_traditional": False, "rope_scaling": scaling,
        "tie_word_embeddings": info.tied,
    }


def _llama_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    t = info.text
    args = _llama_like(info, problems)
    # Mistral's sliding_window (v0.1: 4096) spans every layer. mlx-lm's llama needs at least one
    # full-attention layer, so it runs full causal attention: identical for sequences up to the
    # window, which macft's max_seq_len stays well below.
    args.update(head_dim=info.head_dim, attention_bias=bool(getattr(t, "attention_bias", False)),
                mlp_bias=bool(getattr(t, "mlp_bias", False)), layer_types=None, sliding_window=None)
    return args


def _qwen2_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    _no_sliding(info.text, problems)
    if info.head_dim != info.hidden_size // info.num_heads:
        problems.append(f"head_dim {info.head_dim} != hidden_size / heads (mlx-lm's qwen2 derives it)")
    return _llama_like(info, problems)


def _qwen3_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    _no_sliding(info.text, problems)
    if getattr(info.text, "attention_bias", False):
        problems.append("attention_bias (mlx-lm's qwen3 has no attention biases)")
    args = {**_llama_like(info, problems), "head_dim": info.head_dim, "rope_parameters": None}
    del args["rope_traditional"]  # not a field of mlx-lm's qwen3
    return args


def _gemma_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    t = info.text
    theta, scaling = _rope(_rope_parameters(t), problems)
    if scaling:
        problems.append("rope scaling (mlx-lm's gemma has plain RoPE)")
    if getattr(t, "attention_bias", False):
        problems.append("attention_bias (mlx-lm's gemma has no attention biases)")
    if not info.tied:
        problems.append("an untied output layer (mlx-lm's gemma ties it to the embeddings)")
    _activation(getattr(t, "hidden_act", None), problems)
    return {
        "model_type": "gemma", "hidden_size": info.hidden_size, "num_hidden_layers": info.num_layers,
        "intermediate_size": info.intermediate_size, "num_attention_heads": info.num_heads,
        "head_dim": info.head_dim, "rms_norm_eps": float(t.rms_norm_eps), "vocab_size": info.vocab_size,
        "num_key_value_heads": info.num_kv_heads, "rope_theta": theta, "rope_traditional": False,
    }


def _gemma3_text_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    t = info.text
    rp = _rope_parameters(t)
    if "full_attention" in rp or "sliding_attention" in rp:  # transformers 5: per layer type
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full, local = rp, {"rope_theta": getattr(t, "rope_local_base_freq", None)}
    theta, scaling = _rope(full, problems, " (full attention)")
    local_theta, local_scaling = _rope(local, problems, " (sliding attention)")
    if local_scaling:
        problems.append("rope scaling on the sliding-attention layers (mlx-lm scales only the global ones)")
    lt = list(getattr(t, "layer_types", None) or [])
    pattern = lt.index("full_attention") + 1 if "full_attention" in lt else 0
    expect = ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(lt))]
    if not pattern or lt != expect:
        problems.append(f"layer_types {lt[:8]}{'...' if len(lt) > 8 else ''} (mlx-lm's gemma3 needs a "
                        "full-attention layer every N layers)")
    for k in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(t, k, None) is not None:
            problems.append(f"{k} (mlx-lm's gemma3 has none)")
    if getattr(t, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (an embedding model)")
    _activation(getattr(t, "hidden_activation", None), problems)
    return {
        "model_type": "gemma3_text", "hidden_size": info.hidden_size, "num_hidden_layers": info.num_layers,
        "intermediate_size": info.intermediate_size, "num_attention_heads": info.num_heads,
        "head_dim": info.head_dim, "rms_norm_eps": float(t.rms_norm_eps), "vocab_size": info.vocab_size,
        "num_key_value_heads": info.num_kv_heads, "rope_theta": theta, "rope_local_base_freq": local_theta,
        "query_pre_attn_scalar": float(t.query_pre_attn_scalar), "sliding_window": int(t.sliding_window),
        "sliding_window_pattern": pattern or info.num_layers,
        "max_position_embeddings": int(t.max_position_embeddings), "rope_scaling": scaling,
    }


def _gemma3_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    text = _gemma3_text_args(info, problems)
    return {"model_type": "gemma3", "vocab_size": text["vocab_size"], "text_config": text}


def _gpt_neox_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    t = info.text
    rp = _rope_parameters(t)
    theta, scaling = _rope(rp, problems)
    if scaling:
        problems.append("rope scaling (mlx-lm's gpt_neox has plain RoPE)")
    # transformers 5 reads partial_rotary_factor from rope_parameters (1.0 when absent);
    # AutoConfig has moved a 4.26 config's rotary_pct there.
    pct = rp.get("partial_rotary_factor", getattr(t, "rotary_pct", None) or 1.0)
    if not getattr(t, "attention_bias", True):
        problems.append("attention without biases (mlx-lm's gpt_neox has them)")
    if info.tied:
        problems.append("an output layer tied to the embeddings (mlx-lm's gpt_neox keeps embed_out)")
    _activation(getattr(t, "hidden_act", None), problems)
    return {
        "model_type": "gpt_neox", "max_position_embeddings": int(t.max_position_embeddings),
        "hidden_size": info.hidden_size, "num_attention_heads": info.num_heads,
        "num_hidden_layers": info.num_layers, "layer_norm_eps": float(t.layer_norm_eps),
        "vocab_size": info.vocab_size, "rotary_emb_base": theta, "rotary_pct": float(pct),
        "use_parallel_residual": bool(getattr(t, "use_parallel_residual", True)),
        "num_key_value_heads": None,
    }


def _gpt2_args(info: ModelInfo, problems: list[str]) -> dict[str, Any]:
    t = info.text
    if not info.tied:
        problems.append("an untied output layer (mlx-lm's gpt2 ties it to the embeddings)")
    if not getattr(t, "scale_attn_weights", True) or getattr(t, "scale_attn_by_inverse_layer_idx", False):
        problems.append("non-standard attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx)")
    if getattr(t, "add_cross_attention", False):
        problems.append("cross-attention")
    _activation(getattr(t, "activation_function", None), problems)
    n_positions = int(t.n_positions)
    return {
        "model_type": "gpt2", "n_ctx": int(getattr(t, "n_ctx", None) or n_positions), "n_embd": info.hidden_size,
        "n_head": info.num_heads, "n_layer": info.num_layers, "n_positions": n_positions,
        "layer_norm_epsilon": float(t.layer_norm_epsilon), "vocab_size": info.vocab_size,
        "num_key_value_heads": None,
    }


# --------------------------------------------------------------------------- modules


class GatedMLP(nn.Module):
    """Gemma's gated MLP with the activation its config names (mlx-lm hard-codes one)."""

    def __init__(self, mlp: nn.Module, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class NeoXMLP(nn.Module):
    """GPT-NeoX's MLP with the config's width and activation (mlx-lm: 4 x width, tanh GELU;
    Pythia and rinna use the exact GELU)."""

    def __init__(self, dims: int, hidden: int, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dims, hidden)
        self.dense_4h_to_h = nn.Linear(hidden, dims)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPT2MLP(nn.Module):
    """GPT-2's MLP with the config's width (``n_inner``) and activation."""

    def __init__(self, dims: int, hidden: int, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.c_fc = nn.Linear(dims, hidden)
        self.c_proj = nn.Linear(hidden, dims)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


class PackedPositionEmbedding(nn.Embedding):
    """GPT-2's learned positions. Inside a packed batch every example's positions restart
    at 0, so it sees what it would see alone (RoPE models need nothing: only relative
    positions matter to them)."""

    def __call__(self, x: mx.array) -> mx.array:
        seg = current_segments()
        return super().__call__(x if seg is None else segment_positions(seg))

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        return QuantizedPackedPositionEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedPackedPositionEmbedding(nn.QuantizedEmbedding):
    """:class:`PackedPositionEmbedding` after ``--quantize`` (or in an MLX-quantized GPT-2)."""

    def __call__(self, x: mx.array) -> mx.array:
        seg = current_segments()
        return super().__call__(x if seg is None else segment_positions(seg))


class Gemma3Embedding(nn.Embedding):
    """mlx-lm's gemma3 scales the embeddings by sqrt(hidden) rounded to bf16 in every dtype;
    transformers rounds it to the weights' dtype. In fp32 that is 0.2% on Gemma-3 1B/4B
    (logits off by up to 4e-2 on a tiny model), so in fp32 the rounding is undone here."""

    def __init__(self, num_embeddings: int, dims: int, hidden: int):
        super().__init__(num_embeddings, dims)
        self.fp32_correction = hidden**0.5 / mx.array(hidden**0.5, dtype=mx.bfloat16).item()

    def __call__(self, x: mx.array) -> mx.array:
        h = super().__call__(x)
        return h * self.fp32_correction if h.dtype == mx.float32 else h


def _gated_activation(key: str) -> Callable[[nn.Module, ModelInfo], None]:
    def patch(model: nn.Module, info: ModelInfo) -> None:
        act = ACTIVATIONS[getattr(info.text, key)]
        for layer in model.layers:
            layer.mlp = GatedMLP(layer.mlp, act)

    return patch


def _patch_gemma3(model: nn.Module, info: ModelInfo) -> None:
    _gated_activation("hidden_activation")(model, info)
    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    n, d = inner.embed_tokens.weight.shape
    inner.embed_tokens = Gemma3Embedding(n, d, info.hidden_size)


def _patch_gpt_neox(model: nn.Module, info: ModelInfo) -> None:
    act = ACTIVATIONS[info.text.hidden_act]
    for layer in model.layers:
        layer.mlp = NeoXMLP(info.hidden_size, info.intermediate_size, act)


def _patch_gpt2(model: nn.Module, info: ModelInfo) -> None:
    act = ACTIVATIONS[info.text.activation_function]
    for layer in model.layers:
        layer.mlp = GPT2MLP(info.hidden_size, info.intermediate_size, act)
    inner = model.model
    inner.wpe = PackedPositionEmbedding(inner.n_positions, inner.n_embd)


# --------------------------------------------------------------------------- the table

_GEMMA3_MM = ModuleNames((("language_model.model.", "model.language_model."),
                          ("language_model.lm_head.", "lm_head.")))

ARCHITECTURES: dict[str, Arch] = {a.model_type: a for a in (
    Arch("gemma3_text", "gemma3_text", _gemma3_text_args, patch=_patch_gemma3),
    Arch("gemma3", "gemma3", _gemma3_args, blocks="language_model.model.layers", names=_GEMMA3_MM,
         # transformers 5 saves the names it uses in memory; mlx-lm's sanitize takes the published ones
         renames=(("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                  ("model.multi_modal_projector.", "multi_modal_projector."),
                  ("lm_head.", "language_model.lm_head.")),
         lm_head="language_model.lm_head.weight", patch=_patch_gemma3, backbone="language_model.model",
         heads=("language_model.lm_head", "language_model.model.embed_tokens")),
    Arch("gemma", "gemma", _gemma_args, patch=_gated_activation("hidden_act")),
    Arch("llama", "llama", _llama_args),
    Arch("mistral", "llama", _llama_args),
    Arch("qwen2", "qwen2", _qwen2_args),
    Arch("qwen3", "qwen3", _qwen3_args),
    # transformers 5 calls the output layer lm_head (published files: embed_out)
    Arch("gpt_neox", "gpt_neox", _gpt_neox_args, blocks="model.h",
         names=ModuleNames((("model.h.", "gpt_neox.layers."), ("model.embed_out.", "lm_head."),
                            ("model.", "gpt_neox."))),
         renames=(("lm_head.", "embed_out."),), drop_suffixes=("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"),
         lm_head="embed_out.weight", patch=_patch_gpt_neox, heads=("model.embed_out",)),
    # openai-community/gpt2 has no prefix, rinna/japanese-gpt2-* have `transformer.`; mlx-lm's
    # sanitize transposes the Conv1D weights [in, out] -> [out, in] only for unprefixed names.
    Arch("gpt2", "gpt2", _gpt2_args, blocks="model.h", names=ModuleNames((("model.", "transformer."),)),
         renames=(("transformer.", ""),), drop_suffixes=(".attn.bias", ".attn.masked_bias"),
         patch=_patch_gpt2, fan_in_fan_out=True, heads=("model.wte",)),
)}


def mlx_args(info: ModelInfo) -> tuple[Arch | None, dict[str, Any], list[str]]:
    """(architecture, mlx-lm ModelArgs fields, what mlx-lm would compute differently)."""
    arch = ARCHITECTURES.get(info.model_type)
    if arch is None:
        return None, {}, []
    problems: list[str] = []
    try:
        args = arch.args(info, problems)
    except (AttributeError, TypeError, ValueError) as e:  # a config field we rely on is missing
        return arch, {}, [f"its config lacks what the mapping needs ({e})"]
    return arch, args, problems
