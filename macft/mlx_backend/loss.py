"""The training loss without a ``[tokens x vocabulary]`` logits tensor.

Gemma-3's vocabulary has 262,144 entries: logits for a batch of 4 x 1024 tokens are
4.3 GB in fp32, and the plain loss keeps them, their softmax and their gradient alive for
the backward pass. On a 16 GB Mac that is most of the memory a 1B fine-tune needs. Here:

- The backbone's final hidden states are gathered at the positions that carry a loss (the
  trained tokens; with LwF every real token). Prompt and padding positions never reach
  the output layer, which also saves its FLOPs there.
- Those rows go through the output layer in chunks of ``chunk_rows(vocab)`` tokens (at most
  ``macft.training.chunking.CHUNK_LOGITS`` logits, 64 MiB in fp32, at a time). The loss is the last operation of
  the step, so each chunk yields its loss *and* the loss's gradient with respect to its
  hidden states in the same pass (Liger-Kernel's fused linear cross-entropy); the
  backward pass only scales that gradient by its cotangent. Nothing is recomputed, and no
  chunk's logits outlive it: each chunk's results are packed into one array, so MLX frees
  its logits as soon as that array is computed. (MLX runs ahead while memory is plentiful
  and may then hold several chunks; under its memory limit, which macft sets to the
  budget, it waits instead: measured, 8 chunks of 64 MiB ran in 208 MiB under a 200 MiB
  limit.)
- Log-softmax, the target logit and the KL are computed in fp32 from logits in the
  model's dtype, as the plain loss does.

The output layer's weights are constants here (``mx.custom_function`` captures them): it
is frozen in every macft run (LoRA never targets it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

ROW_BUCKET = 32  # gathered rows are padded to a multiple of this: fewer recompilations

Head = Callable[[mx.array], mx.array]


# --------------------------------------------------------------------------- the model split


@dataclass
class Split:
    """A causal LM as backbone (ids -> final hidden states) and output layer.

    ``inner`` names the output module when the backbone's own code calls it (GPT-NeoX's
    ``embed_out``): it is swapped for an identity while the backbone runs.
    """

    backbone: nn.Module
    head: Head
    inner: tuple[nn.Module, str] | None = None

    def hidden(self, ids: mx.array) -> mx.array:
        if self.inner is None:
            return self.backbone(ids)
        parent, attr = self.inner
        layer = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        try:
            return self.backbone(ids)
        finally:
            setattr(parent, attr, layer)


def _get(root: nn.Module, path: str) -> Any:
    mod: Any = root
    for part in path.split("."):
        if isinstance(mod, list) and part.isdigit():
            mod = mod[int(part)]
        elif isinstance(mod, dict) and part in mod:
            mod = mod[part]
        else:
            return None
    return mod


def _output_layer(module: nn.Module) -> Head:
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        return module.as_linear  # tied embeddings
    return module


def split_model(model: nn.Module, backbone: str, heads: tuple[str, ...]) -> Split | None:
    """The split named by an architecture's paths (the first head path present wins), or
    None when the model does not have them."""
    body = _get(model, backbone)
    for path in heads:
        module = _get(model, path)
        if module is None:
            continue
        inner = None
        # an output Linear inside the backbone is called by it (GPT-NeoX); a tied embedding is
        # the backbone's input layer, applied as the output by the outer model
        tied = isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))
        if path.startswith(backbone + ".") and not tied:
            parent_path, _, attr = path.rpartition(".")
            inner = (_get(model, parent_path), attr)
        return Split(body, _output_layer(module), inner) if body is not None else None
    return None


def full_logits_split(model: nn.Module) -> Split:
    """The fallback: the whole model as 'backbone' (its logits) and an identity head. Same
    loss, no memory saving."""
    return Split(model, lambda x: x)


def split_agrees(model: nn.Module, split: Split, vocab: int, tol: float = 1e-4) -> bool:
    """Does output-layer(backbone(ids)) give the model's own logits? Checked once on a short
    input in eval mode (no dropout), so an architecture that does anything after its
    backbone (soft-capping, scaling) falls back to full logits instead of training wrong."""
    was_training = model.training
    model.eval()
    try:
        ids = mx.array([[i % max(vocab, 1) for i in range(1, 9)]], dtype=mx.int32)
        ref = model(ids).astype(mx.float32)
        got = split.head(split.hidden(ids)).astype(mx.float32)
        if ref.shape != got.shape:
            return False
        err = mx.abs(ref - got).max().item()
        scale = mx.abs(ref).max().item()
        return bool(err <= tol * (1.0 + scale))
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- selections


def gather_plan(mask: Any, segments: Any, every_real: bool) -> dict[str, Any]:
    """numpy: which of the ``[B, T-1]`` positions go through the output layer.

    ``idx`` (flat positions), ``targets`` (the next token ids), ``w_ce`` (the loss-mask
    weight), ``w_kl`` (1 at real tokens, for LwF), padded with zero-weight rows to a
    multiple of ``ROW_BUCKET``.
    """
    import numpy as np

    m = np.asarray(mask, np.float32)[:, 1:].reshape(-1)
    real = (np.asarray(segments)[:, 1:] > 0).reshape(-1) if segments is not None else m >= 0
    keep = np.flatnonzero(real if every_real else m > 0).astype(np.int32)
    n = len(keep)
    size = max(ROW_BUCKET, -(-n // ROW_BUCKET) * ROW_BUCKET)
    idx = np.zeros(size, np.int32)
    idx[:n] = keep
    w_ce = np.zeros(size, np.float32)
    w_ce[:n] = m[keep]
    w_kl = np.zeros(size, np.float32)
    w_kl[:n] = 1.0
    return {"idx": idx, "w_ce": w_ce, "w_kl": w_kl}


def gather(hidden: mx.array, ids: mx.array, idx: mx.array) -> tuple[mx.array, mx.array]:
    """(hidden rows [N, H], their targets [N]) from hidden [B, T-1, H] and ids [B, T]."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    return mx.take(rows, idx, axis=0), mx.take(ids[:, 1:].reshape(-1), idx)


