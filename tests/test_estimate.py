"""`macft estimate` and the memory check of `macft train`: the prediction against the peak a
real run measures, the refusal with settings that fit, the calibration run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, NYA

from macft.model_info import model_info_from_dict
from macft.sizing import Setting, Target, estimate, suggestions
from macft.sizing import shape_from_config as _shape

GEMMA3_1B = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
             "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}
GEMMA3_4B = {"model_type": "gemma3", "text_config": {
    "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}}
# google/gemma-3-4b-it's config.json as published: text_config holds only the keys that differ
# from Gemma3TextConfig's defaults (heads, kv heads, head_dim and vocab come from those).
GEMMA3_4B_PUBLISHED = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144, "eos_token_id": [1, 106],
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}
GPT2_PUBLISHED = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
                  "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}
RINNA_NEOX_PUBLISHED = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 2816,
                        "intermediate_size": 11264, "num_attention_heads": 22, "num_hidden_layers": 36,
                        "rotary_emb_base": 10000, "rotary_pct": 1.0, "tie_word_embeddings": False,
                        "use_parallel_residual": False, "vocab_size": 32000, "max_position_embeddings": 2048}
GB = 1e9


def shape_from_config(raw):
    return _shape(model_info_from_dict(raw))


def test_parameter_counts_of_the_published_gemma3_shapes():
    one, four = shape_from_config(GEMMA3_1B), shape_from_config(GEMMA3_4B)
    # Google's model cards: 1B (1,000M) and 4B (3.88B without the 0.42B vision encoder)
    assert 0.98e9 < one.params < 1.02e9, one.params
    assert 3.8e9 < four.params < 3.95e9, four.params
    # rank 16 on every projection of every layer
    assert one.lora_params(16, ["all-linear"], -1) == 26 * 16 * (
        (1152 + 1024) * 2 + (1152 + 256) * 2 + (1152 + 6912) * 3)
    assert one.lora_params(16, ["q_proj", "v_proj"], 4) == 4 * 16 * ((1152 + 1024) + (1152 + 256))


def test_published_sparse_and_old_style_configs_give_the_real_shapes():
    """Read through transformers' config classes: the hub's sparse Gemma-3 4B config, GPT-2's
    n_embd / n_head / n_layer and GPT-NeoX's transformers-4.26 keys."""
    four = shape_from_config(GEMMA3_4B_PUBLISHED)
    assert (four.heads, four.kv_heads, four.head_dim, four.vocab) == (8, 4, 256, 262208)
    assert four.params == shape_from_config(GEMMA3_4B).params
    gpt2 = shape_from_config(GPT2_PUBLISHED)
    assert (gpt2.hidden, gpt2.layers, gpt2.heads, gpt2.intermediate) == (768, 12, 12, 3072)
    assert 123e6 < gpt2.params < 125e6, gpt2.params  # GPT-2 small: 124M
    assert [b.name for b in gpt2.linears] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert gpt2.lora_params(8, ["c_proj"], -1) == 12 * 8 * ((768 + 768) + (3072 + 768))
    neox = shape_from_config(RINNA_NEOX_PUBLISHED)
    assert 3.5e9 < neox.params < 3.7e9, neox.params  # rinna's 3.6B
    assert not neox.tied and neox.lora_params(4, ["all-linear"], -1) == 36 * 4 * (
        (2816 + 3 * 2816) + 2 * 2816 + 2 * (2816 + 11264))


def test_quantization_checkpointing_and_batch_move_the_parts_the_right_way():
    shape = shape_from_config(GEMMA3_1B)
    mac = Target("mlx", "metal", 2, int(16 * GB), "test")
    base = estimate(shape, mac, Setting(batch=4, seq_len=1024))
    q4 = estimate(shape, mac, Setting(batch=4, seq_len=1024, quantize="4bit"))
    ck = estimate(shape, mac, Setting(batch=4, seq_len=1024, grad_checkpoint=True))
    small = estimate(shape, mac, Setting(batch=1, seq_len=1024))
    assert q4.parts["weights"] < 0.35 * base.parts["weights"]
    assert ck.parts["activations"] < 0.3 * base.parts["activations"]
    assert small.parts["activations"] * 4 == pytest.approx(base.parts["activations"], rel=1e-6)
    assert 1.9 * GB < base.parts["weights"] < 2.1 * GB


@pytest.mark.parametrize("backend,device", [("mlx", "metal"), ("cuda", "gpu")])
def test_the_logits_part_is_bounded_by_the_chunk_not_the_vocabulary(backend, device):
    """Both engines run the output layer over trained tokens only, in chunks: at Gemma-3's
    262k vocabulary the logits part of a 4 x 1024 batch is a few chunks plus the gathered
    hidden states, not 4096 x 262144 fp32 values (4.3 GB per copy)."""
    from macft.sizing.memory import COEFFICIENTS
    from macft.training.chunking import chunk_rows

    shape = shape_from_config(GEMMA3_1B)
    t = Target(backend, device, 2, int(16 * GB), "test")
    full = estimate(shape, t, Setting(batch=4, seq_len=1024)).parts["logits"]
    assert full < 0.25 * 4096 * shape.vocab * 4
    few = estimate(shape, t, Setting(batch=4, seq_len=1024, trained_tokens=100)).parts["logits"]
    assert few < full and few >= 100 * shape.vocab * 4  # 100 rows: one partial chunk
    # the chunk, not the batch, bounds it: twice the tokens add only their hidden states
    double = estimate(shape, t, Setting(batch=8, seq_len=1024)).parts["logits"]
    copies = COEFFICIENTS[t.key].row_copies
    assert double - full == pytest.approx(4096 * shape.hidden * 4 * copies, abs=8)
    lwf = estimate(shape, t, Setting(batch=4, seq_len=1024, trained_tokens=100, distill=True)).parts["logits"]
    assert lwf == 2 * full  # every real token, and the base model's pass too
    assert chunk_rows(shape.vocab) == 64


