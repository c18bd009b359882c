"""Benchmark: `macft train --backend cuda` against the recipe people use today, in one run.

    python bench/torch_vs_hf_trainer.py [--model DIR] [--steps 120] [--max-length 256] [--quantize none|4bit]

macft runs twice: with its default length-grouped batches, and with ``--packing``
(batches in plain random order, packed padding-free).

"Today's recipe" is the widely copied QLoRA notebook: transformers ``Trainer`` + peft
LoRA, every example tokenized with ``padding="max_length"`` to a fixed length, the
default data collator. Both arms use the same model (a tiny random-init Gemma-3 built
from the nya data unless ``--model`` is given), the same rendered examples and loss
masks (assistant tokens only, through macft's renderer: only the padding differs), LoRA
rank 16 / alpha 32 / dropout 0.05 on every attention and MLP projection, batch size 4,
no accumulation, the same number of optimizer steps, AdamW (torch's fp32 one on the CPU;
bitsandbytes 8-bit with --quantize 4bit, as macft uses there), learning rate 2e-3 with
5% warm-up and cosine decay, gradient clipping at 1.0, fp32 on the CPU, seed 0.

Each arm runs in its own process (so peak memory is that process's own). Measured:

- trained tokens/s: loss-mask tokens per second of training time (macft: its train
  report over all steps, evaluation excluded; Trainer: trained tokens / ``train_runtime``)
- peak memory: the process's peak RSS on the CPU (``ru_maxrss``; macft reads VmHWM, the same here),
  ``torch.cuda.max_memory_allocated`` on a GPU
- final validation loss: mean cross-entropy per trained token over the whole validation
  set, computed the same way for both (macft's own evaluation; for Trainer the final model
  is evaluated with macft's loss function on macft's validation batches)

Run it under the heavy-job lock on shared machines:
``flock /tmp/macft-heavy.lock python bench/torch_vs_hf_trainer.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "nya_chat"
SEED = 0
BATCH = 4
LR = 2e-3
WARMUP = 0.05
RANK, ALPHA, DROPOUT = 16, 32.0, 0.05
MAX_SEQ_LEN = 2048  # macft's own limit (no example here comes close)


def build_model(root: Path) -> Path:
    from macft.tiny import build_tiny_gemma3, corpus_from_jsonl

    out = root / "tiny-gemma3"
    if not (out / "model.safetensors").exists():
        build_tiny_gemma3(out, corpus_from_jsonl([DATA / "train.jsonl", DATA / "valid.jsonl"]))
    return out


def run_macft(model: Path, steps: int, quantize: str, work: Path, packing: bool = False) -> dict:
    run = work / ("macft_packed" if packing else "macft_run")
    cmd = [sys.executable, "-m", "macft", "train", "--backend", "cuda", "--model", str(model),
           "--data", str(DATA), "--output", str(run), "--iters", str(steps),
           "--batch-size", str(BATCH), "--grad-accum", "1", "--learning-rate", str(LR),
           "--warmup-ratio", str(WARMUP), "--schedule", "cosine", "--max-grad-norm", "1.0",
           "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", str(DROPOUT),
           "--lora-targets", "all-linear", "--seed", str(SEED), "--precision", "auto",
           "--quantize", quantize, "--max-seq-len", str(MAX_SEQ_LEN),
           "--eval-every", "0", "--save-every", "0", "--log-every", str(steps),
           "--packing" if packing else "--no-packing"]
    env = {**os.environ, "MACFT_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"macft failed:\n{p.stderr[-4000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["type"] == "train"][-1]
    summary = json.loads((run / "summary.json").read_text())
    return {"tokens_per_sec": train["tokens_per_sec"], "trained_tokens": summary["trained_tokens"],
            "peak_memory_gb": summary["peak_memory_gb"], "final_val_loss": summary["final_val_loss"],
            "train_seconds": train["trained_tokens"] / train["tokens_per_sec"], "wall_seconds": wall,
            "padding_share": None}


def run_hf(model: Path, steps: int, quantize: str, max_length: int, work: Path) -> dict:
    out = work / "hf.json"
    cmd = [sys.executable, __file__, "--_hf-arm", str(out), "--model", str(model), "--steps", str(steps),
           "--quantize", quantize, "--max-length", str(max_length)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"Trainer arm failed:\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- the Trainer arm


def hf_arm(model_dir: Path, steps: int, quantize: str, max_length: int, out: Path) -> None:
    """transformers Trainer + peft, padded to max_length (runs in its own process)."""
    import resource

    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from cuda_backend.engine import batch_loss
    from macft.data.batching import eval_batches
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    set_seed(SEED)
    tok = load_tokenizer(str(model_dir))
    data = build_data(str(DATA), None, Renderer(tok), max_seq_len=MAX_SEQ_LEN, seed=SEED)
    pad = tok.pad_token_id

    def padded(e):  # the notebook recipe: every row padded to max_length
        ids = e.ids[:max_length].astype(np.int64)
        labels = np.where(e.mask[:max_length] > 0, ids, -100)
        labels[0] = -100
        n = len(ids)
        return {"input_ids": np.pad(ids, (0, max_length - n), constant_values=pad).tolist(),
                "attention_mask": [1] * n + [0] * (max_length - n),
                "labels": np.pad(labels, (0, max_length - n), constant_values=-100).tolist()}

    train_ds = Dataset.from_list([padded(e) for e in data.train])
    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32}
    if quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if quantize == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(out.parent / "hf_out"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=int(round(steps * WARMUP)), weight_decay=0.0, max_grad_norm=1.0,
        optim=("paged_adamw_8bit" if cuda else "adamw_bnb_8bit") if quantize == "4bit" else "adamw_torch",
        logging_steps=max(steps // 4, 1), save_strategy="no", report_to=[], seed=SEED,
        bf16=bf16, fp16=False, use_cpu=not cuda, dataloader_num_workers=0)
    counted = {"trained": 0}

    def collate(features):  # the default collator, counting the trained (label) tokens it hands out
        batch = default_data_collator(features)
        counted["trained"] += int((batch["labels"] != -100).sum())
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collate)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = trainer.train()
    trained = counted["trained"]
    runtime = res.metrics["train_runtime"]
    model.eval()
    device = next(p for p in model.parameters()).device
    tot, n = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for b in eval_batches(data.valid, BATCH, pad):
            s, k = batch_loss(model, b, device)
            tot += float(s)
            n += k
    real = sum(sum(r["attention_mask"]) for r in train_ds)
    peak = (torch.cuda.max_memory_allocated() / 1e9 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    out.write_text(json.dumps({
        "tokens_per_sec": trained / runtime, "trained_tokens": trained, "train_seconds": runtime,
        "peak_memory_gb": peak, "final_val_loss": tot / n,
        "padding_share": 1 - real / (len(train_ds) * max_length)}))


# --------------------------------------------------------------------------- report


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: a tiny Gemma-3 built here)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=256, help="Trainer arm: pad every row to this")
    ap.add_argument("--quantize", choices=("none", "4bit"), default="none")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_hf-arm", dest="hf_arm", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_arm:
        hf_arm(a.model, a.steps, a.quantize, a.max_length, a.hf_arm)
        return
    with tempfile.TemporaryDirectory(prefix="macft-bench-") as tmp:
        work = Path(tmp)
        model = a.model or build_model(work)
        hf = run_hf(model, a.steps, a.quantize, a.max_length, work)
        mf = run_macft(model, a.steps, a.quantize, work)
        mp = run_macft(model, a.steps, a.quantize, work, packing=True)
    res = {"machine": machine(), "steps": a.steps, "max_length": a.max_length, "quantize": a.quantize,
           "macft": mf, "macft_packing": mp, "hf_trainer": hf,
           "tokens_per_sec_ratio": mf["tokens_per_sec"] / hf["tokens_per_sec"],
           "peak_memory_ratio": mf["peak_memory_gb"] / hf["peak_memory_gb"],
           "packing_tokens_per_sec_ratio": mp["tokens_per_sec"] / hf["tokens_per_sec"],
           "packing_peak_memory_ratio": mp["peak_memory_gb"] / hf["peak_memory_gb"]}
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    print(f"Machine: {res['machine']}; {a.steps} steps, batch {BATCH}, quantize {a.quantize}, "
          f"Trainer rows padded to {a.max_length} ({hf['padding_share']:.0%} padding)")
    print("| | Trainer + peft (padded) | macft (length-grouped) | ratio | macft --packing | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| trained tokens/s | {hf['tokens_per_sec']:,.0f} | {mf['tokens_per_sec']:,.0f} | "
          f"{res['tokens_per_sec_ratio']:.2f}x | {mp['tokens_per_sec']:,.0f} | "
          f"{res['packing_tokens_per_sec_ratio']:.2f}x |")
    print(f"| peak memory (GB) | {hf['peak_memory_gb']:.2f} | {mf['peak_memory_gb']:.2f} | "
          f"{res['peak_memory_ratio']:.2f}x | {mp['peak_memory_gb']:.2f} | "
          f"{res['packing_peak_memory_ratio']:.2f}x |")
    print(f"| final validation loss | {hf['final_val_loss']:.3f} | {mf['final_val_loss']:.3f} | | "
          f"{mp['final_val_loss']:.3f} | |")
    print(f"| training time (s) | {hf['train_seconds']:.1f} | {mf['train_seconds']:.1f} | | "
          f"{mp['train_seconds']:.1f} | |")


if __name__ == "__main__":
    main()
