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
from .model import LoadedModel, count_params, hf_module_name
from .packing import model_modules, packed_attention

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"


def token_losses(model: nn.Module, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the target tokens, and their count (fp32)."""
    logits = model(ids[:, :-1])
    targets = ids[:, 1:]
    m = mask[:, 1:]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * m
    return ce.sum(), m.sum()


class MLXEngine:
    name = "mlx"
    rank = 0
    world_size = 1

    def __init__(self, lm: LoadedModel, spec: AdapterSpec, *, weight_decay: float, packing: bool,
                 device: str, seed: int = 0, grad_checkpoint: bool = False):
        self.lm = lm
        # Dropout randomness is a pure function of (seed, micro-batch count): MLX's global
        # RNG key cannot be restored, so each micro-batch reseeds it and resume is exact.
        self.seed = seed
        self.micro_count = 0
        self.model = lm.model
        self.spec = spec
        self.device = device
        self.packing = packing
        self._mask_modules = model_modules(self.model) if packing else []
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
            (loss, n), grads = loss_and_grad(self.model, ids, mask, seg)
            return loss, n, grads

        @partial(mx.compile, inputs=state, outputs=state)
        def eval_step(ids: mx.array, mask: mx.array, seg: mx.array) -> Any:
            return self._loss(self.model, ids, mask, seg)

        self._grad_step = grad_step
        self._eval_step = eval_step
        mx.reset_peak_memory()

    def _loss(self, model: nn.Module, ids: mx.array, mask: mx.array, seg: mx.array) -> Any:
        if self.packing:
            with packed_attention(self._mask_modules, seg[:, :-1]):
                return token_losses(model, ids, mask)
        return token_losses(model, ids, mask)

    @staticmethod
    def _arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array]:
        return mx.array(batch.input_ids), mx.array(batch.loss_mask), mx.array(batch.segment_ids)

    # -- Engine protocol -------------------------------------------------------------

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        self.model.train()
        mx.random.seed(self.seed * 1_000_003 + self.micro_count)
        self.micro_count += 1
        loss, n, grads = self._grad_step(*self._arrays(batch))
        self._acc = grads if self._acc is None else tree_map(mx.add, self._acc, grads)
        mx.eval(loss, n, self._acc)
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
        """HF module name -> (A [r, in], B [out, r]) in PEFT orientation."""
        out = {}
        for name in self.lm.lora_modules:
            mod = self.model
            for part in name.split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
            a = np.array(mod.lora_a.astype(mx.float32)).T
            b = np.array(mod.lora_b.astype(mx.float32)).T
            out[hf_module_name(name, self.lm.model_type)] = (a, b)
        return out

    def save_adapter(self, path: Path) -> None:
        write_peft_adapter(path, self.lora_weights(), self.spec)

    def save_state(self, path: Path) -> None:
        opt = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(path / OPTIMIZER_FILE), opt)
        (path / RNG_FILE).write_text(json.dumps({"seed": self.seed, "micro_count": self.micro_count}))

    def load_state(self, path: Path) -> None:
        modules, _ = read_peft_adapter(path)
        by_hf = {hf_module_name(n, self.lm.model_type): n for n in self.lm.lora_modules}
        weights = []
        for hf_name, (a, b) in modules.items():
            mlx_name = by_hf[hf_name]
            weights.append((f"{mlx_name}.lora_a", mx.array(a.T)))
            weights.append((f"{mlx_name}.lora_b", mx.array(b.T)))
        self.model.load_weights(weights, strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_FILE)).items()))
        self._update = None  # the compiled update holds the old state dict: retrace
        self.micro_count = int(json.loads((path / RNG_FILE).read_text())["micro_count"])
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
