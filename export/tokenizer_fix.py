"""Make the merged model's tokenizer files say what llama.cpp's converter needs to know.

1. Special tokens keep their type. Tokenizers saved by transformers 5 no longer write
   ``added_tokens_decoder`` into ``tokenizer_config.json``. For SentencePiece models
   (Gemma) the converter reads token types from there; without it ``<start_of_turn>`` and
   ``<end_of_turn>`` become plain text, which llama.cpp then splits into characters. The
   entries are restored from ``tokenizer.json``'s ``added_tokens``.
2. A run trained with macft's fallback chat template gets that template written into
   ``tokenizer_config.json`` (the converter prefers it there), so the GGUF carries it.

Only the merged copy is changed, never the user's base model.
"""

from __future__ import annotations

import json
from pathlib import Path

from macft.errors import MacftError

DECODER_KEYS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def _read(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MacftError(f"{p} is not valid JSON: {e}", "Restore the base model's tokenizer files.") from None


def restore_added_tokens(model_dir: Path) -> list[str]:
    """Add every ``tokenizer.json`` added token missing from ``added_tokens_decoder``.

    Returns the contents of the tokens added (empty when nothing was missing).
    """
    tj, tc = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    if not tj.is_file():
        return []
    added = _read(tj).get("added_tokens") or []
    cfg = _read(tc) if tc.is_file() else {}
    decoder = dict(cfg.get("added_tokens_decoder") or {})
    restored = []
    for tok in added:
        key = str(tok["id"])
        if key in decoder:
            continue
        decoder[key] = {k: tok.get(k, False) for k in DECODER_KEYS}
        restored.append(tok["content"])
    if restored:
        cfg["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return restored


def write_chat_template(model_dir: Path, template: str) -> None:
    tc = model_dir / "tokenizer_config.json"
    cfg = _read(tc) if tc.is_file() else {}
    cfg["chat_template"] = template
    tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    for name in ("chat_template.jinja", "chat_template.json"):  # these win over tokenizer_config's
        (model_dir / name).unlink(missing_ok=True)


def fix_tokenizer(model_dir: Path, fallback_template: str | None, restore: bool = True) -> list[str]:
    """Apply both fixes to ``model_dir``; returns notes for the report."""
    notes = []
    if restore:
        restored = restore_added_tokens(model_dir)
        if restored:
            shown = ", ".join(restored[:6]) + (" ..." if len(restored) > 6 else "")
            notes.append(f"restored added_tokens_decoder for {len(restored)} token(s) ({shown}) "
                         "so special tokens stay special in the GGUF")
    if fallback_template:
        write_chat_template(model_dir, fallback_template)
        notes.append("wrote the chat template the run trained with (the model ships none, or the run "
                     "chose another) into tokenizer_config.json")
    return notes
