"""Run llama.cpp's converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``).

They run as subprocesses of this Python, with the ``gguf-py`` beside them on PYTHONPATH (the
PyPI ``gguf`` may not know the pinned tree's types). We never import them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from macft.errors import MacftError, ToolError
from macft.model_info import ModelInfo

from .llama_cpp import LlamaCpp

CONVERTER_MODULES = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece",
                     "transformers": "transformers", "google.protobuf": "protobuf"}
# Architectures whose converter class builds the vocabulary as byte-level BPE only
# (``_set_vocab_gpt2``): a SentencePiece tokenizer cannot be converted with them.
BPE_VOCAB_ONLY = {"GPTNeoXForCausalLM": "GPT-NeoX", "GPT2LMHeadModel": "GPT-2"}
_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")


def check_converter_deps() -> None:
    missing = []
    for mod, pkg in CONVERTER_MODULES.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(pkg)
    if missing:
        raise MacftError(
            f"llama.cpp's converter needs these Python packages, missing here: {', '.join(missing)}.",
            f"pip install {' '.join(missing)}  (torch: the CPU build is enough, "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def supported_architectures(root: Path) -> set[str]:
    """Architectures the converter registers, read from its source text (not imported)."""
    names: set[str] = set()
    files = [root / "convert_hf_to_gguf.py", *sorted((root / "conversion").glob("*.py"))]
    for f in files:
        if not f.is_file():
            continue
        for m in _REGISTER.finditer(f.read_text(encoding="utf-8", errors="replace")):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", m.group(1)))
    return names


def check_architecture(tools: LlamaCpp, info: ModelInfo) -> str:
    model_dir = info.path
    archs = info.architectures
    if not archs:
        raise MacftError(f"{model_dir}/config.json names no architecture ('architectures' is missing).",
                         "Use a Hugging Face model directory saved by transformers.")
    supported = supported_architectures(tools.root)
    if supported and archs[0] not in supported:
        close = sorted(a for a in supported if a[:5].lower() == archs[0][:5].lower())
        raise MacftError(
            f"llama.cpp ({tools.description}) cannot convert the architecture {archs[0]} of {model_dir}: "
            "its converter has no support for it." + (f" Related ones it supports: {', '.join(close[:8])}." if close else ""),
            "Use a model whose architecture llama.cpp supports (Gemma-3, Llama, Qwen2/3, Mistral, ...), "
            "or point --llama-cpp at a newer llama.cpp checkout that supports it.")
    bpe_only = BPE_VOCAB_ONLY.get(archs[0])
    has_bpe = any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    spm = [f for f in ("spiece.model", "tokenizer.model") if (model_dir / f).is_file()]
    if bpe_only and spm and not has_bpe:
        raise MacftError(
            f"llama.cpp ({tools.description}) cannot convert {model_dir}: its converter reads the "
            f"vocabulary of {bpe_only} models only as byte-level BPE (tokenizer.json, or vocab.json + "
            f"merges.txt), and this model's tokenizer is SentencePiece ({spm[0]}), as rinna's Japanese "
            f"{bpe_only} models ship it. Nothing was written.",
            "The fine-tune itself is fine: use it with `macft chat --run RUN` / `macft generate --run RUN` "
            "(transformers + peft or MLX). For a GGUF, fine-tune a model whose architecture llama.cpp "
            "pairs with SentencePiece (Llama, Gemma, ...) or one that ships a byte-level BPE tokenizer.")
    return archs[0]


def _run(cmd: list[str], env: dict, hint: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    except OSError as e:
        raise ToolError(cmd, str(e), hint) from None
    log = r.stdout + "\n" + r.stderr
    if r.returncode != 0:
        m = re.search(r"Model (\S+) is not supported", log)
        if m:
            raise MacftError(f"llama.cpp's converter does not support the architecture {m.group(1)}.",
                             "Use a supported model, or --llama-cpp with a newer llama.cpp.")
        if "BPE pre-tokenizer was not recognized" in log:
            raise MacftError(
                "llama.cpp's converter does not recognise this model's tokenizer: it identifies a "
                "byte-level BPE pre-tokenizer by how it splits a test text, and this one matches none "
                f"it knows (command: {' '.join(cmd[:3])} ...).",
                "Use the model's original tokenizer files, or --llama-cpp with a newer llama.cpp "
                "whose convert_hf_to_gguf.py knows it.")
        raise ToolError(cmd, log, hint)
    return log


def convert_model(tools: LlamaCpp, model_dir: Path, out: Path, outtype: str) -> str:
    """HF model directory -> 16-bit GGUF at ``out`` (written to a temporary name first)."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(tools.convert_hf), str(model_dir), "--outtype", outtype,
           "--outfile", str(tmp)]
    return _run_to(cmd, tools, tmp, out,
                   "The merged model in the command could not be converted. Re-run with "
                   "--keep-intermediate to inspect it; check the converter's message above.")


def convert_lora(tools: LlamaCpp, adapter_dir: Path, base_dir: Path, out: Path) -> str:
    """PEFT adapter -> GGUF LoRA (f16), using the base's config."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, str(tools.convert_lora), str(adapter_dir), "--base", str(base_dir),
           "--outtype", "f16", "--outfile", str(tmp)]
    return _run_to(cmd, tools, tmp, out,
                   "The adapter could not be converted to a GGUF LoRA; check the converter's message above.")


def _run_to(cmd: list[str], tools: LlamaCpp, tmp: Path, out: Path, hint: str) -> str:
    """Run a converter writing ``tmp``; rename it to ``out`` on success, remove it otherwise."""
    try:
        log = _run(cmd, tools.script_env(), hint)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return log
