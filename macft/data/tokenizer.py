"""Load the model's tokenizer with errors that say what is missing and how to fix it.

This module imports ``transformers`` (for ``AutoTokenizer`` and its
``apply_chat_template``) but neither torch nor mlx itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MacftError
from ..models import resolve_model_path

# The files that hold a vocabulary, in any of the layouts models are published in:
# tokenizer.json (fast tokenizers), tokenizer.model (Llama / Gemma SentencePiece), spiece.model
# (T5Tokenizer-style SentencePiece, e.g. rinna), sentencepiece.bpe.model (XLM-R style),
# vocab.json + merges.txt (GPT-2 style byte-level BPE), tokenizer.tiktoken.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
               "tokenizer.tiktoken")


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    path = resolve_model_path(model, revision=revision, tokenizer_only=True)
    present = [f for f in VOCAB_FILES if (path / f).is_file()]
    if not present:
        found = sorted(p.name for p in path.iterdir())
        shown = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
        raise MacftError(
            f"{path} has no tokenizer vocabulary: none of {', '.join(VOCAB_FILES)} is there "
            f"(found: {shown or 'nothing'}).",
            "Copy the tokenizer files of the base model into this directory (every tokenizer* file, "
            "plus spiece.model / tokenizer.model or vocab.json + merges.txt, whichever it has).")
    if present == ["vocab.json"] and not (path / "merges.txt").is_file():
        raise MacftError(f"{path} has vocab.json but no merges.txt: a byte-level BPE tokenizer needs both.",
                         "Copy merges.txt from the base model's repository into this directory.")
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
