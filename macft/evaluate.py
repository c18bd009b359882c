"""Judge a fine-tune: loss and perplexity, generations against references, base vs fine-tuned,
stop rate, and retention (KL to the base and perplexity on general data, before vs after).

Scores:
- **exact match**: the generated answer equals the reference after stripping whitespace.
- **ROUGE-L** (F1, the ``rouge-score`` package) over words, with every CJK character a
  word of its own (the package's default tokenizer drops non-ASCII text, which would score
  Japanese answers as empty).
- **stop rate**: share of generations that ended on an end token before the token limit.
- **retention**: on a general held-out set, the mean KL(fine-tuned || base) per token and
  the perplexity of base and fine-tuned; low KL and unchanged perplexity = little forgetting.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .data.batching import eval_batches
from .data.formats import Sample
from .inference import Sampling

CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef])")


class MixedTokenizer:
    """Words for space-separated scripts, single characters for CJK (for ROUGE)."""

    def tokenize(self, text: str) -> list[str]:
        spaced = CJK.sub(r" \1 ", text.lower())
        return [t for t in re.split(r"[\s\.,!?;:\"'()\[\]、。！？「」]+", spaced) if t]


def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MixedTokenizer())
    return float(scorer.score(ref, pred)["rougeL"].fmeasure)


def exact(pred: str, ref: str) -> bool:
    return pred.strip() == ref.strip()


@dataclass
class PromptCase:
    messages: list[dict[str, str]]
    reference: str | None
    where: str


def prompt_cases(samples: list[Sample], n: int) -> list[PromptCase]:
    """Conversations up to their last assistant turn, with that turn as the reference."""
    out = []
    for s in samples:
        if not s.is_chat:
            continue
        msgs = s.messages or []
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        out.append(PromptCase(msgs[:last], msgs[last]["content"], str(s.where)))
        if len(out) >= n:
            break
    return out


@dataclass
class GenScores:
    exact_match: float
    rouge_l: float
    stop_rate: float
    answers: list[str] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {"exact_match": self.exact_match, "rouge_l": self.rouge_l, "stop_rate": self.stop_rate}


def score_generations(model: Any, cases: list[PromptCase], sampling: Sampling, tuned: bool = True,
                      progress: Any = None) -> GenScores:
    answers, em, rl, stops = [], [], [], []
    with model.adapters(tuned):
        for c in cases:
            for _ in model.stream(model.prompt(c.messages), sampling):
                pass
            g = model.last
            answers.append(g.text)
            stops.append(g.stopped)
            if c.reference is not None:
                em.append(exact(g.text, c.reference))
                rl.append(rouge_l(g.text, c.reference))
            if progress:
                progress()
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return GenScores(mean(em), mean(rl), mean(stops), answers)


def loss_and_ppl(scorer: Any, batches: list[Any], tuned: bool = True) -> dict[str, float]:
    total, n = 0.0, 0
    for b in batches:
        s, k = scorer.loss(b) if tuned else scorer.base_loss(b)
        total += s
        n += k
    loss = total / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


def mean_kl(scorer: Any, batches: list[Any]) -> float:
    total, n = 0.0, 0
    for b in batches:
        s, k = scorer.kl_to_base(b)
        total += s
        n += k
    return total / n if n else float("nan")


def general_batches(source: str, renderer: Any, max_seq_len: int, batch_size: int, pad_id: int) -> list[Any]:
    from .data.dataset import load_samples, tokenize_samples
    from .data.readers import resolve_sources

    train_src, valid_src = resolve_sources(source, None)
    _, samples = load_samples(valid_src or train_src)
    examples, _ = tokenize_samples(samples, renderer, max_seq_len, valid_src or train_src)
    return eval_batches(examples, batch_size, pad_id)
