"""What verification runs on: validation prompts and the token stream perplexity is scored on.

The samples come from ``--prompts FILE.jsonl`` if given, else the run's validation data
(its ``data.valid`` file, or the rows ``macft train`` held out of ``data.train`` with the same
fraction and seed), else a few generic prompts. Each sample is rendered through the model's
chat template (or the run's fallback template) exactly as training rendered it.

- A *prompt* is a conversation up to its last assistant turn, rendered with the generation
  prompt; greedy generations from it are compared.
- The *stream* is every sample rendered in full (answers included), concatenated: the
  perplexity and next-token agreement are scored on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft.errors import MacftError

GENERIC_PROMPTS = [
    "Hello! Who are you?",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Give me a short tip for learning a language.",
    "Name three colours.",
    "Tell me a very short story about a cat.",
    "How do I boil an egg?",
]
MAX_PROMPT_CHARS = 64_000  # passed on a command line to llama.cpp


@dataclass
class Prompt:
    text: str  # rendered, exactly as llama.cpp receives it (see verify.py for BOS handling)
    ids: list[int]  # the Hugging Face tokenizer's ids for ``text``
    reference: str | None = None  # the data's answer, for the README / report


@dataclass
class EvalSet:
    source: str
    prompts: list[Prompt]
    stream: list[int]
    end_tokens: list[str]
    end_ids: list[int]
    bos_id: int | None
    notes: list[str] = field(default_factory=list)


def run_samples(cfg: Any, resolved: dict) -> tuple[list[Any], str, list[str]]:
    """Validation samples of a run, as training split them; (samples, source, notes)."""
    from macft.data.dataset import load_samples, split_valid
    from macft.data.readers import resolve_sources

    data = cfg.data
    if not data.train and not data.valid:
        return [], "", ["the run's config names no data"]
    enc = getattr(data, "encoding", "auto")  # as training read it
    try:
        if data.valid:
            _, samples = load_samples(data.valid, data.format, "validation", enc)
            return samples, f"validation file {data.valid}", []
        train_src, valid_src = resolve_sources(data.train, None)
        if valid_src:
            _, samples = load_samples(valid_src, data.format, "validation", enc)
            return samples, f"validation file {valid_src}", []
        _, rows = load_samples(train_src, data.format, data.split, enc)
        _, held = split_valid(rows, data.valid_fraction, cfg.train.seed)
        return held, f"{len(held)} rows held out of {train_src} (seed {cfg.train.seed})", []
    except MacftError as e:
        return [], "", [f"the run's validation data could not be read ({e.message})"]


def file_samples(path: str) -> list[Any]:
    from macft.data.dataset import load_samples

    if not Path(path).is_file():
        raise MacftError(f"--prompts {path} does not exist.", "Pass a JSONL file of chat rows "
                         '({"messages": [...]}) or prompt rows ({"prompt": ..., "completion": ...}).')
    _, samples = load_samples(path, encoding_option=None)  # detected: export has no --encoding
    return samples


def generic_samples() -> list[Any]:
    from macft.data.formats import Sample

    return [Sample([{"role": "user", "content": p}], None, f"built-in prompt {i + 1}")
            for i, p in enumerate(GENERIC_PROMPTS)]


def build_eval_set(renderer: Any, samples: list[Any], source: str, *, n_prompts: int,
                   max_seq_len: int, end_tokens: list[str]) -> EvalSet:
    tok = renderer.tok
    prompts: list[Prompt] = []
    stream: list[int] = []
    notes: list[str] = []
    skipped = 0
    for s in samples:
        try:
            stream.extend(renderer.render(s).ids[:max_seq_len])  # the whole row, as training saw it
        except MacftError:
            skipped += 1  # a row the chat template refuses: training dropped it too
            continue
        if len(prompts) >= n_prompts:
            continue
        if s.is_chat:
            msgs = s.messages
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            head = msgs[:last] if last is not None else msgs
            if head:
                text = renderer.render_text(head, add_generation_prompt=True)
                if len(text) <= MAX_PROMPT_CHARS:
                    prompts.append(Prompt(text, renderer.encode(text),
                                          msgs[last]["content"] if last is not None else None))
        else:
            text = s.text or ""
            cut = text.rfind(" ", 0, max(1, len(text) // 3))
            head_text = text[: cut if cut > 0 else max(1, len(text) // 3)]
            if head_text and len(head_text) <= MAX_PROMPT_CHARS:
                prompts.append(Prompt(head_text, list(tok(head_text, add_special_tokens=True)["input_ids"]),
                                      text[len(head_text):]))
    vocab = tok.get_vocab()
    end_ids = [vocab[t] for t in end_tokens if t in vocab]
    if skipped:
        notes.append(f"{skipped} validation row(s) could not be rendered by the chat template and were skipped")
    if not prompts:
        notes.append("no prompt could be built from the samples")
    return EvalSet(source, prompts, stream, list(end_tokens), end_ids, tok.bos_token_id, notes)
