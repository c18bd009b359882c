"""The MLX :class:`~macft.inference.ChatModel` and scorer: base model + a PEFT adapter in mlx-lm."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..adapter import read_peft_adapter
from ..errors import MacftError
from ..inference import Generation, IncrementalText, Sampling, stop_ids
from ..training.chunking import chunk_rows
from .device import on_metal
from .engine import loss_split, token_losses
from .loss import gather, gather_plan, kl_sum
from .model import LoadedModel, load, mx_dtype


def apply_peft_adapter(lm: LoadedModel, adapter_dir: Path) -> list[nn.Module]:
    """Put the PEFT adapter's LoRA layers into the mlx-lm model; returns the LoRA modules."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    modules, cfg = read_peft_adapter(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    keys, layer_ids = set(), set()
    names = {}
    blocks = lm.arch.blocks + "."
    for hf in modules:
        name = lm.mlx_name(hf)
        idx, _, key = name[len(blocks):].partition(".")
        if not name.startswith(blocks) or not idx.isdigit() or not key:
            raise MacftError(f"{adapter_dir}: adapter module {hf} is not inside a transformer block.",
                             "macft loads LoRA on attention / MLP projections only.")
        layer_ids.add(int(idx))
        keys.add(key)
        names[hf] = name
    n_layers = len(lm.model.layers)
    linear_to_lora_layers(lm.model, n_layers - min(layer_ids),
                          {"rank": r, "scale": scale, "dropout": 0.0, "keys": sorted(keys)})
    params = {}
    for k, v in _flat(lm.model.parameters()):
        params[k] = v
    weights, problems = [], []
    for hf, (a, b) in modules.items():
        name = names[hf]
        pa = params.get(f"{name}.lora_a")
        if pa is None:
            problems.append(f"{hf}: no such layer in the model")
            continue
        if tuple(pa.shape) != (a.shape[1], a.shape[0]):
            problems.append(f"{hf}: adapter shape {tuple(a.shape)} vs model {tuple(pa.shape[::-1])}")
            continue
        weights += [(f"{name}.lora_a", mx.array(a.T)), (f"{name}.lora_b", mx.array(b.T))]
    if problems:
        raise MacftError(f"The adapter in {adapter_dir} does not fit this model:\n  " + "\n  ".join(problems[:20]),
                         "Use the base model the adapter was trained on (adapter_config.json names it).")
    lm.model.load_weights(weights, strict=False)
    mx.eval(lm.model.parameters())
    return [m for _, m in lm.model.named_modules() if isinstance(m, LoRALinear)]


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    yield from tree_flatten(tree, prefix)


class MLXChatModel:
    kind = "mlx"

    def __init__(self, model_path: Path, adapter_dir: Path | None, end_tokens: list[str], precision: str = "auto"):
        from ..data.tokenizer import load_tokenizer

        dtype = mx_dtype("bf16" if precision == "auto" and on_metal() else
                         "fp32" if precision == "auto" else precision)
        self.lm = load(Path(model_path), dtype)
        self.lora = apply_peft_adapter(self.lm, adapter_dir) if adapter_dir else []
        self.scales = [m.scale for m in self.lora]
        self.lm.model.eval()
        self.tokenizer = load_tokenizer(str(model_path))
        self.stop = stop_ids(self.tokenizer, end_tokens)
        self.description = f"{model_path} + {adapter_dir} (MLX)" if adapter_dir else f"{model_path} (MLX)"
        self.last: Generation | None = None
        self._loss_split: Any = None  # made on first use (scoring only)

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        for m, s in zip(self.lora, self.scales):
            m.scale = s if enabled else 0.0
        try:
            yield
        finally:
            for m, s in zip(self.lora, self.scales):
                m.scale = s

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from macft.data.render import Renderer

        return Renderer(self.tokenizer).prompt_ids(messages)

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[str]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(sampling.seed)
        sampler = make_sampler(sampling.temperature, top_p=sampling.top_p)
        text = IncrementalText(self.tokenizer)
        stopped = False
        for tok, _ in generate_step(mx.array(prompt_ids), self.lm.model, max_tokens=sampling.max_new_tokens,
                                    sampler=sampler):
            t = int(tok)
            if t in self.stop:
                stopped = True
                break
            piece = text.add(t)
            if piece:
                yield piece
        self.last = Generation(self.tokenizer.decode(text.ids, skip_special_tokens=True), text.ids, stopped,
                               len(prompt_ids))

    # -- scoring ----------------------------------------------------------------------

    def _split(self) -> Any:
        if self._loss_split is None:
            self._loss_split = loss_split(self.lm)[0]
        return self._loss_split

    def loss(self, batch: Any) -> tuple[float, int]:
        s, n = token_losses(self.lm, mx.array(batch.input_ids), mx.array(batch.loss_mask), split=self._split())
        return float(s.item()), int(n.item())

    def base_loss(self, batch: Any) -> tuple[float, int]:
        with self.adapters(False):
            return self.loss(batch)

    def kl_to_base(self, batch: Any) -> tuple[float, int]:
        split = self._split()
        plan = {k: mx.array(v) for k, v in gather_plan(batch.loss_mask, batch.segment_ids, every_real=True).items()}
        ids = mx.array(batch.input_ids)
        h, _ = gather(split.hidden(ids[:, :-1]), ids, plan["idx"])
        with self.adapters(False):
            hb, _ = gather(split.hidden(ids[:, :-1]), ids, plan["idx"])
        kl = kl_sum(split.head, h, hb, plan["w_kl"], 1.0, chunk_rows(self.lm.info.vocab_size))
        return float(kl.item()), int(plan["w_kl"].sum().item())

    def close(self) -> None:
        pass
