"""The MLX side of the shared loop: loss, gradients, AdamW, state. Math only.

The step function is compiled (``mx.compile``) with the model, optimizer and RNG
state as implicit inputs/outputs, as mlx-lm does; gradients of the summed token
loss are accumulated across micro-batches and scaled by 1/tokens at the
optimizer step, so the loss is the mean over every trained token of the step.
AdamW uses bias correction (as torch's AdamW), so both backends run the same
update rule.
"""

from __future__ import annotations

import json
from contextlib import nullcontext as _nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..adapter import AdapterSpec, read_peft_adapter, write_peft_adapter
from ..data.batching import Batch
from ..errors import MacftError
from ..training.chunking import chunk_rows
from .loss import (
    Split,
    ce_kl_with_grad,
    ce_sum,
    ce_sum_with_grad,
    full_logits_split,
    gather,
    gather_plan,
    split_agrees,
    split_model,
)
from .model import LoadedModel, count_params, lora_weights
from .packing import model_modules, packed_attention

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"


def loss_split(lm: LoadedModel) -> tuple[Split, str | None]:
    """The model as backbone + output layer for the chunked loss, checked against the model's
    own logits; (full-logits fallback, a note saying so) where they differ."""
    split = split_model(lm.model, lm.arch.backbone, lm.arch.heads)
    if split is not None and split_agrees(lm.model, split, lm.info.vocab_size):
        return split, None
    return full_logits_split(lm.model), ("the loss computes full-vocabulary logits (this architecture's "
                                         "output layer could not be separated): more memory")


