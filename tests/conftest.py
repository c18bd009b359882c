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

if preload_fast_blas():
    # With OpenBLAS in the process, torch's own intra-op threads oversubscribe the 2 cores
    # around OpenBLAS's threads (measured: a tiny-model step 101 ms -> 295 ms); one torch
    # thread brings it back to 107 ms while matmuls still use OpenBLAS's threads.
    import torch

    torch.set_num_threads(1)
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


@pytest.fixture
def one_torch_thread():
    """One torch thread (conftest may preload OpenBLAS for MLX) and no denormals (random-init
    models make many; they are 10-100x slower on x86)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(n)


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


MLX_TRAIN_ARGS = ["--backend", "mlx", "--batch-size", "4", "--learning-rate", "3e-3", "--log-every", "5",
                  "--seed", "0"]


@pytest.fixture(scope="session")
def mlx_run(tiny_gemma, tmp_path_factory):
    """The tiny Gemma-3 trained with MLX for 150 steps on the nya chat data (about 35 s)."""
    from macft.cli import main

    out = tmp_path_factory.mktemp("mlx") / "run"
    rc = main(["train", "--model", str(tiny_gemma), "--data", str(NYA), "--output", str(out),
               "--iters", "150", "--eval-every", "50", "--save-every", "50", *MLX_TRAIN_ARGS])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def general_gemma(tiny_gemma, tmp_path_factory) -> Path:
    """The tiny Gemma-3 after a short full fine-tune on examples/data/general (plain answers):
    a base with some "knowledge" to keep, for before/after and forgetting tests."""
    from macft.tiny import pretrain

    return pretrain(tiny_gemma, DATA / "general" / "train.jsonl", tmp_path_factory.mktemp("general-gemma3"))


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


# --------------------------------------------------------------------------- export fixtures
# (export/ and tests/test_export*.py; the llama.cpp build is the pinned one `macft setup
# llama-cpp` caches, built here if CI has not built it yet.)


@pytest.fixture(scope="session")
def llama_tools():
    """The pinned llama.cpp tools (built once per machine; idempotent)."""
    from export.llama_cpp import ensure_built

    return ensure_built()


@pytest.fixture(scope="session")
def gemma_trained_adapter(tiny_gemma, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter trained briefly (peft, CPU) on the nya data: the tiny model then
    answers in the data's style and ends its turns with <end_of_turn>."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("gemma-adapter") / "adapter"
    # In a fresh process: the OpenBLAS that this one preloads for MLX (above) competes with
    # torch's threads and makes this training about 3x slower (measured: 63 s instead of 21 s).
    code = ("import sys; from pathlib import Path; from export.fixtures import train_adapter; "
            "train_adapter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), steps=120, lr=3e-3)")
    subprocess.run([sys.executable, "-c", code, str(tiny_gemma), str(NYA / "train.jsonl"), str(out)],
                   check=True, cwd=REPO)
    return out


@pytest.fixture(scope="session")
def gemma_run(tiny_gemma, gemma_trained_adapter, tmp_path_factory) -> Path:
    """A hand-written run directory (config.yaml + resolved, adapter/, metrics.jsonl)."""
    from export.fixtures import write_run_dir

    return write_run_dir(tmp_path_factory.mktemp("runs") / "nya-gemma", tiny_gemma, gemma_trained_adapter, NYA)


@pytest.fixture(scope="session")
def tiny_qwen2(llama_tools, tmp_path_factory) -> Path:
    """A tiny Qwen2 with GPT-2's byte-level BPE vocabulary (from the pinned llama.cpp source)
    plus ChatML tokens.

    transformers 5 loads every qwen2 tokenizer as Qwen2Tokenizer (Qwen's regex + NFC), so
    llama.cpp's converter cannot identify this one's pre-tokenizer: it trains, it does not
    export (tests/test_export_errors.py). Exports use tiny_qwen2_qwen_vocab.
    """
    from export.llama_cpp import source_dir
    from macft.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), source_dir() / "models" / "ggml-vocab-gpt-2.gguf")


@pytest.fixture(scope="session")
def tiny_qwen2_qwen_vocab(llama_tools, tmp_path_factory) -> Path:
    """A tiny Qwen2 with Qwen2's own vocabulary (151,936 tokens, 88 MB): llama.cpp's converter
    recognises its pre-tokenizer as "qwen2", so it exports."""
    from export.llama_cpp import source_dir
    from macft.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-qwen"), source_dir() / "models" / "ggml-vocab-qwen2.gguf")
