"""Using a fine-tune: one small protocol for generating and scoring, three implementations.

- MLX (:mod:`macft.mlx_backend.infer`): the base model + the run's adapter in mlx-lm.
- PyTorch (:mod:`cuda_backend.infer`): transformers + peft.
- GGUF (:mod:`export.gguf_model`): the pinned llama.cpp's tools (generation only).

``chat``, ``generate`` and ``eval`` talk to this protocol only. ``adapters(False)``
switches the adapter off in place (base-model answers and logits without a second copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import MacftError


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


@dataclass
class RunInfo:
    """What a run directory says about how to load its model."""

    run_dir: Path
    backend: str
    model_path: Path
    adapter_dir: Path
    end_tokens: list[str]
    resolved: dict[str, Any]


def missing_adapter(run: Path, best: bool, base: str | None = None) -> MacftError | None:
    """None when the run has the adapter asked for; else the error saying what state the run is
    in (still training or killed before its first checkpoint, interrupted with checkpoints,
    finished without a best adapter) and what to do."""
    from .adapter import WEIGHTS_NAME

    name = "best_adapter" if best else "adapter"
    if (run / name / WEIGHTS_NAME).is_file():
        return None
    root = run / "checkpoints"
    ckpts = sorted(p for p in root.glob("step-*") if (p / WEIGHTS_NAME).is_file()) if root.is_dir() else []
    if best and (run / "adapter" / WEIGHTS_NAME).is_file():
        return MacftError(f"{run} has no best_adapter/: the run finished, but it kept no best adapter "
                          "(no validation loss was measured, e.g. --eval-every 0).",
                          "Use its final adapter/ (drop --best).")
    best_so_far = (not best and (run / "best_adapter" / WEIGHTS_NAME).is_file())
    also = " Or use its best adapter so far: add --best." if best_so_far else ""
    if ckpts:
        last = ckpts[-1]
        step = last.name.split("-", 1)[1].lstrip("0") or "0"
        return MacftError(f"{run} has no {name}/ yet: the run stopped (or is still training) after its "
                          f"checkpoint at step {step} ({last}); {name}/ is written when training ends.",
                          f"Finish it with `macft train --resume {run}`, or use that checkpoint's adapter "
                          f"now: --adapter {last} --model {base or 'BASE'}.{also}")
    return MacftError(f"{run} has no {name}/ and no checkpoint: the run stopped (or is still training) "
                      "before its first checkpoint, so there is nothing to use yet.",
                      "Wait for it to finish, or start the training again (`macft train ...`; "
                      f"checkpoints are written every --save-every steps).{also}")


def read_run(run_dir: str | Path, best: bool = False) -> RunInfo:
    from .config import load_run_config

    run = Path(run_dir)
    if not run.is_dir():
        raise MacftError(f"Run directory {run} does not exist.", "Pass the directory `macft train` wrote.")
    cfg, resolved = load_run_config(run)
    problem = missing_adapter(run, best, resolved.get("model_path") or cfg.model.name)
    if problem is not None:
        raise problem
    adapter = run / ("best_adapter" if best else "adapter")
    # the path training resolved, unless it is gone (then the name given to training)
    recorded = resolved.get("model_path")
    model_path = Path(str(recorded) if recorded and Path(str(recorded)).exists() else (cfg.model.name or ""))
    return RunInfo(run, resolved.get("backend", "cuda"), model_path, adapter,
                   list(resolved.get("end_tokens") or []), resolved)


def run_chat_template(resolved: dict[str, Any]) -> str | None:
    """The chat template a run trained with when it is not the tokenizer's own (a named
    template, a user's file, or the fallback), else None."""
    text = resolved.get("chat_template_text")
    if text:
        return str(text)
    if resolved.get("chat_template") == "fallback":
        from .data.render import FALLBACK_TEMPLATE

        return str(resolved.get("fallback_template") or FALLBACK_TEMPLATE)
    return None


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
    template = run_chat_template(read_run(run, best).resolved) if run else None
    if template and getattr(chat, "tokenizer", None) is not None:
        chat.tokenizer.chat_template = template
    return chat


def _load_chat_model(*, run: str | None, best: bool, model: str | None, adapter: str | None,
                     gguf: str | None, lora_gguf: str | None, backend: str | None,
                     llama_cpp: str | None, force: bool = False) -> Any:
    from .data.render import Renderer
    from .data.tokenizer import load_tokenizer
    from .models import resolve_model_path

    info = read_run(run, best) if run else None
    if gguf:
        from export.gguf_model import GGUFChatModel
        from export.llama_cpp import locate

        tok = None
        src = str(info.model_path) if info else model
        if src:
            tok = load_tokenizer(src)
        return GGUFChatModel(Path(gguf), locate(llama_cpp), tok, Path(lora_gguf) if lora_gguf else None)
    if info is not None:
        from .fingerprint import check_base

        model_path = resolve_model_path(model or str(info.model_path))
        check_base(info.resolved, info.run_dir, model_path, force=force,
                   other_base_hint=" with --model BASE")
        adapter_dir, end_tokens = info.adapter_dir, info.end_tokens
        chosen = backend or info.backend
    else:
        if not model:
            raise MacftError("Nothing to load: give --run RUN, --model BASE (with --adapter DIR), or --gguf FILE.")
        model_path = resolve_model_path(model)
        adapter_dir = Path(adapter) if adapter else None
        if adapter_dir is not None and not (adapter_dir / "adapter_model.safetensors").is_file():
            raise MacftError(f"{adapter_dir} is not a PEFT adapter (adapter_model.safetensors is missing).")
        end_tokens = Renderer(load_tokenizer(str(model_path))).end_tokens()
        chosen = backend
    if chosen in (None, "auto"):
        from .backends import choose_auto

        chosen, _ = choose_auto()
    if chosen == "mlx":
        from .mlx_backend import _import_mlx

        _import_mlx()
        from .mlx_backend.infer import MLXChatModel

        return MLXChatModel(model_path, adapter_dir, end_tokens)
    from cuda_backend.infer import TorchChatModel

    return TorchChatModel(model_path, adapter_dir, end_tokens)


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
