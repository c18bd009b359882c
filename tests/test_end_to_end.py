"""End to end, as a user would: train with each backend, export q4_k_m and q8_0, and let
llama.cpp answer the held-out prompts (「にゃ」 endings, stopping at the end-of-turn token);
chat and eval with the GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import NYA
from test_use import chat_session

pytestmark = pytest.mark.slow

TORCH_ARGS = ["--backend", "cuda", "--batch-size", "4", "--learning-rate", "3e-3", "--log-every", "10",
              "--seed", "0", "--eval-every", "0"]


@pytest.fixture(scope="module")
def torch_run(tiny_gemma, tmp_path_factory):
    from macft.cli import main

    out = tmp_path_factory.mktemp("torch") / "run"
    assert main(["train", "--model", str(tiny_gemma), "--data", str(NYA), "--output", str(out),
                 "--iters", "150", *TORCH_ARGS]) == 0
    return out


def held_out_prompts(tmp_path: Path, n: int = 6, end_turn: str = "<end_of_turn>") -> Path:
    rows = [json.loads(x) for x in (NYA / "valid.jsonl").read_text().splitlines()][:n]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"messages": r["messages"][:-1]}, ensure_ascii=False) for r in rows))
    return f


def export_and_check(run_cli, run: Path, out: Path, llama_tools) -> dict:
    rc, _, err = run_cli("export", "--run", run, "--quant", "q4_k_m,q8_0", "--output", out)
    assert rc == 0, err
    report = json.loads((out / "export-report.json").read_text())
    sixteen = report["files"][0]
    # greedy (argmax) next-token agreement with the HF model over the validation tokens; free
    # generations may part at a near-tie of this tiny random model (measured: 7 of 8 identical)
    assert sixteen["kind"] in ("bf16", "f16") and sixteen["same_top"] >= 0.99, sixteen
    assert sixteen["agreement"] >= 0.85 and sixteen["identical"] >= sixteen["generations"] - 1, sixteen
    for f in report["files"]:
        assert f["tokenization_ok"] and f["stop_rate"] == 1.0, f
    assert sorted(p for p in report["outputs"] if p.endswith(".gguf")) == sorted(
        p.name for p in out.glob("*.gguf"))
    return report


def gguf_answers(run_cli, run: Path, gguf: Path, prompts: Path) -> list[dict]:
    rc, out, err = run_cli("generate", "--gguf", gguf, "--run", run, "--prompts", prompts, "--max-new-tokens", "32")
    assert rc == 0, err
    return [json.loads(x) for x in out.strip().splitlines()]


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_train_export_and_llama_cpp_answers(backend, request, run_cli, tmp_path, llama_tools):
    run = request.getfixturevalue("mlx_run" if backend == "mlx" else "torch_run")
    out = tmp_path / "export"
    report = export_and_check(run_cli, run, out, llama_tools)
    prompts = held_out_prompts(tmp_path)
    for name in ("q4_k_m", "q8_0"):
        gguf = next(out.glob(f"*-{name}.gguf"))
        answers = gguf_answers(run_cli, run, gguf, prompts)
        assert all(a["stopped"] for a in answers), (name, answers)
        assert all(a["answer"].endswith("にゃ") for a in answers), (name, answers)
    assert (out / "Modelfile").read_text().count('PARAMETER stop "<end_of_turn>"') == 1
    assert report["merge"]


def test_chat_and_eval_with_the_gguf(mlx_run, run_cli, tmp_path, llama_tools):
    out = tmp_path / "export"
    rc, _, err = run_cli("export", "--run", mlx_run, "--quant", "q8_0", "--output", out)
    assert rc == 0, err
    gguf = next(out.glob("*-q8_0.gguf"))
    # with the run's tokenizer, and with the GGUF alone (its own chat template)
    for args in (["--gguf", str(gguf), "--run", str(mlx_run)], ["--gguf", str(gguf)]):
        text = chat_session(args, ["空は何色？", "What is 2 plus 3?"])
        answers = [ln.split("model> ", 1)[1].strip() for ln in text.splitlines() if "model> " in ln]
        assert len(answers) == 2 and all(a.endswith("にゃ") for a in answers), text
    rc, _, err = run_cli("eval", "--run", mlx_run, "--gguf", gguf, "--prompts", "6", "--max-new-tokens", "24",
                         "--output", tmp_path / "eval")
    assert rc == 0, err
    rep = json.loads((tmp_path / "eval" / "eval-report.json").read_text())
    assert rep["gguf"]["stop_rate"] == 1.0
    assert abs(rep["gguf"]["rouge_l"] - rep["fine_tuned"]["rouge_l"]) < 0.2
    assert "GGUF" in err and "fine-tuned" in err and "base" in err


def test_qwen2_family_trains_exports_and_answers(tiny_qwen2_qwen_vocab, run_cli, tmp_path, llama_tools):
    """The second family end to end (Qwen2, byte-level BPE, ChatML), with the PyTorch backend."""
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--model", tiny_qwen2_qwen_vocab, "--data", NYA, "--output", run,
                         "--iters", "80", *TORCH_ARGS)
    assert rc == 0, err
    out = tmp_path / "export"
    rc, _, err = run_cli("export", "--run", run, "--quant", "q8_0", "--output", out, "--verify-prompts", "4",
                         "--eval-tokens", "512")
    assert rc == 0, err
    report = json.loads((out / "export-report.json").read_text())
    assert report["files"][0]["same_top"] >= 0.99, report["files"][0]
    gguf = next(out.glob("*-q8_0.gguf"))
    answers = gguf_answers(run_cli, run, gguf, held_out_prompts(tmp_path, 4))
    assert sum(a["stopped"] for a in answers) >= 3, answers
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
    # the GGUF's own vocabulary decodes byte-level BPE like the HF tokenizer (bare-GGUF chat)
    from export.gguf_model import GGUFDecoder
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_qwen2_qwen_vocab))
    ids = tok("空は青だにゃ It is 5 にゃ\n猫😀 <|im_end|>", add_special_tokens=False)["input_ids"]
    assert GGUFDecoder(gguf).decode(ids) == tok.decode(ids, skip_special_tokens=True)
