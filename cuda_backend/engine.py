"""The PyTorch :class:`~macft.training.loop.Engine`: the math of one step, nothing else.

Loss (the shared convention of :mod:`macft.data.batching`): cross-entropy of
``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``,
*summed* over tokens. :func:`token_losses` / :func:`batch_loss` compute it for
one batch and are usable on their own (cross-backend parity checks).

- Padded batches: ``attention_mask = segment_ids > 0`` (right padding).
- Packed batches: ``position_ids`` restart at each example and there is no
  attention mask; with ``use_cache=False`` transformers reads the restarts as
  sequence boundaries and keeps examples from attending to each other.
- No full-vocabulary logits: the backbone's final hidden states are gathered at the
  positions that carry a target (LwF: every real position), and :mod:`cuda_backend.loss`
  computes the loss and its gradient from them and the output head in chunks (the logits
  are the largest activation of a small model with a big vocabulary: Gemma-3 has 262,144
  tokens). Where :func:`output_head` cannot vouch that the model's logits are exactly
  head(hidden states), the model's own logits are used, at the positions some row trains.

Randomness: LoRA dropout is reseeded before every micro-batch from (seed, step,
global micro-batch index). Resuming therefore replays the same dropout masks, and
one process with ``grad_accum`` 2 draws the same masks as two processes with 1.

Checkpoint state is data, never a pickle: ``torch_state.safetensors`` (optimizer
tensors, RNG states) and ``torch_state.json`` (step count, parameter groups, scalars).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import resource
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from macft.adapter import AdapterSpec, read_peft_adapter, write_peft_adapter
from macft.data.batching import Batch
from macft.errors import MacftError
from macft.run import CONFIG

from .distributed import DistContext
from .hardware import Precision

STATE_TENSORS = "torch_state.safetensors"  # optimizer moments, RNG states
STATE_JSON = "torch_state.json"  # everything else: step count, param groups, scalars
STATE_FORMAT = 1
LEGACY_STATE = "torch_state.pt"  # a pickle, written by earlier macft versions: never loaded


# --------------------------------------------------------------------------- loss


def batch_inputs(batch: Batch, device: Any) -> dict[str, Any]:
    """Model inputs for a :class:`Batch` (see the module docstring for the rules)."""
    import torch

    ids = torch.from_numpy(batch.input_ids.astype(np.int64)).to(device)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if batch.packed:
        inputs["position_ids"] = torch.from_numpy(batch.position_ids.astype(np.int64)).to(device)
    else:
        inputs["attention_mask"] = torch.from_numpy((batch.segment_ids > 0).astype(np.int64)).to(device)
    return inputs


def _hf_model(model: Any) -> Any:
    """The transformers model inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# transformers model -> whether its logits are head(backbone hidden states), checked once
_HEAD_VERIFIED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
CHECK_TOKENS = 8  # length of the input the one-time check runs