def token_losses(lm: LoadedModel, ids: mx.array, mask: mx.array, segments: mx.array | None = None,
                 split: Split | None = None) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the target tokens, and their count (fp32): the loss the
    engine trains with (chunked, trained positions only), without gradient. ``segments``
    ([B, T] ids of a packed batch): attention stays within each example."""
    split = split or loss_split(lm)[0]
    plan = {k: mx.array(v) for k, v in gather_plan(np.array(mask), None, every_real=False).items()}
    packed = packed_attention(model_modules(lm.model), segments[:, :-1]) if segments is not None else _nullcontext()
    with packed:
        h, t = gather(split.hidden(ids[:, :-1]), ids, plan["idx"])
    return ce_sum(split.head, h, t, plan["w_ce"], chunk_rows(lm.info.vocab_size)), mask[:, 1:].sum()


class MLXEngine:
    name = "mlx"
    rank = 0
    world_size = 1

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, *, weight_decay: float, packing: bool,
                 device: str, seed: int = 0, grad_checkpoint: bool = False,
                 distill_weight: float = 0.0, distill_temperature: float = 1.0):
        self.lm = lm
        # Dropout randomness is a pure function of (seed, micro-batch count): MLX's global
        # RNG key cannot be restored, so each micro-batch reseeds it and resume is exact.
        self.seed = seed
        self.micro_count = 0
        # its value at the last optimizer step: discarded micro-batches (Ctrl-C mid-step, the
        # memory probe) give their count back, so a resumed run draws the same masks
        self._micro_at_step = 0
        self.model = lm.model
        self.spec = spec
        self.device = device
        self.packing = packing
        self._mask_modules = model_modules(self.model) if packing else []
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._lora_layers = [self._module(n) for n in lm.lora_modules]
        self.split, self.split_note = loss_split(lm)
        self._rows = chunk_rows(lm.info.vocab_size)
        self.last_kl: float | None = None  # mean KL per real token of the last micro-batch
        self.optimizer = optim.AdamW(learning_rate=0.0, betas=[0.9, 0.999], eps=1e-8,
                                     weight_decay=weight_decay, bias_correction=True)
        self._acc: dict | None = None
        self._update: Any = None
        self._update_norm: float | None = None
        self._restore_ckpt = enable_grad_checkpoint(self.model.layers[0]) if grad_checkpoint else None
        loss_and_grad = nn.value_and_grad(self.model, self._loss)
        state = [self.model.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def grad_step(ids: mx.array, seg: mx.array, idx: mx.array, w_ce: mx.array, w_kl: mx.array) -> Any:
            (_, ce, n, kl), grads = loss_and_grad(self.model, ids, seg, idx, w_ce, w_kl)
            return ce, n, kl, grads

        @partial(mx.compile, inputs=state, outputs=state)
        def eval_step(ids: mx.array, seg: mx.array, idx: mx.array, w_ce: mx.array, w_kl: mx.array) -> Any:
            _, ce, n, _ = self._loss(self.model, ids, seg, idx, w_ce, w_kl, train=False)
            return ce, n

        self._grad_step = grad_step
        self._eval_step = eval_step
        mx.reset_peak_memory()

    def _loss(self, model: nn.Module, ids: mx.array, seg: mx.array, idx: mx.array, w_ce: mx.array,
              w_kl: mx.array, train: bool = True) -> Any:
        """(objective, CE sum, trained tokens, KL sum) over the gathered rows ``idx`` of the
        ``[B, T-1]`` positions (see :mod:`.loss`). The objective is the CE sum plus, with
        distillation, weight x mean-KL-per-real-token x trained tokens, so that after the
        loop's 1/tokens scaling it is CE mean + weight x KL mean."""
        distill = train and self.distill_weight > 0
        n = w_ce.sum()
        with packed_attention(self._mask_modules, seg[:, :-1]) if self.packing else _nullcontext():
            h, t = gather(self.split.hidden(ids[:, :-1]), ids, idx)
            if not distill:
                ce = (ce_sum_with_grad if train else ce_sum)(self.split.head, h, t, w_ce, self._rows)
                return ce, ce, n, mx.array(0.0)
            scales = [m.scale for m in self._lora_layers]
            for m in self._lora_layers:  # the base model: same weights, adapters off
                m.scale = 0.0
            hb, _ = gather(mx.stop_gradient(self.split.hidden(ids[:, :-1])), ids, idx)
            for m, sc in zip(self._lora_layers, scales):
                m.scale = sc
        ce, kl = ce_kl_with_grad(self.split.head, h, hb, t, w_ce, w_kl, self.distill_temperature, self._rows)
        n_real = mx.maximum(w_kl.sum(), 1.0)
        objective = ce + self.distill_weight * kl * (n / n_real)
        return objective, ce, n, kl

    def _module(self, name: str) -> nn.Module:
        mod = self.model
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        return mod

    def _arrays(self, batch: Batch, train: bool) -> tuple[mx.array, ...]:
        """The step's inputs: ids, segments, and the rows that reach the output layer."""
        plan = gather_plan(batch.loss_mask, batch.segment_ids, every_real=train and self.distill_weight > 0)
        return (mx.array(batch.input_ids), mx.array(batch.segment_ids),
                mx.array(plan["idx"]), mx.array(plan["w_ce"]), mx.array(plan["w_kl"]))

    # -- Engine protocol -------------------------------------------------------------

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        self.model.train()
        mx.random.seed(self.seed * 1_000_003 + self.micro_count)
        self.micro_count += 1
        loss, n, kl, grads = self._grad_step(*self._arrays(batch, True))
        self._acc = grads if self._acc is None else tree_map(mx.add, self._acc, grads)
        mx.eval(loss, n, kl, self._acc)
        if self.distill_weight > 0:
            real = int((batch.segment_ids[:, 1:] > 0).sum())
            self.last_kl = float(kl.item()) / max(real, 1)
        return float(loss.item()), int(n.item())

    def optimizer_step(self, lr: float, n_tokens: int, max_grad_norm: float) -> float:
        assert self._acc is not None, "optimizer_step without gradients"
        if self._update is None or self._update_norm != max_grad_norm:
            self._update = self._compile_update(max_grad_norm)
            self._update_norm = max_grad_norm
        norm = self._update(self._acc, mx.array(1.0 / n_tokens, dtype=mx.float32),
                            mx.array(lr, dtype=mx.float32))
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, norm)
        self._acc = None
        self._micro_at_step = self.micro_count
        return float(norm.item())

    def _compile_update(self, max_grad_norm: float) -> Any:
        """Scale by 1/tokens, clip, AdamW: one compiled graph (eager, its many small ops
        cost more than the step's matmuls on small models)."""
        state = [self.model.state, self.optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(grads: Any, inv: mx.array, lr: mx.array) -> mx.array:
            grads = tree_map(lambda g: g * inv, grads)
            if max_grad_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
            else:
                norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
            self.optimizer.learning_rate = lr
            self.optimizer.update(self.model, grads)
            return norm

        # the optimizer's state must exist before the graph is traced
        if not self.optimizer._initialized:
            self.optimizer.init(self.model.trainable_parameters())
        return update

    def discard_gradients(self) -> None:
        self._acc = None
        self.micro_count = self._micro_at_step

    def eval_batch(self, batch: Batch) -> tuple[float, int]:
        self.model.eval()
        loss, n = self._eval_step(*self._arrays(batch, False))
        mx.eval(loss, n)
        return float(loss.item()), int(n.item())

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def param_counts(self) -> tuple[int, int]:
        return count_params(self.model)

    # -- adapters and state ------------------------------------------------------------

    def lora_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """HF module path -> (A [r, in], B [out, r]) in PEFT orientation."""
        return lora_weights(self.lm)

    def save_adapter(self, path: Path) -> None:
        write_peft_adapter(path, self.lora_weights(), self.spec)

    def save_state(self, path: Path) -> None:
        opt = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(path / OPTIMIZER_FILE), opt)
        (path / RNG_FILE).write_text(json.dumps({"seed": self.seed, "micro_count": self.micro_count}))

    def load_state(self, path: Path) -> None:
        if not (path / OPTIMIZER_FILE).is_file() or not (path / RNG_FILE).is_file():
            raise MacftError(f"{path} has no {OPTIMIZER_FILE}: it was not written by the mlx backend.",
                             "Resume a run with the backend that started it (see its config.yaml).")
        self.load_adapter_weights(path)
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
        self._update = None  # the compiled update holds the old state dict: retrace
        self.micro_count = int(json.loads((path / RNG_FILE).read_text())["micro_count"])
        self._micro_at_step = self.micro_count
        mx.eval(self.model.parameters(), self.optimizer.state)

    def load_adapter_weights(self, path: Path) -> None:
        """The LoRA weights of a PEFT adapter directory (a checkpoint or best_adapter/)."""
        modules, _ = read_peft_adapter(path)
        by_hf = {self.lm.hf_name(n): n for n in self.lm.lora_modules}
        weights = []
        # row-major copies: mx.array keeps a transposed view's column-major layout, and its
        # matmuls then round differently from the uninterrupted run's (measured: 2e-7 off)
        for hf_name, (a, b) in modules.items():
            mlx_name = by_hf[hf_name]
            weights.append((f"{mlx_name}.lora_a", mx.array(np.ascontiguousarray(a.T))))
            weights.append((f"{mlx_name}.lora_b", mx.array(np.ascontiguousarray(b.T))))
        self.model.load_weights(weights, strict=False)
        mx.eval(self.model.parameters())

    def close(self) -> None:
        if self._restore_ckpt:
            self._restore_ckpt()
            self._restore_ckpt = None


def enable_grad_checkpoint(layer: nn.Module):
    """Recompute each transformer block in the backward pass; returns an undo function.

    Patches the block *class* (as mlx-lm does), so it is undone when training ends.
    """
    cls = type(layer)
    original = cls.__call__

    def checkpointed(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def inner(params: Any, *a: Any, **k: Any) -> Any:
            self.update(params)
            return original(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed

    def undo() -> None:
        cls.__call__ = original

    return undo
