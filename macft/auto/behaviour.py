"""Does a candidate answer like a usable chat model? Greedy answers to a few held-out prompts
must end on the end-of-turn token and must not collapse into repetition (the failure people
hit with small data and a learning rate too high)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS = 3
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 32, 256
REPEAT_NGRAM = 4
REPEAT_DISTINCT = 0.35  # fewer distinct 4-grams than this share of all of them: a loop


def is_repetitive(ids: list[int], n: int = REPEAT_NGRAM, distinct: float = REPEAT_DISTINCT) -> bool:
    """True when the token ids are mostly one short pattern repeated ("a a a a", "ok ok ok").
    Text shorter than 6 n-grams is never called repetitive."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if len(grams) < 6 * n:
        return False
    return len(set(grams)) / len(grams) < distinct


@dataclass
class Answer:
    prompt: str
    text: str
    stopped: bool
    repetitive: bool

    @property
    def ok(self) -> bool:
        return self.stopped and not self.repetitive

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt[-200:], "answer": self.text[:400], "stopped": self.stopped,
                "repetitive": self.repetitive}


def held_out_prompts(valid_samples: list[Any], tokenizer: Any, n: int = PROMPTS) -> list[tuple[list[dict], int]]:
    """(conversation up to its last assistant turn, token limit) for the first ``n`` chat rows
    of the validation data; the limit is twice the reference answer, within bounds."""
    from ..evaluate import prompt_cases

    out = []
    for case in prompt_cases(valid_samples, n):
        ref = len(tokenizer.encode(case.reference or "", add_special_tokens=False))
        out.append((case.messages, int(min(MAX_NEW_TOKENS, max(MIN_NEW_TOKENS, 2 * ref + 8)))))
    return out


def check(backend: Any, model_path: Path, adapter_dir: Path, renderer: Any,
          prompts: list[tuple[list[dict], int]]) -> list[Answer]:
    """Greedy answers of base + the adapter in ``adapter_dir`` to ``prompts``."""
    from ..inference import Sampling, generate

    if not prompts:
        return []
    chat = backend.load_chat_model(model_path, adapter_dir, renderer.end_tokens())
    try:
        if renderer.template and getattr(chat, "tokenizer", None) is not None:
            chat.tokenizer.chat_template = renderer.template
        answers = []
        for messages, limit in prompts:
            g = generate(chat, messages, Sampling(max_new_tokens=limit, temperature=0.0))
            answers.append(Answer(messages[-1]["content"], g.text, g.stopped,
                                  is_repetitive(list(g.token_ids))))
        return answers
    finally:
        chat.close()
