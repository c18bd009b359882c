"""Find a base model on disk or on the Hugging Face hub.

Light on purpose: no torch, no mlx. Backends call :func:`resolve_model_path`
and then load the weights their own way; the config is read by :mod:`macft.model_info`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MacftError

# spiece.model: T5Tokenizer-style SentencePiece (rinna); *.txt: merges.txt of GPT-2 style BPE
TOKENIZER_PATTERNS = ["*.json", "tokenizer.model", "spiece.model", "*.jinja", "*.txt", "*.tiktoken"]
MODEL_PATTERNS = TOKENIZER_PATTERNS + ["*.safetensors", "*.safetensors.index.json"]


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_path(name: str, revision: str | None = None, tokenizer_only: bool = False) -> Path:
    """A local directory as is, or a hub id downloaded (or found in the HF cache)."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MacftError(f"Model path {p} is a file; expected a model directory.",
                             "Pass the directory that holds config.json and the *.safetensors files.")
        return p.resolve()
    if not is_hub_id(name):
        raise MacftError(f"Model {name} does not exist: it is neither a local directory nor a "
                         "Hugging Face hub id (owner/name).",
                         "Check the path, or give a hub id such as google/gemma-3-1b-it.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MacftError("Downloading from the hub needs 'huggingface_hub'.", "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(
            name, revision=revision,
            allow_patterns=TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        gated = "gated" in str(e).lower() or "401" in str(e) or "403" in str(e)
        hint = ("Accept the model's licence on huggingface.co and run `huggingface-cli login`."
                if gated else "Check the id and your network, or download the model and pass its directory.")
        if os.environ.get("HF_HUB_OFFLINE"):
            hint = "HF_HUB_OFFLINE is set: download the model first or pass a local directory."
        raise MacftError(f"Could not get model '{name}' from the Hugging Face hub: {first}", hint) from None
