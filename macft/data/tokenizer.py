"""Load the model's tokenizer with errors that say what is missing and how to fix it.

This module imports ``transformers`` (for ``AutoTokenizer`` and its
``apply_chat_template``) but neither torch nor mlx itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MacftError
from ..models import resolve_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "tokenizer.tiktoken")


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    path = resolve_model_path(model, revision=revision, tokenizer_only=True)
    present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not present or present == ["tokenizer_config.json"]:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise MacftError(
            f"{path} has no tokenizer: none of {', '.join(TOKENIZER_FILES[:3])} is there "
            f"(found: {', '.join(found) or 'nothing'}).",
            "Copy the tokenizer files of the base model into this directory "
            "(tokenizer.json and tokenizer_config.json, plus tokenizer.model for SentencePiece models).")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MacftError("The 'transformers' package is missing.", "pip install 'transformers>=4.51'") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise _explain(path, e) from None
    if tok.pad_token_id is None:
        # Padding never reaches the loss (masked), but generation and batching need an id.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _explain(path: Path, e: Exception) -> MacftError:
    msg = str(e)
    low = msg.lower()
    if "sentencepiece" in low:
        return MacftError(f"Loading the tokenizer of {path} needs the 'sentencepiece' package: {msg.splitlines()[0]}",
                          "pip install sentencepiece protobuf")
    if "protobuf" in low or "tiktoken" in low:
        return MacftError(f"Loading the tokenizer of {path} needs the 'protobuf' package: {msg.splitlines()[0]}",
                          "pip install protobuf sentencepiece")
    return MacftError(f"Could not load the tokenizer of {path}: {msg.splitlines()[0] if msg else type(e).__name__}",
                      "Check that the tokenizer files belong to this model and are complete.")
