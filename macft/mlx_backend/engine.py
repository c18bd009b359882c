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
from .model import LoadedModel, count_params, lora_weights
from .packing import model_modules, packed_attention

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"


def token_losses(model: nn.Module, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the target tokens, and their count (fp32)."""
    ce, n, _ = _ce(model(ids[:, :-1]), ids, mask)
    return ce, n


def _ce(logits: mx.array, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    m = mask[:, 1:]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]) * m
    return ce.sum(), m.sum(), logits


def kl_to_base(logits: mx.array, base_logits: mx.array, real: mx.array, temperature: float) -> mx.array:
    """Summed KL(fine-tuned || base) over the real (non-padding) positions, times T^2."""
    t = temperature
    lp = nn.log_softmax(logits.astype(mx.float32) / t, axis=-1)
    lq = nn.log_softmax(base_logits.astype(mx.float32) / t, axis=-1)
    kl = (mx.exp(lp) * (lp - lq)).sum(axis=-1)
    return (kl * real).sum() * (t * t)


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
        def grad_step(ids: mx.array, mask: mx.array, seg: mx.array) -> Any:
            (_, ce, n, kl), grads = loss_and_grad(self.model, ids, mask, seg)
            return ce, n, kl, grads

        @partial(mx.compile, inputs=state, outputs=state)
        def eval_step(ids: mx.array, mask: mx.array, seg: mx.array) -> Any:
            _, ce, n, _ = self._loss(self.model, ids, mask, seg, distill=False)
            return ce, n

        self._grad_step = grad_step
        self._eval_step = eval_step
        mx.reset_peak_memory()

    def _loss(self, model: nn.Module, ids: mx.array, mask: mx.array, seg: mx.array,
              distill: bool = True) -> Any:
        """(objective, CE sum, trained tokens, KL sum). The objective is the CE sum plus, with
        distillation, weight x mean-KL-per-real-token x trained tokens, so that after the
        loop's 1/tokens scaling it is CE mean + weight x KL mean."""
        with packed_attention(self._mask_modules, seg[:, :-1]) if self.packing else _nullcontext():
            ce, n, logits = _ce(model(ids[:, :-1]), ids, mask)
            if not (distill and self.distill_weight > 0):
                return ce, ce, n, mx.array(0.0)
            scales = [m.scale for m in self._lora_layers]
            for m in self._lora_layers:  # the base model: same weights, adapters off
                m.scale = 0.0
            base = mx.stop_gradient(model(ids[:, :-1]))
            for m, sc in zip(self._lora_layers, scales):
                m.scale = sc
        real = (seg[:, 1:] > 0).astype(mx.float32)
        kl = kl_to_base(logits, base, real, self.distill_temperature)
        n_real = mx.maximum(real.sum(), 1.0)
        objective = ce + self.distill_weight * kl * (n / n_real)
        return objective, ce, n, kl

    def _module(self, name: str) -> nn.Module:
        mod = self.model
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        return mod

    @staticmethod
    def _arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array]:
        return mx.array(batch.input_ids), mx.array(batch.loss_mask), mx.array(batch.segment_ids)

    # -- Engine protocol -------------------------------------------------------------

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        self.model.train()
        mx.random.seed(self.seed * 1_000_003 + self.micro_count)
        self.micro_count += 1
        loss, n, kl, grads = self._grad_step(*self._arrays(batch))
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
        loss, n = self._eval_step(*self._arrays(batch))
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
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
        self._update = None  # the compiled update holds the old state dict: retrace
        self.micro_count = int(json.loads((path / RNG_FILE).read_text())["micro_count"])
        self._micro_at_step = self.micro_count
        mx.eval(self.model.parameters(), self.optimizer.state)

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
