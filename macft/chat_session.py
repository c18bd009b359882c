"""A chat session: which model to talk to, and the conversation sent to it.

Shared by ``macft chat`` (terminal), its web page (:mod:`macft.web`), ``macft generate`` and
``macft eval``. The model comes back as a :class:`macft.inference.ChatModel`; the
implementations are found lazily: MLX and PyTorch through the backend registry
(:func:`macft.backends.get_backend`), a GGUF through :mod:`export.gguf_model`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import MacftError
from .inference import ChatModel, Sampling
from .run import Resolved, Run, open_run
from .ui import status

# the longest prompt (conversation so far) before the oldest turns are left out
MAX_PROMPT_TOKENS = 3072


def conversation(system: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages for the model: the system prompt (if any), then the turns so far."""
    return ([{"role": "system", "content": system}] if system else []) + history


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The sampling flags of ``chat`` and ``generate``."""
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)


def load_from_args(args: argparse.Namespace) -> Any:
    """:func:`load_chat_model` for the model flags of ``chat`` and ``generate``, with a spinner."""
    with status("Loading the model ..."):
        return load_chat_model(run=args.run, best=args.best, model=args.model, adapter=args.adapter,
                               gguf=args.gguf, lora_gguf=getattr(args, "lora_gguf", None),
                               backend=args.backend, llama_cpp=args.llama_cpp,
                               force=getattr(args, "force", False))


def read_run(run_dir: str | Path, best: bool = False) -> Run:
    """The run (:func:`macft.run.open_run`), refused when it has no ``adapter/`` yet
    (``best_adapter/`` with ``best``), saying what state it is in."""
    run = open_run(run_dir)
    run.adapter(best)
    return run


def run_chat_template(resolved: Resolved | dict[str, Any]) -> str | None:
    """The chat template a run trained with when it is not the tokenizer's own (a named
    template, a user's file, or the fallback), else None."""
    if not isinstance(resolved, Resolved):
        resolved = Resolved.from_dict(resolved)
    return resolved.training_template()


def load_chat_model(*, run: str | None = None, best: bool = False, model: str | None = None,
                    adapter: str | None = None, gguf: str | None = None, lora_gguf: str | None = None,
                    backend: str | None = None, llama_cpp: str | None = None, force: bool = False) -> Any:
    """The model to talk to: a run (base + adapter, by the backend that trained it, or
    ``backend``; ``model`` replaces the run's base), a base model with an optional adapter, or
    a GGUF through llama.cpp.

    A run's base is compared with the fingerprint recorded at training: other weights are
    refused unless ``force`` (:func:`macft.fingerprint.check_base`).

    A run's prompts are rendered with the chat template it trained with (set on the
    tokenizer, which every renderer reads)."""
    chat = _load_chat_model(run=run, best=best, model=model, adapter=adapter, gguf=gguf,
                            lora_gguf=lora_gguf, backend=backend, llama_cpp=llama_cpp, force=force)
    template = read_run(run, best).resolved.training_template() if run else None
    if template and getattr(chat, "tokenizer", None) is not None:
        chat.tokenizer.chat_template = template
    return chat


def _load_chat_model(*, run: str | None, best: bool, model: str | None, adapter: str | None,
                     gguf: str | None, lora_gguf: str | None, backend: str | None,
                     llama_cpp: str | None, force: bool = False) -> ChatModel:
    from .adapter import WEIGHTS_NAME
    from .data.render import Renderer
    from .data.tokenizer import load_tokenizer
    from .models import resolve_model_path

    info = read_run(run, best) if run else None
    run_base = str(Path(info.base_model or "")) if info else None
    if gguf:
        from export.gguf_model import GGUFChatModel
        from export.llama_cpp import locate

        tok = None
        src = run_base if info else model
        if src:
            tok = load_tokenizer(src)
        return GGUFChatModel(Path(gguf), locate(llama_cpp), tok, Path(lora_gguf) if lora_gguf else None)
    if info is not None:
        model_path = resolve_model_path(model or run_base)  # type: ignore[arg-type]
        info.check_base(model_path, force=force, other_base_hint=" with --model BASE")
        adapter_dir, end_tokens = info.adapter(best), list(info.resolved.end_tokens)
        chosen = backend or info.backend
    else:
        if not model:
            raise MacftError("Nothing to load: give --run RUN, --model BASE (with --adapter DIR), or --gguf FILE.")
        model_path = resolve_model_path(model)
        adapter_dir = Path(adapter) if adapter else None
        if adapter_dir is not None and not (adapter_dir / WEIGHTS_NAME).is_file():
            raise MacftError(f"{adapter_dir} is not a PEFT adapter ({WEIGHTS_NAME} is missing).")
        end_tokens = Renderer(load_tokenizer(str(model_path))).end_tokens()
        chosen = backend
    from .backends import choose_auto, get_backend

    if chosen in (None, "auto"):
        chosen, _ = choose_auto()
    return get_backend(chosen).load_chat_model(model_path, adapter_dir, end_tokens)
