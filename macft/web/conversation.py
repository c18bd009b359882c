"""One turn of the web chat, without Gradio: the terminal chat's history trimming and end
tokens, run on the model's thread, and the notes the page shows under the answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from ..chat_session import MAX_PROMPT_TOKENS, conversation
from ..inference import Sampling, fit_history
from .worker import ModelWorker


@dataclass
class Reply:
    """An answer as it grows; ``done`` once the model has finished it."""

    text: str = ""
    dropped: int = 0  # oldest exchanges left out so that the prompt fits
    hit_limit: bool = False  # ended at max_new_tokens rather than on an end token
    done: bool = False


def answer(worker: ModelWorker, history: list[dict[str, str]], system: str | None, sampling: Sampling,
           tuned: bool = True, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Iterator[Reply]:
    """Stream the model's answer to ``history`` (ending in the user's message), the adapter
    on (``tuned``) or off (the base model). Yields the same :class:`Reply`, updated."""
    reply = Reply()

    def generate() -> Iterator[str]:  # runs on the model's thread
        model = worker.model
        msgs, reply.dropped = fit_history(model, conversation(system, history), max_prompt_tokens)
        with model.adapters(tuned):
            yield from model.stream(model.prompt(msgs), sampling)
        reply.hit_limit = not model.last.stopped

    with closing(worker.stream(generate)) as pieces:  # closed early: the generation stops
        for piece in pieces:
            reply.text += piece
            yield reply
    reply.done = True
    yield reply


def notes(reply: Reply, sampling: Sampling, label: str = "") -> list[str]:
    """What the page says under an answer (as it grows, and once done)."""
    who = f"{label}: " if label else ""
    out = []
    if reply.dropped:
        out.append(f"{who}the conversation is longer than the context: the oldest {reply.dropped} "
                   "exchange(s) were left out of the prompt.")
    if reply.done and reply.hit_limit:
        out.append(f"{who}stopped at the {sampling.max_new_tokens}-token limit (raise max new tokens "
                   "for longer answers).")
    return out


def why_no_base(model: Any) -> str | None:
    """Why this model cannot be compared with its base (None when it can)."""
    if getattr(model, "has_adapter", False) or getattr(model, "lora", None):
        return None
    if getattr(model, "kind", "") == "gguf":
        return ("This GGUF has the fine-tune merged into its weights: there is no base model inside "
                "it to compare with. To compare, serve the run (--run RUN), or the base GGUF with the "
                "adapter as a GGUF LoRA (macft export --lora-gguf; then --gguf BASE.gguf --lora-gguf "
                "ADAPTER.gguf).")
    return "No adapter is loaded (--model without --adapter): the base model is all there is."