# --------------------------------------------------------------------------- the losses


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _in_order(part: Callable[[int, int, list[mx.array]], mx.array], n: int, rows: int) -> mx.array:
    """Concatenate ``part(start, end, after)`` over the chunks; ``after`` holds the previous
    chunk's result, which the part makes its inputs depend on (``mx.depends``): without
    that MLX schedules every chunk's output-layer matmul first and holds all their logits
    (measured: 1.3 GiB instead of 208 MiB for 8 chunks of 64 MiB)."""
    out: list[mx.array] = []
    for s, e in _chunks(n, rows):
        out.append(part(s, e, out[-1:]))
    return mx.concatenate(out, axis=0)



def _ce_parts(head: Head, h: mx.array, t: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(logits fp32, logsumexp, per-row CE) of one chunk."""
    z = head(h).astype(mx.float32)
    lse = mx.logsumexp(z, axis=-1)
    ce = lse - mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
    return z, lse, ce


def _head_vjp(head: Head, h: mx.array, dz: mx.array) -> mx.array:
    """dL/dh for a chunk given dL/dlogits (fp32 result)."""
    out_dtype = head(h[:1]).dtype
    _, (dh,) = mx.vjp(head, [h], [dz.astype(out_dtype)])
    return dh.astype(mx.float32)


def _ce_grad_chunk(head: Head, h: mx.array, t: mx.array, w: mx.array) -> mx.array:
    """One chunk packed as [dh (H) | CE (1)], dh already weighted by ``w``."""
    z, lse, ce = _ce_parts(head, h, t)
    p = mx.exp(z - lse[:, None])
    onehot = mx.arange(z.shape[-1])[None, :] == t[:, None]
    dz = (p - onehot.astype(mx.float32)) * w[:, None]
    return mx.concatenate([_head_vjp(head, h, dz), ce[:, None]], axis=1)


def ce_sum(head: Head, h: mx.array, t: mx.array, w: mx.array, rows: int) -> mx.array:
    """Weighted cross-entropy sum, no gradient (evaluation)."""
    total = mx.array(0.0, dtype=mx.float32)
    for s, e in _chunks(h.shape[0], rows):
        total = total + (_ce_parts(head, h[s:e], t[s:e])[2] * w[s:e]).sum()
    return total


def kl_sum(head: Head, h: mx.array, hb: mx.array, w: mx.array, temperature: float, rows: int) -> mx.array:
    """Weighted KL(fine-tuned || base) x T^2 sum, no gradient (evaluation)."""
    total = mx.array(0.0, dtype=mx.float32)
    for s, e in _chunks(h.shape[0], rows):
        lp = nn.log_softmax(head(h[s:e]).astype(mx.float32) / temperature, axis=-1)
        lq = nn.log_softmax(head(hb[s:e]).astype(mx.float32) / temperature, axis=-1)
        total = total + ((mx.exp(lp) * (lp - lq)).sum(axis=-1) * w[s:e]).sum()
    return total * (temperature * temperature)


def ce_sum_with_grad(head: Head, h: mx.array, t: mx.array, w: mx.array, rows: int) -> mx.array:
    """Weighted cross-entropy sum whose gradient w.r.t. ``h`` was computed chunk by chunk in
    the forward pass (see the module docstring)."""

    @mx.custom_function
    def f(h: mx.array, t: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
        def part(s: int, e: int, after: list[mx.array]) -> mx.array:
            x = mx.depends(h[s:e], after) if after else h[s:e]
            return _ce_grad_chunk(head, x, t[s:e], w[s:e])

        packed = _in_order(part, h.shape[0], rows)
        return (packed[:, -1] * w).sum(), packed

    @f.vjp
    def f_vjp(primals: Any, cotangents: Any, outputs: Any) -> tuple[mx.array, mx.array, mx.array]:
        h, t, w = primals
        dh = outputs[1][:, :-1] * cotangents[0]
        return dh.astype(h.dtype), mx.zeros_like(t), mx.zeros_like(w)

    return f(h, t, w)[0]


def _ce_kl_grad_chunk(head: Head, h: mx.array, hb: mx.array, t: mx.array, w_ce: mx.array,
                      w_kl: mx.array, temperature: float) -> mx.array:
    """One chunk packed as [dCE/dh (H) | dKL/dh (H) | CE (1) | KL x T^2 (1)]."""
    z, lse, ce = _ce_parts(head, h, t)
    p1 = mx.exp(z - lse[:, None])
    onehot = mx.arange(z.shape[-1])[None, :] == t[:, None]
    dz_ce = (p1 - onehot.astype(mx.float32)) * w_ce[:, None]
    tt = temperature
    lp = nn.log_softmax(z / tt, axis=-1)
    lq = nn.log_softmax(head(hb).astype(mx.float32) / tt, axis=-1)
    p = mx.exp(lp)
    kl = (p * (lp - lq)).sum(axis=-1)
    # d/dz of T^2 * sum p (lp - lq) is T * p * (lp - lq - KL)
    dz_kl = tt * p * (lp - lq - kl[:, None]) * w_kl[:, None]
    return mx.concatenate([_head_vjp(head, h, dz_ce), _head_vjp(head, h, dz_kl), ce[:, None],
                           (kl * tt * tt)[:, None]], axis=1)


def ce_kl_with_grad(head: Head, h: mx.array, hb: mx.array, t: mx.array, w_ce: mx.array,
                    w_kl: mx.array, temperature: float, rows: int) -> tuple[mx.array, mx.array]:
    """(weighted CE sum, weighted KL(fine-tuned || base) x T^2 sum) for LwF; ``hb`` are the
    base model's hidden states at the same rows (no gradient)."""

    @mx.custom_function
    def f(h: mx.array, hb: mx.array, t: mx.array, w_ce: mx.array, w_kl: mx.array) -> Any:
        def part(s: int, e: int, after: list[mx.array]) -> mx.array:
            x, xb = mx.depends([h[s:e], hb[s:e]], after) if after else (h[s:e], hb[s:e])
            return _ce_kl_grad_chunk(head, x, xb, t[s:e], w_ce[s:e], w_kl[s:e], temperature)

        packed = _in_order(part, h.shape[0], rows)
        d = h.shape[1]
        return (packed[:, 2 * d] * w_ce).sum(), (packed[:, 2 * d + 1] * w_kl).sum(), packed

    @f.vjp
    def f_vjp(primals: Any, cotangents: Any, outputs: Any) -> tuple[mx.array, ...]:
        h = primals[0]
        d = h.shape[1]
        packed = outputs[2]
        dh = packed[:, :d] * cotangents[0] + packed[:, d:2 * d] * cotangents[1]
        return (dh.astype(h.dtype),) + tuple(mx.zeros_like(x) for x in primals[1:])

    ce, kl, _ = f(h, hb, t, w_ce, w_kl)
    return ce, kl