def test_suggestions_fit_and_keep_the_effective_batch():
    shape = shape_from_config(GEMMA3_4B)
    mac = Target("mlx", "metal", 2, int(16 * GB), "Metal's recommended working set")
    s = Setting(batch=8, seq_len=2048, grad_accum=2)
    assert not estimate(shape, mac, s).fits
    fixes = suggestions(shape, mac, s)
    assert fixes, "a 4B model trains in 16 GB with the right settings"
    for words, e in fixes:
        assert e.fits and e.total <= mac.budget
        if "--batch-size" in words:
            bs = int(words.split("--batch-size ")[1].split()[0])
            accum = int(words.split("--grad-accum ")[1].split()[0])
            assert bs * accum == 16, words


def _long_texts(path: Path) -> Path:
    """Plain texts cut at --max-seq-len: every row of every batch is full, so activations and
    logits, not the libraries, make up most of the peak (as in real runs)."""
    rows = [json.loads(x) for x in (DATA / "general" / "train.jsonl").read_text().splitlines() if x.strip()]
    texts = [" ".join(m["content"] for m in r["messages"]) for r in rows]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(48):
            f.write(json.dumps({"text": " ".join(texts[(i * 7 + k) % len(texts)] for k in range(40))},
                               ensure_ascii=False) + "\n")
    return path


def _measure(model: Path, backend: str, work: Path, *extra: str) -> tuple[float, float]:
    """(predicted, measured) peak in GB for a short real run, in fresh processes."""
    flags = ["--model", str(model), "--data", str(_long_texts(work / "long.jsonl")), "--backend", backend,
             "--batch-size", "8", "--max-seq-len", "256", "--valid-fraction", "0.05", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    est = subprocess.run([sys.executable, "-m", "macft", "estimate", *flags, "--calibrate-steps", "0", "--json"],
                         capture_output=True, text=True, env=env)
    assert est.returncode == 0, est.stderr
    predicted = json.loads(est.stdout)["total_bytes"] / GB
    out = work / "run"
    tr = subprocess.run([sys.executable, "-m", "macft", "train", *flags, "--iters", "2", "--eval-every", "0",
                         "--output", str(out)], capture_output=True, text=True, env=env)
    assert tr.returncode == 0, tr.stderr
    measured = json.loads((out / "summary.json").read_text())["peak_memory_gb"]
    return predicted, measured


@pytest.mark.slow
@pytest.mark.parametrize("backend,extra", [("mlx", ()), ("mlx", ("--grad-checkpoint",)), ("cuda", ()),
                                           ("cuda", ("--quantize", "4bit"))])
def test_estimate_is_within_15_percent_of_the_measured_peak(tiny_gemma, tmp_path, backend, extra):
    predicted, measured = _measure(tiny_gemma, backend, tmp_path, *extra)
    print(f"{backend} {' '.join(extra)}: predicted {predicted:.3f} GB, measured {measured:.3f} GB")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_train_refuses_a_run_that_cannot_fit_and_says_what_would(tiny_gemma, run_cli, tmp_path, monkeypatch):
    # between the estimate with checkpointing and without it
    monkeypatch.setenv("MACFT_MLX_MEMORY_LIMIT_GB", "0.09")
    args = ["--model", tiny_gemma, "--data", NYA, "--backend", "mlx", "--batch-size", "32", "--iters", "1",
            "--eval-every", "0", "--output", tmp_path / "run"]
    rc, _, err = run_cli("train", *args)
    assert rc == 2
    assert "at its peak" in err and "Settings that fit" in err and "--force" in err, err
    assert not (tmp_path / "run").exists()
    rc, out, err = run_cli("estimate", *args[:-2], "--calibrate-steps", "0", "--json")
    assert rc == 1
    rep = json.loads(out)
    assert not rep["fits"] and rep["suggestions"]
    fix = rep["suggestions"][0]["flags"].split()
    # the first suggestion really trains within the budget
    rc, _, err = run_cli("train", *args, *fix)
    assert rc == 0, err


def test_estimate_times_an_epoch_with_a_calibration_run(tiny_gemma, run_cli):
    rc, out, err = run_cli("estimate", "--model", tiny_gemma, "--data", NYA, "--backend", "mlx",
                           "--calibrate-steps", "3", "--json")
    assert rc == 0, err
    cal = json.loads(out)["calibration"]
    assert cal["tokens_per_sec"] > 0 and cal["epoch_seconds"] > 0
    assert cal["epoch_trained_tokens"] > 1000
    assert "Time per epoch" in err
