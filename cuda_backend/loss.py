"""Cross-entropy and LwF's KL from hidden states, without the full-vocabulary logits.

The logits of a big vocabulary are the largest activation of a small model: Gemma-3's
262,144 tokens make ``[tokens, V]`` fp32 logits 1 MiB per token, ~2 GiB for 2,048 trained
tokens, before their gradient. :func:`head_losses` instead takes the final hidden states of
the trained positions (``[N, H]``) and the output head, and goes through the tokens in
chunks, so that at most ``budget`` logits exist at once (default: the rule both engines and
the memory estimate share, :mod:`macft.training.chunking`: 2^24 logits, 64 tokens of Gemma-3).

Gradient (the Liger-kernel trick): token ``i``'s loss depends on hidden row ``i`` only, so
``d loss_i / d hidden_i`` (``[N, H]``, the size of the input) is computed in the same pass as
the loss and stored; backward scales its rows by the incoming gradient. Nothing is
recomputed and no logits outlive their chunk. Without autograd (evaluation) none of it is done.

Precision: the head matmul runs in the dtype ``nn.Linear`` would use (the autocast dtype
inside ``torch.autocast``, else the weight's), everything after it in fp32 (softmax,
logsumexp, soft-capping, the logits' gradient), as the old path's ``logits.float()`` did.
The head is frozen (LoRA never trains it): :func:`head_losses` refuses a head weight or
bias that requires a gradient while gradients are recorded; the engine uses the model's
own logits there instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from macft.training.chunking import CHUNK_LOGITS, chunk_rows


@dataclass(frozen=True)
class Head:
    """What a causal LM does after its backbone: ``softcap * tanh((h @ W.T + b) / softcap)``
    (no tanh when ``softcap`` is None)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute the head in here: autocast's when it is on for
    the weight's device, else the weight's own."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def head_logits(hidden: torch.Tensor, head: Head, dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits of ``hidden`` (``[n, H]``): the matmul in ``dtype``, the soft-capping in fp32."""
    z = hidden.to(dtype) @ head.weight.to(dtype).T
    if head.bias is not None:
        z = z + head.bias.to(dtype)
    z = z.float()
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


@dataclass(frozen=True)
class _Plan:
    """The non-tensor settings of one :class:`_HeadLoss` call."""

    softcap: float | None
    temperature: float
    dtype: torch.dtype  # the head matmul's
    chunk: int  # tokens per chunk
    want_grad: bool  # store d loss / d hidden


class _HeadLoss(torch.autograd.Function):
    """Per-token weighted CE (and KL when ``base_hidden`` is given), gradient wrt ``hidden``
    computed in the forward pass; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, base_hidden: torch.Tensor | None,
                weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                ce_w: torch.Tensor, kl_w: torch.Tensor | None,
                plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        head = Head(weight.to(plan.dtype), bias, plan.softcap)  # cast once, not per chunk
        n, dev = hidden.shape[0], hidden.device
        ce = torch.zeros(n, dtype=torch.float32, device=dev)
        kl = torch.zeros(n, dtype=torch.float32, device=dev)
        # d loss / d hidden in fp32: [N, H], the size of the input, not of the logits
        g_ce = torch.empty(hidden.shape, dtype=torch.float32, device=dev) if plan.want_grad else None
        g_kl = torch.empty_like(g_ce) if g_ce is not None and base_hidden is not None else None
        with torch.autocast(dev.type, enabled=False):  # the dtypes are chosen explicitly
            for s in range(0, n, plan.chunk):
                c = slice(s, min(n, s + plan.chunk))
                z = head_logits(hidden[c], head, plan.dtype)
                ce[c], dz = _ce_chunk(z, targets[c], ce_w[c], plan.want_grad)
                if g_ce is not None:
                    g_ce[c] = _back_to_hidden(dz, z, head)
                if base_hidden is not None and kl_w is not None:
                    zb = head_logits(base_hidden[c], head, plan.dtype)
                    kl[c], dz = _kl_chunk(z, zb, kl_w[c], plan.temperature, plan.want_grad)
                    if g_kl is not None:
                        g_kl[c] = _back_to_hidden(dz, z, head)
        ctx.save_for_backward(g_ce, g_kl)
        ctx.hidden_dtype = hidden.dtype
        if base_hidden is None:
            ctx.mark_non_differentiable(kl)
        return ce, kl

    @staticmethod
    def backward(ctx: Any, d_ce: torch.Tensor, d_kl: torch.Tensor) -> tuple[Any, ...]:
        g_ce, g_kl = ctx.saved_tensors
        grad = g_ce * d_ce.float()[:, None]
        if g_kl is not None:
            grad = grad + g_kl * d_kl.float()[:, None]
        return grad.to(ctx.hidden_dtype), None, None, None, None, None, None, None


def _ce_chunk(z: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
              want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weighted CE per row, its gradient wrt the logits ``z`` or None)."""
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(1, targets[:, None]).squeeze(1)) * w
    if not want_grad:
        return ce, None
    dz = (z - lse[:, None]).exp_()  # softmax
    dz[torch.arange(z.shape[0], device=z.device), targets] -= 1.0
    return ce, dz.mul_(w[:, None])


