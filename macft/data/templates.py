"""Named chat templates, for models whose tokenizer carries none.

rinna's Japanese GPT-NeoX / GPT-2 models, ELYZA's Llama-2 and GPT-2 were trained with a
prompt format but publish no chat template. Training them with macft's generic fallback
works, but throws away what the model already knows about its own format. These are the
formats the families were trained with, chosen with ``--chat-template NAME`` (or a path to a
``.jinja`` file) and suggested by ``macft data inspect``. Whatever is used is recorded in
the run and written into the exported GGUF and the Ollama Modelfile.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import MacftError

# The model's own template (the default), or macft's generic one when it has none.
MODEL = "model"
FALLBACK = "fallback"


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    description: str
    file: str | None  # macft/templates/<file>; None: the fallback string in render.py


NAMED: dict[str, NamedTemplate] = {t.name: t for t in (
    NamedTemplate("rinna", "rinna's Japanese instruction/chat format: 'ユーザー: ...<NL>システム: ...' "
                  "(newlines written as <NL>)", "rinna.jinja"),
    NamedTemplate("llama2", "Llama-2-chat (and ELYZA): '[INST] <<SYS>>...<</SYS>> ... [/INST] reply </s>'",
                  "llama2.jinja"),
    NamedTemplate("alpaca", "Stanford Alpaca: '### Instruction: ... ### Response: ...'", "alpaca.jinja"),
    NamedTemplate("chatml", "ChatML: '<|im_start|>user ... <|im_end|>' (Qwen's format)", "chatml.jinja"),
    NamedTemplate("gemma3", "Gemma: '<start_of_turn>user ... <end_of_turn>'", "gemma3.jinja"),
    NamedTemplate(FALLBACK, "macft's generic '### User: / ### Assistant:' format, replies end with EOS", None),
)}


def template_text(name: str) -> str:
    t = NAMED[name]
    if t.file is None:
        from .render import FALLBACK_TEMPLATE

        return FALLBACK_TEMPLATE
    return resources.files("macft").joinpath("templates", t.file).read_text(encoding="utf-8")


def resolve(choice: str | None, tokenizer: Any) -> tuple[str, str | None]:
    """(name, template text or None for the tokenizer's own) for ``--chat-template``.

    ``None`` / ``"model"``: the tokenizer's own template, or the fallback when it has none.
    A name from :data:`NAMED`, or a path to a ``.jinja`` file: that template."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if choice in (None, "", MODEL):
        return (MODEL, None) if has_own else (FALLBACK, template_text(FALLBACK))
    if choice in NAMED:
        return choice, template_text(choice)
    p = Path(choice).expanduser()
    if p.suffix in (".jinja", ".j2", ".txt") or p.exists():
        if not p.is_file():
            raise MacftError(f"--chat-template {choice}: no such file.",
                             f"Give a .jinja file, or one of: {', '.join([MODEL, *NAMED])}.")
        return str(p.resolve()), p.read_text(encoding="utf-8")
    raise MacftError(f"--chat-template {choice} is neither a known template nor a file.",
                     f"Use one of: {', '.join([MODEL, *NAMED])}, or a path to a .jinja file.")


def suggest(model_name: str, model_type: str, tokenizer: Any) -> str | None:
    """The named template a model without a chat template was most likely trained with."""
    if getattr(tokenizer, "chat_template", None):
        return None
    name = model_name.lower()
    if "rinna" in name:
        return "rinna"
    if "alpaca" in name:
        return "alpaca"
    if model_type == "llama" and ("chat" in name or "instruct" in name or "elyza" in name):
        return "llama2"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|im_start|>" in vocab:
        return "chatml"
    if "<start_of_turn>" in vocab:
        return "gemma3"
    return None


def renderer_for(tokenizer: Any, loss_on: str, choice: str | None) -> Any:
    """The :class:`~macft.data.render.Renderer` for ``--chat-template choice``."""
    from .render import Renderer

    name, text = resolve(choice, tokenizer)
    return Renderer(tokenizer, loss_on, template=text, template_name=name)
