"""Using a fine-tune: one small protocol for generating and scoring, three implementations.

- MLX (:mod:`macft.mlx_backend.infer`): the base model + the run's adapter in mlx-lm.
- PyTorch (:mod:`cuda_backend.infer`): transformers + peft.
- GGUF (:mod:`export.gguf_model`): the pinned llama.cpp's tools (generation only).

``chat``, ``generate`` and ``eval`` talk to this protocol only; :mod:`macft.chat_session`
loads the implementation. ``adapters(False)`` switches the adapter off in place (base-model
answers and logits without a second copy).

This module imports no implementation (they import it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ChatModel", "Generation", "IncrementalText", "Sampling", "Scorer", "fit_history", "generate",
           "stop_ids"]


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool  # ended on an end token (not the token limit)
    prompt_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ChatModel(Protocol):
    kind: str  # "mlx", "cuda", "gguf"
    tokenizer: Any  # HF tokenizer (for the chat template), None for a bare GGUF
    description: str

    def prompt(self, messages: list[dict[str, str]]) -> Any:
        """The model's input for a conversation, through its chat template, ready for the
        assistant's reply (token ids, or text for a GGUF)."""

    def stream(self, prompt: Any, sampling: Sampling) -> Iterator[str]:
        """Yield text pieces as they are generated; stops on every end token.
        The finished :class:`Generation` is then in ``self.last``."""

    def adapters(self, enabled: bool) -> AbstractContextManager[None]:
        """Within this block the adapter is on (fine-tuned) or off (base model)."""

    def close(self) -> None: ...


class Scorer(Protocol):
    """Loss and KL on token batches (MLX and PyTorch models; not GGUF)."""

    def loss(self, batch: Any) -> tuple[float, int]:
        """(summed cross-entropy over trained tokens, trained tokens), adapter on."""

    def base_loss(self, batch: Any) -> tuple[float, int]:
        """The same with the adapter off."""

    def kl_to_base(self, batch: Any) -> tuple[float, int]:
        """(summed KL(fine-tuned || base) over real tokens, real tokens)."""


def generate(model: ChatModel, messages: list[dict[str, str]], sampling: Sampling) -> Generation:
    for _ in model.stream(model.prompt(messages), sampling):
        pass
    return model.last  # type: ignore[attr-defined]


def stop_ids(tokenizer: Any, end_tokens: list[str]) -> set[int]:
    """Ids of every end token (turn terminator, EOS) the tokenizer has."""
    ids = set()
    vocab = tokenizer.get_vocab()
    for t in end_tokens:
        if t in vocab:
            ids.add(vocab[t])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class IncrementalText:
    """Decode a growing list of ids into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return ""
        piece, self.text = full[len(self.text):], full
        return piece


def fit_history(model: Any, messages: list[dict[str, str]], max_prompt_tokens: int) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest user/assistant turns (never the system message or the last user turn)
    until the prompt fits; returns (messages, turns dropped)."""
    msgs = list(messages)
    dropped = 0
    while True:
        p = model.prompt(msgs)
        n = len(p) if isinstance(p, list) else (len(model.tokenizer(p)["input_ids"]) if model.tokenizer else len(p) // 3)
        head = 1 if msgs and msgs[0]["role"] == "system" else 0
        if n <= max_prompt_tokens or len(msgs) - head <= 1:
            return msgs, dropped
        del msgs[head]
        if len(msgs) > head and msgs[head]["role"] == "assistant":
            del msgs[head]
        dropped += 1
