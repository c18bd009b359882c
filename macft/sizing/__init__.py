"""``macft estimate`` and the memory check ``macft train`` runs first.

:mod:`.shapes` reads the model's dimensions, :mod:`.memory` predicts the peak part by
part and searches settings that fit; this module ties them to a config and a batch plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import MacftError
from ..ui import human_bytes
from .memory import Estimate, Setting, Target, estimate, suggestions
from .shapes import ModelShape, shape_from_config

__all__ = ["Estimate", "Setting", "Target", "estimate", "suggestions", "setting_for", "check_fits",
           "ModelShape", "shape_from_config", "largest_batch"]


def largest_batch(plan: Any) -> tuple[int, int, int]:
    """(rows, length, tokens with a loss) of the plan's largest micro-batch."""
    b = plan.largest_batch()
    n, t = b.input_ids.shape
    trained = int(np.count_nonzero(b.loss_mask[:, 1:]))
    return int(n), int(t), trained


def setting_for(cfg: Any, plan: Any | None = None) -> Setting:
    """The memory-relevant settings of a run config; with a plan, the real largest batch
    (else ``batch_size`` rows of ``max_seq_len`` tokens, every position trained)."""
    if plan is not None:
        b, t, trained = largest_batch(plan)
    else:
        b, t, trained = cfg.train.batch_size, cfg.data.max_seq_len, None
    return Setting(batch=b, seq_len=t, quantize=cfg.model.quantize, grad_checkpoint=cfg.train.grad_checkpoint,
                   rank=cfg.lora.rank, targets=tuple(cfg.lora.targets), lora_layers=cfg.lora.layers,
                   trained_tokens=trained, distill=cfg.train.distill_weight > 0, grad_accum=cfg.train.grad_accum)


def explain(e: Estimate) -> str:
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in e.parts.items())
    return f"{human_bytes(e.total)} ({parts})"


def check_fits(shape: ModelShape, target: Target, s: Setting) -> Estimate:
    """The estimate; raises with settings that fit when it does not fit."""
    e = estimate(shape, target, s)
    if e.fits:
        return e
    fixes = suggestions(shape, target, s)
    hint = ("Settings that fit: " + "; ".join(f"`{w}` (about {human_bytes(x.total)})" for w, x in fixes)
            if fixes else "Nothing fits here even with a 4-bit base, batch 1, checkpointing and 128-token "
                          "sequences: use a smaller model or a machine with more memory.")
    raise MacftError(
        f"This run needs about {explain(e)} at its peak, but {target.budget_label} is "
        f"{human_bytes(target.budget)} (largest batch: {s.batch} x {s.seq_len} tokens).",
        hint + " Or pass --force to try anyway (`macft estimate` shows the details).")