def output_head(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(backbone, Head)`` when this model's logits are the head applied to the backbone's
    ``last_hidden_state``; None when the losses must come from the model's own logits.

    Every supported CausalLM (Gemma 1/3, Gemma3ForConditionalGeneration, Llama, Qwen2/3,
    GPT-NeoX, GPT-2) runs ``getattr(self, self.base_model_prefix)`` and then ``lm_head``,
    with the final logit soft-capping where ``self.config`` sets it (Gemma3ForCausalLM; the
    multimodal class ignores its text config's). An architecture could do more (a logit
    scale, a LoRA on the head): the first call per model compares the two on a short input
    (:func:`_head_matches`) and remembers the answer.
    """
    import torch

    base = _hf_model(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    # exactly nn.Linear: not a peft wrapper, not a quantized bitsandbytes subclass
    if backbone is None or backbone is base or type(lm_head) is not torch.nn.Linear:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in lm_head.parameters()):
        return None  # a trained head: head_losses has no gradient for it
    from .loss import Head

    head = Head(lm_head.weight, lm_head.bias, getattr(base.config, "final_logit_softcapping", None))
    verified = _HEAD_VERIFIED.get(base)
    if verified is None:
        verified = _HEAD_VERIFIED[base] = _head_matches(model, backbone, head,
                                                        inputs["input_ids"][:1, :CHECK_TOKENS])
        if not verified:
            from macft.ui import warn

            warn(f"{type(base).__name__}'s logits are not its output layer applied to its last hidden "
                 "states: computing the loss from its full logits (more memory with a large vocabulary).")
    return (backbone, head) if verified else None


def _head_matches(model: Any, backbone: Any, head: Any, ids: Any) -> bool:
    """Whether backbone + head gives the model's own logits on ``ids`` (eval mode, so dropout
    draws nothing; within the matmul dtype's rounding)."""
    import torch

    from .loss import compute_dtype, head_logits

    dtype = compute_dtype(head.weight)
    with torch.no_grad(), _eval_mode(_hf_model(model)):
        ref = model(input_ids=ids, use_cache=False).logits.float()
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
        ours = head_logits(hidden.reshape(-1, hidden.shape[-1]), head, dtype).reshape(ref.shape)
    tol = 8 * _matmul_eps(dtype)
    return bool(torch.allclose(ours, ref, rtol=tol, atol=tol * float(ref.abs().max())))


def _matmul_eps(dtype: Any) -> float:
    """The relative rounding of a matmul in ``dtype`` here (fp32 matmuls may run as TF32)."""
    import torch

    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return 2.0 ** -10
    return float(torch.finfo(dtype).eps)


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode inside, every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(_hf_model(model).forward).parameters


def token_losses(model: Any, batch: Batch, device: Any) -> Any:
    """Per-token loss ``[B, T-1]`` (fp32): entry ``t`` is the cross-entropy of predicting
    ``input_ids[:, t+1]``, times ``loss_mask[:, t+1]`` (0 where nothing is trained)."""
    import torch

    from .loss import head_losses

    inputs = batch_inputs(batch, device)
    w = torch.from_numpy(batch.loss_mask[:, 1:]).to(device)
    out = torch.zeros(w.shape, dtype=torch.float32, device=device)
    rows, cols = torch.nonzero(w, as_tuple=True)  # the trained positions
    if rows.numel() == 0:
        return out
    found = output_head(model, inputs)
    if found is None:
        return _token_losses_from_logits(model, inputs, w)
    backbone, head = found
    hidden = backbone(**inputs).last_hidden_state[:, :-1][rows, cols]  # [N, H]
    ce, _ = head_losses(hidden, head, inputs["input_ids"][:, 1:][rows, cols], w[rows, cols])
    return out.index_put((rows, cols), ce)


def _token_losses_from_logits(model: Any, inputs: dict[str, Any], w: Any) -> Any:
    """:func:`token_losses` through the model's own logits (``[B, K, V]`` at the ``K``
    positions where some row has a target): for heads :func:`output_head` does not vouch for."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    keep = torch.nonzero(w.sum(0) > 0).squeeze(1)  # positions whose next token is a target
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, :-1].index_select(1, keep)
    targets = inputs["input_ids"][:, 1:].index_select(1, keep)
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, K]
    return out.index_copy(1, keep, ce * w.index_select(1, keep))


def batch_loss(model: Any, batch: Batch, device: Any) -> tuple[Any, int]:
    """(summed token loss as a 0-d tensor, number of trained tokens)."""
    return token_losses(model, batch, device).sum(), batch.n_trained


def distill_loss(model: Any, batch: Batch, device: Any, temperature: float) -> tuple[Any, Any, Any, int]:
    """LwF: (CE sum, KL sum, real-token count, trained tokens) for a peft model.

    KL(fine-tuned || base) over every real (non-padding) position, times T^2. The base
    hidden states come from the same model under ``disable_adapter()`` without gradients:
    no second copy of the model in memory, one extra forward pass.
    """
    import torch

    from .loss import head_losses

    inputs = batch_inputs(batch, device)
    w = torch.from_numpy(batch.loss_mask[:, 1:]).to(device)
    real = torch.from_numpy((batch.segment_ids[:, 1:] > 0).astype(np.float32)).to(device)
    found = output_head(model, inputs)
    if found is None:
        ce, kl = _distill_from_logits(model, inputs, w, real, temperature)
        return ce, kl, real.sum(), batch.n_trained
    backbone, head = found
    rows, cols = torch.nonzero((real > 0) | (w > 0), as_tuple=True)
    with torch.no_grad(), model.disable_adapter():  # first, as before: the same dropout draws
        base = backbone(**inputs).last_hidden_state[:, :-1][rows, cols]
    hidden = backbone(**inputs).last_hidden_state[:, :-1][rows, cols]
    ce, kl = head_losses(hidden, head, inputs["input_ids"][:, 1:][rows, cols], w[rows, cols],
                         base, real[rows, cols], temperature)
    return ce.sum(), kl.sum(), real.sum(), batch.n_trained


def _distill_from_logits(model: Any, inputs: dict[str, Any], w: Any, real: Any, t: float) -> tuple[Any, Any]:
    """(CE sum, KL sum) of :func:`distill_loss` through the model's full ``[B, T, V]`` logits."""
    import torch
    import torch.nn.functional as F

    ids = inputs["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits[:, :-1].float()
    logits = model(**inputs).logits[:, :-1].float()
    ce = (F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * w).sum()
    lp = F.log_softmax(logits / t, dim=-1)
    lq = F.log_softmax(base / t, dim=-1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) * real).sum() * (t * t)
    return ce, kl


# --------------------------------------------------------------------------- engine


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux ``VmHWM``: ``ru_maxrss`` survives
    ``exec`` and so reports the launching process's peak when that was larger (macft run from
    a big Python process, e.g. a notebook or pytest)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def _seed_for(seed: int, step: int, global_micro: int) -> int:
    h = hashlib.blake2b(f"macft-{seed}-{step}-{global_micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class TorchEngine:
    """Implements :class:`macft.training.loop.Engine` for a peft model."""

    name = "cuda"

    def __init__(self, model: Any, lora_modules: dict[str, Any], spec: AdapterSpec, optimizer: Any,
                 ctx: DistContext, precision: Precision, seed: int, device_label: str,
                 distill_weight: float = 0.0, distill_temperature: float = 1.0):
        import torch

        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.last_kl: float | None = None  # mean KL per real token of the last micro-batch
        self.model = model
        self.lora_modules = lora_modules
        self.spec = spec
        self.optimizer = optimizer
        self.ctx = ctx
        self.precision = precision
        self.seed = seed
        self.device = device_label
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.torch_device = torch.device(ctx.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps_done = 0  # optimizer steps taken (restored on resume)
        self._micro = 0  # micro-batches since the last optimizer step, on this process
        ctx.broadcast_(self.params)

    # -- forward / backward ----------------------------------------------------------

    def _autocast(self) -> Any:
        import torch

        if self.precision.autocast:
            return torch.autocast(device_type=self.torch_device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        import torch

        self.model.train()
        global_micro = self._micro * self.world_size + self.rank
        torch.manual_seed(_seed_for(self.seed, self.steps_done, global_micro))
        self._micro += 1
        if batch.n_trained == 0:
            return 0.0, 0
        with self._autocast():
            if self.distill_weight > 0:
                # objective = CE sum + weight x mean KL x trained tokens, so that after the
                # loop's 1/tokens scaling it is CE mean + weight x KL mean (as in MLX)
                loss_sum, kl, n_real, n = distill_loss(self.model, batch, self.torch_device,
                                                       self.distill_temperature)
                kl_mean = kl / n_real.clamp(min=1.0)
                (loss_sum + self.distill_weight * kl_mean * n).backward()
                self.last_kl = float(kl_mean.detach())
                return float(loss_sum.detach()), n
            loss_sum, n = batch_loss(self.model, batch, self.torch_device)
        loss_sum.backward()
        return float(loss_sum.detach()), n

    def optimizer_step(self, lr: float, n_tokens: int, max_grad_norm: float) -> float:
        import torch

        self.ctx.sum_gradients_(self.params)
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        torch._foreach_mul_(grads, 1.0 / n_tokens)
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self._micro = 0
        return float(norm)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    def eval_batch(self, batch: Batch) -> tuple[float, int]:
        import torch

        self.model.eval()
        if batch.n_trained == 0:
            return 0.0, 0
        with torch.no_grad(), self._autocast():
            loss_sum, n = batch_loss(self.model, batch, self.torch_device)
        return float(loss_sum), n

    def all_sum(self, values: list[float]) -> list[float]:
        return self.ctx.all_sum(values)

    # -- files (rank 0 only; no collectives in here) -----------------------------------

    def adapter_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for name, mod in self.lora_modules.items():
            a = mod.lora_A["default"].weight.detach().float().cpu().numpy()
            b = mod.lora_B["default"].weight.detach().float().cpu().numpy()
            out[name] = (a, b)
        return out

    def save_adapter(self, path: Path) -> None:
        write_peft_adapter(path, self.adapter_arrays(), self.spec)

    def save_state(self, path: Path) -> None:
        """Optimizer, step count and RNG as data only: tensors in :data:`STATE_TENSORS`
        (safetensors), everything else in :data:`STATE_JSON`. No pickle, so a checkpoint from
        someone else cannot run code when it is resumed."""
        import torch
        from safetensors.torch import save as st_save

        tensors: dict[str, Any] = {}
        rng = {
            "python": random.getstate(),
            "numpy": _numpy_rng_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        meta = {
            "format": STATE_FORMAT,
            "steps_done": self.steps_done,
            "world_size": self.world_size,
            "optimizer": _encode(self.optimizer.state_dict(), "optimizer", tensors),
            "rng": _encode(rng, "rng", tensors),
        }
        _write_bytes(path / STATE_TENSORS, st_save(tensors))
        _write_bytes(path / STATE_JSON, json.dumps(meta).encode())

    def load_state(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        check_checkpoint(path)
        arrays, _ = read_peft_adapter(path)
        if set(arrays) != set(self.lora_modules):
            extra = sorted(set(arrays) ^ set(self.lora_modules))[:5]
            raise MacftError(f"The checkpoint's adapter in {path} does not match this model's LoRA "
                             f"layers (differences: {', '.join(extra)}).",
                             "Resume with the same model and LoRA settings (they are in config.yaml).")
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
        with torch.no_grad():
            for name, (a, b) in arrays.items():
                mod = self.lora_modules[name]
                mod.lora_A["default"].weight.copy_(torch.from_numpy(a))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(b))
        self.optimizer.load_state_dict(_decode(meta["optimizer"], tensors))
        self.steps_done = int(meta["steps_done"])
        rng = _decode(meta["rng"], tensors)
        random.setstate(rng["python"])
        _set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.ctx.broadcast_(self.params)

    # -- reporting ------------------------------------------------------------------

    def peak_memory_gb(self) -> float:
        """GPU: ``torch.cuda.max_memory_allocated`` (tensors only, this process's GPU).
        CPU: the process's peak resident set size (everything: Python, libraries, tensors)."""
        if self.torch_device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(self.torch_device) / 1e9
        return peak_rss_bytes() / 1e9

    def param_counts(self) -> tuple[int, int]:
        # peft counts 4-bit weights at their real size (two values per stored byte)
        trainable, total = self.model.get_nb_trainable_parameters()
        return int(trainable), int(total)


# --------------------------------------------------------------------------- checkpoint files


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint this engine cannot (or must not) load, before anything is read."""
    if (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file():
        return
    run = path.parent.parent
    if (path / LEGACY_STATE).is_file():
        raise MacftError(
            f"{path} holds its optimizer state as {LEGACY_STATE}, a pickle written by an older macft. "
            "macft does not load pickles: unpickling a file can run any code in it, so a run "
            "directory from someone else could take over this machine.",
            f"Start the run again with its saved settings: `macft train --config {run / CONFIG} "
            f"--output NEW_DIR` (or, only if you wrote this run yourself, finish it with the macft "
            "version that started it).")
    raise MacftError(f"{path} has no {STATE_JSON}: it was not written by the cuda backend.",
                     "Resume a run with the backend that started it (see its config.yaml).")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_numpy_rng_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                         s["gauss"]))


def _encode(value: Any, name: str, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON-able data; tensors go into ``tensors`` under a dotted name.

    Tags keep what JSON would lose: ``{"$tensor": key}``, ``{"$tuple": [...]}`` and
    ``{"$items": [[k, v], ...]}`` for dicts with non-string keys (optimizer state is keyed by
    parameter index). bitsandbytes' 8-bit state nests a dict of tensors per parameter; its
    quantization maps are one tensor shared by every parameter, so each is copied out.
    """
    import torch

    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, f"{name}.key{i}", tensors), _encode(v, f"{name}.{k}", tensors)]
                           for i, (k, v) in enumerate(value.items())]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {name} in a checkpoint")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of :func:`_encode`: builds only dicts, lists, tuples, numbers, strings, tensors."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "$tensor" in value:
            return tensors[value["$tensor"]]
        if "$tuple" in value:
            return tuple(_decode(v, tensors) for v in value["$tuple"])
        if "$items" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["$items"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
