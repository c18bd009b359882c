"""From data sources to tokenized train / validation examples with statistics.

Truncation policy (documented in the README):

1. A conversation longer than ``max_seq_len`` tokens keeps as many *whole* turns
   as fit: it is cut just after the last assistant reply (with its terminator)
   that ends within the limit.
2. If not even the first reply fits, the example is cut at ``max_seq_len``
   tokens (the end of that reply and its terminator are lost).
3. Plain text is cut at ``max_seq_len`` tokens.
4. An example left with no trained token (e.g. a long prompt that fills the
   whole window) is dropped.

Before any of this, a row is cut to :data:`CHARS_PER_TOKEN_BOUND` x ``max_seq_len``
characters (and ``max_seq_len`` turns), so the work and memory per row stay bounded
whatever the input: a 50 MB row costs what a 130 KB one does. A cut row counts as truncated.

Truncated and dropped examples are counted and reported.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.markup import escape

from ..errors import DataError, Location, MacftError
from .formats import Sample, detect_format, normalize
from .readers import Record, read_records, resolve_sources
from .render import Renderer


@dataclass
class Example:
    ids: np.ndarray  # int32 [L]
    mask: np.ndarray  # uint8 [L]; 1 = target token (see render.py)
    where: Location
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class SplitStats:
    source: str
    rows: int = 0
    examples: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    max_len: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("lengths")
        return d


@dataclass
class TokenizedData:
    format: str
    train: list[Example]
    valid: list[Example]
    train_stats: SplitStats
    valid_stats: SplitStats | None
    valid_from: str  # "file", "split" or "none"
    train_samples: list[Sample] = field(default_factory=list, repr=False)
    valid_samples: list[Sample] = field(default_factory=list, repr=False)


def load_samples(source: str, fmt: str = "auto", split: str = "train", encoding: str = "auto",
                 encoding_option: str | None = "--encoding") -> tuple[str, list[Sample]]:
    """Read and normalise every row of a source; the format comes from the first row.
    ``encoding``: the text files' encoding ("auto" detects it; see textio.py);
    ``encoding_option``: the flag that sets it, named in messages (None: the command has none)."""
    records: list[Record] = read_records(source, split=split, encoding=encoding, option=encoding_option)
    chosen = detect_format(records[0]) if fmt == "auto" else fmt
    return chosen, [normalize(r, chosen) for r in records]


# A token of ordinary text covers a few characters (English ~4, Japanese ~1-2); the longest
# tokens of common vocabularies are runs of spaces or punctuation of up to ~31 characters
# (Gemma), and no natural text averages anywhere near that over a whole row. So more than
# 64 x max_seq_len characters cannot fit in max_seq_len tokens: whatever lies beyond would be
# truncated anyway, and cutting it before tokenizing changes no kept token. 64 keeps a 2x
# margin over the longest single tokens while bounding the work (2048 tokens: 128 Ki chars).
CHARS_PER_TOKEN_BOUND = 64


def bound_sample(sample: Sample, max_seq_len: int) -> tuple[Sample, bool]:
    """``sample`` cut to what could fit in ``max_seq_len`` tokens, and whether it was cut.

    The contents are cut where their running total passes CHARS_PER_TOKEN_BOUND x
    max_seq_len characters; turns after the ``max_seq_len``-th are dropped too (every
    turn holds at least one token of text)."""
    budget = CHARS_PER_TOKEN_BOUND * max_seq_len
    if not sample.is_chat:
        text = sample.text or ""
        if len(text) <= budget:
            return sample, False
        return Sample(None, text[:budget], sample.where), True
    msgs = sample.messages or []
    total = 0
    for i, m in enumerate(msgs):
        n = len(m["content"])
        if i >= max_seq_len:
            return Sample(msgs[:i], None, sample.where), True
        if total + n > budget:
            rest = budget - total
            kept = msgs[:i] + ([{**m, "content": m["content"][:rest]}] if rest > 0 else [])
            return Sample(kept, None, sample.where), True
        total += n
    return sample, False


def tokenize_samples(
    samples: list[Sample], renderer: Renderer, max_seq_len: int, source: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Example], SplitStats]:
    stats = SplitStats(source=source, rows=len(samples))
    out: list[Example] = []
    bounded = (bound_sample(sample, max_seq_len) for sample in samples)
    for s, cut, r in ((b, cut, r) for b, cut in bounded for r in renderer.render_all(b)):
        ids, mask, truncated = r.ids, r.mask, cut
        if len(ids) > max_seq_len:
            truncated = True
            cut = max((e for e in r.turn_ends if e <= max_seq_len), default=0)
            cut = cut if cut > 1 else max_seq_len
            ids, mask = ids[:cut], mask[:cut]
        if truncated:
            stats.truncated += 1
        if sum(mask) == 0:
            stats.dropped += 1
            continue
        ex = Example(np.asarray(ids, np.int32), np.asarray(mask, np.uint8), s.where, truncated)
        out.append(ex)
        stats.examples += 1
        stats.total_tokens += len(ex)
        stats.trained_tokens += int(ex.mask.sum())
        stats.lengths.append(len(ex))
        if progress:
            progress(1)
    stats.max_len = max(stats.lengths, default=0)
    return out, stats


def split_valid(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the rows (at least one when the fraction is positive)."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    random.Random(f"valid-split-{seed}").shuffle(order)
    n_valid = max(1, round(len(samples) * fraction))
    held = set(order[:n_valid])
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def build_data(
    train: str, valid: str | None, renderer: Renderer, *, fmt: str = "auto", max_seq_len: int,
    valid_fraction: float = 0.1, seed: int = 0, split: str = "train",
    progress: Callable[[int], None] | None = None, encoding: str = "auto",
) -> TokenizedData:
    train_src, valid_src = resolve_sources(train, valid)
    fmt_used, train_samples = load_samples(train_src, fmt, split, encoding)
    valid_from = "none"
    if valid_src:
        vfmt = fmt if fmt != "auto" else "auto"
        vfmt_used, valid_samples = load_samples(valid_src, vfmt, "validation", encoding)
        if (vfmt_used == "text") != (fmt_used == "text"):
            raise DataError(Location(valid_src), f"the validation data is in the {vfmt_used} format "
                            f"but the training data in the {fmt_used} format",
                            hint="Use the same kind of data for both (conversations or plain text).")
        valid_from = "file"
    else:
        train_samples, valid_samples = split_valid(train_samples, valid_fraction, seed)
        valid_from = "split" if valid_samples else "none"
        valid_src = f"{train_src} (held-out {valid_fraction:.0%})" if valid_samples else None
    warn_unanswered(train_samples + valid_samples, renderer)
    train_ex, train_stats = tokenize_samples(train_samples, renderer, max_seq_len, train_src, progress)
    if not train_ex:
        raise MacftError(
            f"No training example is left in {train_src}: all {train_stats.rows} rows were dropped "
            "because no trained token remained after truncation.",
            f"Raise --max-seq-len (now {max_seq_len}) or check --loss-on.")
    valid_ex, valid_stats = ([], None)
    if valid_samples:
        valid_ex, valid_stats = tokenize_samples(valid_samples, renderer, max_seq_len, str(valid_src), progress)
    return TokenizedData(fmt_used, train_ex, valid_ex, train_stats, valid_stats, valid_from,
                         train_samples, valid_samples)


def unanswered(samples: list[Sample]) -> list[Sample]:
    """Conversations whose last turn is the user's: that turn is context for no reply."""
    return [s for s in samples if s.is_chat and s.messages and s.messages[-1]["role"] == "user"]


def warn_unanswered(samples: list[Sample], renderer: Renderer) -> None:
    """One warning for every conversation that ends with a user turn (unless every token is
    trained, where that turn is trained too)."""
    if renderer.loss_on == "all":
        return
    found = unanswered(samples)
    if not found:
        return
    from ..ui import warn

    n = len(found)
    warn(escape(
        f"{n} conversation{'s end' if n != 1 else ' ends'} with a user turn (the first: {found[0].where}). "
        "That last turn is never trained (no reply follows it) and only lengthens the example. "
        "Remove the trailing user turn, or add the assistant's reply after it."))
