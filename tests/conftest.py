"""Shared test fixtures. Nothing is downloaded: tiny random-init models are built here.

Add fixtures at the end of this file; keep each one small and session-scoped where it
builds a model or trains.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports mlx: MLX's CPU build then uses the system OpenBLAS (11x faster).
from macft.mlx_backend.blas import preload_fast_blas

preload_fast_blas()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
NYA = DATA / "nya_chat"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def nya_dir() -> Path:
    return NYA


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    """A tiny random-init Gemma-3 (HF format) with a SentencePiece tokenizer trained on the
    nya data and Gemma 3's chat template; widths are multiples of 256."""
    from macft.tiny import build_tiny_gemma3, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny-gemma3")
    texts = corpus_from_jsonl([NYA / "train.jsonl", DATA / "general" / "train.jsonl"])
    return build_tiny_gemma3(out, texts)


@pytest.fixture
def run_cli(capsys):
    """Run `macft ...` in-process; returns (exit code, stdout, stderr)."""
    from macft.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run