def _kl_chunk(z: torch.Tensor, zb: torch.Tensor, w: torch.Tensor, t: float,
              want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``T^2 KL(softmax(z/T) || softmax(zb/T))`` per row times ``w``, its gradient wrt ``z``).

    d/dz of ``T^2 sum p (lp - lq)`` is ``T p (lp - lq - KL_row)``."""
    lp = torch.log_softmax(z / t, dim=-1)
    diff = lp - torch.log_softmax(zb / t, dim=-1)
    p = lp.exp_()
    row = (p * diff).sum(-1)
    kl = row * w * (t * t)
    if not want_grad:
        return kl, None
    return kl, p.mul_(diff.sub_(row[:, None])).mul_((w * t)[:, None])


def _back_to_hidden(dz: torch.Tensor, z: torch.Tensor, head: Head) -> torch.Tensor:
    """``d loss / d hidden`` of one chunk from ``d loss / d z``: through the soft-capping
    (``dz/dx = 1 - (z/c)^2``) and the head matmul (in the matmul's dtype)."""
    if head.softcap is not None:
        dz = dz * (1.0 - (z / head.softcap) ** 2)
    return dz.to(head.weight.dtype) @ head.weight


def head_losses(hidden: torch.Tensor, head: Head, targets: torch.Tensor, ce_weights: torch.Tensor,
                base_hidden: torch.Tensor | None = None, kl_weights: torch.Tensor | None = None,
                temperature: float = 1.0,
                budget: int = CHUNK_LOGITS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token fp32 losses of ``N`` positions, never more than ``budget`` logits at once.

    - ``hidden`` ``[N, H]``: final hidden states (the backbone's, before the head);
    - ``targets`` ``[N]``, ``ce_weights`` ``[N]``: CE of each row's target, times its weight;
    - ``base_hidden`` ``[N, H]`` (no gradient), ``kl_weights`` ``[N]``: also LwF's
      ``T^2 KL(softmax(z/T) || softmax(z_base/T))`` per row, times its weight.

    Returns ``(ce [N], kl [N] or None)``; both differentiable wrt ``hidden``.
    """
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    if want_grad and any(t is not None and t.requires_grad for t in (head.weight, head.bias)):
        raise ValueError("head_losses computes no gradient for the output head, and its weight "
                         "requires one: freeze it, or compute the loss from the model's logits.")
    if base_hidden is not None and kl_weights is None:
        raise ValueError("head_losses: base_hidden needs kl_weights")
    plan = _Plan(head.softcap, float(temperature), compute_dtype(head.weight),
                 chunk_rows(head.vocab, budget), want_grad)
    ce_w = ce_weights.to(device=hidden.device, dtype=torch.float32)
    kl_w = kl_weights.to(device=hidden.device, dtype=torch.float32) if kl_weights is not None else None
    base = base_hidden.detach() if base_hidden is not None else None
    ce, kl = _HeadLoss.apply(hidden, base, head.weight.detach(),
                             head.bias.detach() if head.bias is not None else None,
                             targets, ce_w, kl_w, plan)
    return ce, (kl if base_hidden is not None else None)
