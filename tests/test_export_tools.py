"""The pinned llama.cpp (source, build flags, backends), llama-quantize's fallback report,
llama.cpp's output formats we read, and the Ollama template derivation."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from export import llama_cpp
from export.quantize import _FALLBACK, _SUMMARY, parse_quant_types
from export.verify import encode_log_probs, parse_kld, plan_kld, read_session_tokens
from macft.errors import MacftError


def test_source_dir_is_the_pinned_tree(llama_tools):
    src = llama_cpp.source_dir()
    assert src == llama_tools.root
    for f in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py", "models/ggml-vocab-gpt-2.gguf"):
        assert (src / f).exists(), f
    assert not (src / ".git").exists()
    assert llama_cpp.PIN_VERSION == "0.3.36" and llama_cpp.PIN_BUILD == 11312
    assert "b11312" in llama_tools.description


def test_a_corrupt_sdist_is_refused_and_moved_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_CACHE_DIR", str(tmp_path))
    pin = llama_cpp.pin_dir()
    pin.mkdir(parents=True)
    (pin / llama_cpp.PIN_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(MacftError, match="SHA-256"):
        llama_cpp.source_dir()
    assert not (pin / llama_cpp.PIN_SDIST).exists() and (pin / (llama_cpp.PIN_SDIST + ".bad")).exists()


def test_backend_choice_and_cmake_flags(monkeypatch):
    monkeypatch.setenv("MACFT_LLAMA_CPP_BACKEND", "cuda")
    assert llama_cpp.detect_backend()[0] == "cuda"
    monkeypatch.setenv("MACFT_LLAMA_CPP_BACKEND", "rocm")
    with pytest.raises(MacftError, match="not a llama.cpp backend"):
        llama_cpp.detect_backend()
    monkeypatch.delenv("MACFT_LLAMA_CPP_BACKEND")
    args = llama_cpp.cmake_args(Path("src"), Path("b"), "cpu")
    for flag in ("-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_NUMBER=11312",
                 "-DGGML_CUDA=OFF"):
        assert flag in args
    assert "-DGGML_CUDA=ON" in llama_cpp.cmake_args(Path("src"), Path("b"), "cuda")
    assert "-DGGML_METAL=ON" in llama_cpp.cmake_args(Path("src"), Path("b"), "metal")
    # the build dir is keyed by version and backend
    assert "b11312-py0.3.36" in str(llama_cpp.build_dir("cpu")) and llama_cpp.build_dir("cpu").name == "build-cpu"


def test_quant_types():
    assert parse_quant_types(["Q4_K_M", "q8_0", "q4_k_m"]) == ["q4_k_m", "q8_0"]
    with pytest.raises(MacftError) as e:
        parse_quant_types(["q4_k_m", "iq2_xs", "q3"])
    assert "iq2_xs, q3" in e.value.message and "q5_k_m" in e.value.hint


def test_fallback_lines_of_llama_quantize_are_read():
    log = ("[  12/  50]            blk.0.attn_q.weight - [  128,   128,     1,     1], type =   bf16, "
           "warning: blk.0.attn_q.weight                  - ncols    128 not divisible by 256 (required for "
           "type    q4_K) -> falling back to    q5_0\n"
           "llama_model_quantize_impl: WARNING: 24 of 50 tensor(s) required fallback quantization\n")
    m = _FALLBACK.search(log)
    assert m and m["name"] == "blk.0.attn_q.weight" and m["wanted"] == "q4_K" and m["used"] == "q5_0"
    assert _SUMMARY.search(log).groups() == ("24", "50")


def test_kl_divergence_output_and_session_file_are_read(tmp_path):
    text = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
            "Δp RMS            Same top p\n"
            "   1       12.3456 ±    1.2345       0.01234 ±    0.00100       0.00456 ±    0.00012     "
            "1.234 ±  0.100 %    97.500 ±  0.500 %\n")
    r = parse_kld(text, ["llama-perplexity"])
    assert r["ppl"] == pytest.approx(12.3456) and r["same_top"] == pytest.approx(0.975)
    assert r["kld"] == pytest.approx(0.00456) and r["kld_err"] == pytest.approx(0.00012)
    # the final summary line has one more decimal: it wins when llama.cpp printed it
    r = parse_kld(text + "\n====== KL divergence statistics ======\nMean    KLD:   0.004563 ±   0.000118\n",
                  ["llama-perplexity"])
    assert r["kld"] == pytest.approx(0.004563) and r["kld_err"] == pytest.approx(0.000118)
    p = tmp_path / "s.bin"
    p.write_bytes(struct.pack("<III", 0x6767736E, 10, 3) + struct.pack("<3i", 2, 4, 5) + b"state")
    assert read_session_tokens(p) == [2, 4, 5]


def test_log_prob_encoding_matches_llama_cpp_layout():
    logits = np.array([[0.0, 1.0, 2.0, -30.0], [5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    enc = encode_log_probs(logits)
    assert enc.shape == (2, 2 * ((4 + 1) // 2) + 4)
    scale, min_lp = enc[0, :4].view(np.float32)
    lp = np.log(np.exp(logits[0]) / np.exp(logits[0]).sum())
    # dequantized like llama-perplexity does: scale * q + min_log_prob, floored 16 nats below the top
    got = scale * enc[0, 4:8].astype(np.float32) + min_lp
    np.testing.assert_allclose(got[:3], lp[:3], atol=2e-4)
    assert got[3] == pytest.approx(min_lp) and min_lp == pytest.approx(lp[2] - 16, abs=1e-4)
    assert enc[1, :2].view(np.float32)[0] == 0  # a flat row: scale 0


def test_chunks_overlap_so_every_scored_token_counts_once():
    stream = list(range(10, 1000))
    k = plan_kld(stream, add_bos=True, bos_id=2, n_vocab=1000, max_scored=10_000, max_ctx=2048)
    assert k.n_ctx == 256 and all(c[0] == 2 for c in k.chunks)
    h = k.n_ctx // 2
    scored = [t for c in k.chunks for t in c[h + 1:]]
    assert len(scored) == len(set(scored)) == k.scored  # contiguous, no token twice
    assert scored == stream[h + 1: h + 1 + len(scored)]
    assert plan_kld(stream[:20], add_bos=False, bos_id=None, n_vocab=1000, max_scored=100, max_ctx=2048) is None


def test_ollama_template_reproduces_the_chat_templates(tiny_gemma):
    from export.modelfile import assemble, check_parts, derive_parts, go_template
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer
    from macft.tiny import template

    tok = load_tokenizer(str(tiny_gemma))
    gemma = derive_parts(Renderer(tok), tok.bos_token)
    assert gemma.sys_pre is None  # Gemma folds the system prompt into the first user turn
    assert gemma.user_pre == "<start_of_turn>user\n" and gemma.asst_pre == "<start_of_turn>model\n"
    assert check_parts(Renderer(tok), gemma, tok.bos_token)
    assert "{{ $sys = .Content }}" in go_template(gemma)
    tok.chat_template = template("chatml")
    chatml = derive_parts(Renderer(tok), tok.bos_token)
    assert chatml.sys_pre == "<|im_start|>system\n" and chatml.user_suf == "<|im_end|>\n"
    assert chatml.default_system == "You are a helpful assistant."  # becomes the Modelfile's SYSTEM
    assert check_parts(Renderer(tok), chatml, tok.bos_token)
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert assemble(chatml, conv, False) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                             "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb")
