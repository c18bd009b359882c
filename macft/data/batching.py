"""Batches shared by both backends: random order (padded), length-grouped (less padding) or packed.

A :class:`Batch` holds numpy arrays only; each backend turns them into its own
tensors. Conventions (both backends rely on them):

- ``input_ids[b, t]``: tokens, padded with ``pad_id``.
- ``loss_mask[b, t] == 1``: token ``t`` is a target, predicted from the logits at
  ``t - 1``. So the loss uses ``logits[:, :-1]`` against ``input_ids[:, 1:]``
  weighted by ``loss_mask[:, 1:]``. Padding and the first token of every
  example (packed or not) are never targets.
- ``position_ids``: 0, 1, 2, ... restarting at every packed example.
- ``segment_ids``: 1, 2, ... per example in a row, 0 for padding. A backend that
  honours them attends only within a segment.

Order is deterministic for (seed, epoch).

- Length-grouped (``group_by_length``; `macft train --group-by-length`): rows are
  shuffled, grouped into "mega-batches" of ``MEGA`` batches, sorted by length inside
  each, cut into batches of ``batch_size`` examples, and the batches shuffled again.
  Little padding, at the price of batches whose examples have similar lengths (measured:
  4-5% higher validation loss, bench/RESULTS.md auto_vs_grid). Without it (the training
  default): batches of ``batch_size`` examples in plain random order, padded to their
  longest.
- Packing: batches of ``batch_size`` examples in plain random order (no length
  bias), each batch laid out (nearly) padding-free: its examples are packed into
  as few balanced rows of at most ``max_seq_len`` tokens as hold them. A
  packed batch holds the same examples as an unpacked one would, so the training
  dynamics do not change; only the padding goes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .dataset import Example

MEGA = 8  # batches per sorting window: larger = less padding, less randomness
PAD_MULTIPLE = 8  # pad the time axis to a multiple of this (fewer distinct shapes)


@dataclass
class Batch:
    input_ids: np.ndarray  # int32 [B, T]
    loss_mask: np.ndarray  # float32 [B, T]
    position_ids: np.ndarray  # int32 [B, T]
    segment_ids: np.ndarray  # int32 [B, T]
    n_examples: int
    packed: bool = False

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.segment_ids > 0).sum())

    @property
    def n_trained(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    """Each row is one example, or several packed ones."""
    lengths = [sum(len(e) for e in row) for row in rows]
    t = int(math.ceil(max(lengths) / PAD_MULTIPLE) * PAD_MULTIPLE)
    b = len(rows)
    ids = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), np.float32)
    pos = np.zeros((b, t), np.int32)
    seg = np.zeros((b, t), np.int32)
    n = 0
    for i, row in enumerate(rows):
        off = 0
        for k, e in enumerate(row, start=1):
            L = len(e)
            ids[i, off:off + L] = e.ids
            mask[i, off:off + L] = e.mask
            mask[i, off] = 0  # never predict an example's first token from the one before
            pos[i, off:off + L] = np.arange(L, dtype=np.int32)
            seg[i, off:off + L] = k
            off += L
            n += 1
    return Batch(ids, mask, pos, seg, n, packed)


class BatchPlan:
    """Deterministic batches for every epoch; positions are (epoch, index)."""

    def __init__(self, examples: list[Example], batch_size: int, *, seed: int, pad_id: int,
                 packing: bool = False, max_seq_len: int = 2048, shuffle: bool = True,
                 rehearsal: list[Example] | None = None, rehearsal_ratio: float = 0.0,
                 group_by_length: bool = True):
        if not examples:
            raise ValueError("no examples to batch")
        # Rehearsal examples follow the task examples in one index space; every epoch
        # draws round(ratio / (1 - ratio) * n_task) of them (without replacement while the
        # pool lasts), so they make up `rehearsal_ratio` of the epoch.
        self.n_task = len(examples)
        self.examples = examples + list(rehearsal or [])
        self.rehearsal_ratio = rehearsal_ratio if rehearsal else 0.0
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.packing = packing
        self.max_seq_len = max_seq_len
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self._cache: dict[int, list[list[list[int]]]] = {}

    def rows_for_epoch(self, epoch: int) -> list[list[list[int]]]:
        """Batches of rows of example indices."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = random.Random(f"batches-{self.seed}-{epoch}")
        order = list(range(self.n_task)) + self.rehearsal_picks(epoch)
        if self.shuffle:
            rng.shuffle(order)
        else:
            order.sort(key=lambda i: -len(self.examples[i]))
        batches: list[list[list[int]]] = []
        if self.packing:
            for k in range(0, len(order), self.batch_size):
                group = sorted(order[k:k + self.batch_size], key=lambda i: -len(self.examples[i]))
                batches.append(self._pack(group))
        else:
            window = self.batch_size * (MEGA if self.group_by_length else 1)
            for w in range(0, len(order), window):
                chunk = sorted(order[w:w + window], key=lambda i: -len(self.examples[i]))
                rows = [[i] for i in chunk]
                batches += [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
            if self.shuffle:
                rng.shuffle(batches)
        self._cache = {epoch: batches}
        return batches

    def rehearsal_picks(self, epoch: int) -> list[int]:
        pool = len(self.examples) - self.n_task
        if not pool or self.rehearsal_ratio <= 0:
            return []
        k = round(self.rehearsal_ratio / (1 - self.rehearsal_ratio) * self.n_task)
        rng = random.Random(f"rehearsal-{self.seed}-{epoch}")
        picks: list[int] = []
        while len(picks) < k:
            perm = list(range(self.n_task, self.n_task + pool))
            rng.shuffle(perm)
            picks += perm[:k - len(picks)]
        return picks

    def _pack(self, group: list[int]) -> list[list[int]]:
        """As few rows of at most max_seq_len tokens as hold the group (sorted longest first),
        balanced so that rows end up about equally long (each example goes to the emptiest
        row it fits in): the batch is then padded to its longest row."""
        lengths = [len(self.examples[i]) for i in group]
        n_rows = max(1, math.ceil(sum(lengths) / self.max_seq_len))
        while True:
            rows: list[list[int]] = [[] for _ in range(n_rows)]
            used = [0] * n_rows
            for i, L in zip(group, lengths):
                fits = [k for k in range(n_rows) if used[k] + L <= self.max_seq_len]
                if not fits:
                    break
                k = min(fits, key=lambda r: used[r])
                rows[k].append(i)
                used[k] += L
            else:
                return [r for r in rows if r]
            n_rows += 1

    def batches_per_epoch(self) -> int:
        return len(self.rows_for_epoch(0))

    def batch(self, epoch: int, index: int) -> Batch:
        rows = self.rows_for_epoch(epoch)[index]
        return collate([[self.examples[i] for i in r] for r in rows], self.pad_id, self.packing)

    def largest_batch(self) -> Batch:
        """The micro-batch with the most cells (rows x longest row) of the first epoch: what
        decides peak memory (the memory estimate and the MLX probe step use it)."""
        rows = self.rows_for_epoch(0)
        ex = self.examples

        def cells(batch_rows: list[list[int]]) -> int:
            return len(batch_rows) * max(sum(len(ex[i]) for i in r) for r in batch_rows)

        return self.batch(0, max(range(len(rows)), key=lambda k: cells(rows[k])))

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Endless stream of (epoch, index, batch) starting at a position."""
        while True:
            n = len(self.rows_for_epoch(epoch))
            while index < n:
                yield epoch, index, self.batch(epoch, index)
                index += 1
            epoch, index = epoch + 1, 0


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Validation batches: sorted by length, fixed order, no packing."""
    if not examples:
        return []
    plan = BatchPlan(examples, batch_size, seed=0, pad_id=pad_id, shuffle=False)
    return [plan.batch(0, i) for i in range(plan.batches_per_epoch())]


def padding_share(batches: list[Batch]) -> float:
    total = sum(b.input_ids.size for b in batches)
    real = sum(b.n_tokens for b in batches)
    return 1.0 - real / total if total else 0.0
