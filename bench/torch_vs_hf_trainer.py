"""Benchmark: `macft train --backend cuda` against the recipe people use today, in one run.

    python bench/torch_vs_hf_trainer.py [--shape tiny|gemma3-1b] [--layers N] [--steps 120]
        [--max-length 256] [--precision fp32|bf16] [--quantize none|4bit] [--json OUT]

macft runs twice: with its default length-grouped batches, and with ``--packing``
(batches in plain random order, packed padding-free).

"Today's recipe" is the widely copied QLoRA notebook: transformers ``Trainer`` + peft
LoRA, every example tokenized with ``padding="max_length"`` to a fixed length, the
default data collator. All arms use the same model, the same rendered examples and loss
masks (assistant tokens only, through macft's renderer: only the padding differs), LoRA
rank 16 / alpha 32 / dropout 0.05 on every attention and MLP projection, batch size 4,
no accumulation, the same number of optimizer steps, learning rate 2e-3 with 5% warm-up
and cosine decay, gradient clipping at 1.0, sdpa attention, no gradient checkpointing,
seed 0. The optimizer is the one macft picks: bitsandbytes' paged 8-bit AdamW on a GPU;
on the CPU torch's AdamW, or bitsandbytes' unpaged 8-bit AdamW with ``--quantize 4bit``.

Models (random init, nothing downloaded; ``--model DIR`` takes any HF model instead):

- ``tiny``: the test fixture (hidden 256, 6 layers, vocabulary ~1k), fp32 weights.
- ``gemma3-1b``: Gemma-3 1B's published widths (hidden 1152, MLP 6912, 4 query heads /
  1 KV head of 256, vocabulary 262144, sliding window 512 on 5 of every 6 layers) with
  ``--layers`` layers (1B has 26: the default on a GPU; 4 on the CPU), bf16 weights on
  disk, initializer range 0.02. The tokenizer stays the tiny ~1k SentencePiece one: the
  embedding's other rows are never looked up, but every logit is computed.

Precision (``--precision``): ``bf16`` = what macft does on a bf16 GPU (``--precision
bf16``: bf16 base weights, bf16 autocast, LoRA weights and optimizer state fp32); the
Trainer arm loads the base in bf16 and gets ``bf16=True``. ``fp32`` = fp32 weights and
compute in both (the only choice on the CPU: bf16 is refused there, macft would compute
in fp32 anyway). ``--quantize 4bit``: NF4 + double quantization, compute dtype bf16 or
fp32 following ``--precision``, in both arms.

Each arm runs in its own process, so peak memory is that process's own. Measured:

- tokens: *trained* = loss-mask tokens; *real* = input tokens that are not padding
  (prompt tokens included: the model must process them); *processed* = every position of
  every batch (batch x padded length), padding included. The Trainer arm processes
  ``batch x --max-length`` positions per step; macft pads each length-grouped batch to its
  longest row (rounded up to 8); ``--packing`` rows are nearly padding-free. macft's
  per-step token counts are recomputed here from the batch plan its train command builds
  (same data, seed, batch size, packing) and checked against the trained-token total it
  reports; they are left out (n/a) if that check fails.
- timed steps: the first ``--warmup-steps`` optimizer steps (CUDA kernel selection, the
  allocator filling up) are left out of the speed numbers. macft: its train reports with
  ``--log-every W``, summing every window but the first. Trainer: the time from the end
  of step W to the end of the last step (``torch.cuda.synchronize`` at each step end).
- trained tokens/s: trained tokens of the timed steps / their seconds. The JSON also has
  the old all-steps number (macft: every window; Trainer: trained / ``train_runtime``).
- peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the whole process
  (model load, evaluations, training: macft's ``summary.json`` ``peak_memory_gb`` is
  exactly that, read at the end of its run without any reset; the Trainer arm reads the
  same counter the same way, and also records the training-only peak). On the CPU the
  process's peak RSS (``ru_maxrss``; macft reads VmHWM, the same here).
- MFU = model FLOPs of the timed steps / their seconds / the GPU's peak dense bf16
  FLOP/s (``PEAK_BF16_TFLOPS`` by device name, or ``--peak-tflops``; n/a for an unknown
  GPU, on the CPU, and for fp32 runs unless ``--peak-tflops`` is given). Model FLOPs are
  the work the task needs, whatever an implementation does (recomputation, padding and
  logits nobody reads earn nothing), for LoRA training:

      per real token (position):  4 * P_layers + 6 * P_lora
      per trained token:          4 * P_head
      per example of L tokens:    sum over layers of 12 * n_heads * head_dim * K_l(L)

  P_layers = the frozen decoder's matmul weights (q, k, v, o, gate, up, down of every
  layer); P_head = the output projection (vocab x hidden, tied to the embedding; the
  embedding lookup is free). A frozen weight costs 2 FLOPs per token forward and 2 more
  backward for the activation gradient; it needs no weight gradient, so 4, not the 6 of
  full training. LoRA's A and B (P_lora) get the weight gradient too: 6. The loss needs
  logits only at trained positions, so the output projection is counted there only
  (the Trainer computes logits at every position, padding included; macft's engine
  computes them where the loss is taken). Attention has no weights, so its backward is
  twice its forward: per (query, key) pair and query head 4 * head_dim forward (QK^T,
  AV) + 8 * head_dim backward. K_l(L) = the (query, key) pairs of a causal sequence of L
  tokens: L(L+1)/2 on global layers; on sliding-window layers each query sees at most
  ``window`` keys. Each example is its own sequence (packed or padded alike). Norms,
  softmax, activations, RoPE: not counted.

  *MFU* counts only that work: comparable across arms. *MFU incl. padding* adds
  ``4 * P_layers + 6 * P_lora`` for every padding position (the decoder's matmuls run
  over padding too; its attention and logits are not added): how busy the GPU was with
  the decoder, wasted work included.
- final validation loss: mean cross-entropy per trained token over the whole validation
  set, computed the same way for all arms (macft's own evaluation; for Trainer the final
  model is evaluated with macft's loss function on macft's validation batches)

Run it under the heavy-job lock on shared machines:
``flock /tmp/macft-heavy.lock python bench/torch_vs_hf_trainer.py``.
bench/gpu_check.sh runs it on an NVIDIA GPU (Gemma-3-1B shape, bf16, QLoRA and LoRA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "nya_chat"
SEED = 0
BATCH = 4
LR = 2e-3
WARMUP = 0.05
RANK, ALPHA, DROPOUT = 16, 32.0, 0.05
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SEQ_LEN = 2048  # macft's own limit (no example here comes close)

# Gemma-3 1B's published text config (google/gemma-3-1b-pt); layers come from --layers.
GEMMA3_1B = dict(hidden=1152, heads=4, kv_heads=1, head_dim=256, intermediate=6912)
GEMMA3_1B_VOCAB = 262144
GEMMA3_1B_LAYERS = 26
SHAPES = ("tiny", "gemma3-1b")

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the
# first pattern that matches torch.cuda.get_device_name() wins, so specific names go first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100 PCIe", 756.0),
    (r"H[12]00 NVL", 835.0),
    (r"\bG?H[12]00\b", 989.0),  # H100 / H200 SXM ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not the A10G, a different chip
    # GeForce Ampere runs bf16 (fp32 accumulate) at half its fp16-accumulate tensor rate:
    # 25.6 dense, not the 51 usually quoted for fp16 with fp16 accumulation
    (r"RTX 3060$", 25.6),
]


def peak_tflops_for(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when the table does not know it."""
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


# --------------------------------------------------------------------------- model FLOPs


def causal_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs of a causal sequence: query i (1-based) sees min(i, window) keys."""
    if window is None or length <= window:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of LoRA training on a Gemma/Llama-style decoder (see the module docstring)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    windows: tuple[int | None, ...]  # per layer: the sliding window, None for global attention
    rank: int = RANK

    @classmethod
    def from_config(cls, cfg: dict, rank: int = RANK) -> FlopModel:
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        layers = cfg["num_hidden_layers"]
        kinds = cfg.get("layer_types") or ["full_attention"] * layers
        window = cfg.get("sliding_window")
        windows = tuple(window if k == "sliding_attention" else None for k in kinds)
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim, layers=layers,
                   vocab=cfg["vocab_size"], windows=windows, rank=rank)

    def _projections(self) -> list[tuple[int, int]]:
        """(in, out) of the seven LoRA-targeted linear layers of one decoder layer."""
        h, q, kv, m = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]

    @property
    def layer_params(self) -> int:
        """The frozen decoder layers' matmul weights (the seven projections of every layer)."""
        return self.layers * sum(i * o for i, o in self._projections())

    @property
    def head_params(self) -> int:
        """The output projection (tied to the embedding in Gemma): vocab x hidden."""
        return self.vocab * self.hidden

    @property
    def lora_params(self) -> int:
        return self.layers * sum(self.rank * (i + o) for i, o in self._projections())

    @property
    def flops_per_position(self) -> int:
        """The decoder's weights at one position (real or padding): 4 P_layers + 6 P_lora."""
        return 4 * self.layer_params + 6 * self.lora_params

    @property
    def flops_per_trained_token(self) -> int:
        """The output projection where the loss is taken: 4 P_head."""
        return 4 * self.head_params

    def attention_flops(self, length: int) -> int:
        return sum(12 * self.heads * self.head_dim * causal_pairs(length, w) for w in self.windows)

    def example_flops(self, length: int) -> int:
        """An example's decoder FLOPs (its output projection is counted per trained token)."""
        return length * self.flops_per_position + self.attention_flops(length)


@dataclass
class StepTokens:
    """One optimizer step's batch: each example's length, and the batch's positions."""

    lengths: list[int]  # real tokens of each example (one sequence each, packed or not)
    processed: int  # batch rows x padded length
    trained: int

    @property
    def real(self) -> int:
        return sum(self.lengths)


def step_flops(fm: FlopModel, steps: list[StepTokens]) -> tuple[int, int]:
    """(model FLOPs of the task, the same plus the decoder's matmuls over the padding positions)."""
    useful = sum(fm.example_flops(L) for s in steps for L in s.lengths)
    useful += sum(s.trained for s in steps) * fm.flops_per_trained_token
    padding = sum(s.processed - s.real for s in steps)
    return useful, useful + padding * fm.flops_per_position


# --------------------------------------------------------------------------- the model


def default_layers(shape: str, cuda: bool) -> int:
    if shape == "tiny":
        from macft.tiny import TinySize

        return TinySize().layers
    return GEMMA3_1B_LAYERS if cuda else 4


def build_model(root: Path, shape: str, layers: int) -> Path:
    """The random-init model of a shape (built once per directory, reused after)."""
    from macft.tiny import TinySize, build_tiny_gemma3, corpus_from_jsonl

    out = root / (f"gemma3-tiny-{layers}l" if shape == "tiny" else f"{shape}-{layers}l")
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    texts = corpus_from_jsonl([DATA / "train.jsonl", DATA / "valid.jsonl"])
    if shape == "tiny":
        build_tiny_gemma3(out, texts, TinySize(layers=layers))
    else:
        size = TinySize(**GEMMA3_1B, layers=layers, initializer_range=0.02)
        build_tiny_gemma3(out, texts, size, model_vocab=GEMMA3_1B_VOCAB, dtype="bfloat16")
    return out


# --------------------------------------------------------------------------- the macft arms


def macft_steps(model: Path, steps: int, packing: bool) -> list[StepTokens]:
    """The batches `macft train` feeds its first ``steps`` steps: its batch plan rebuilt with
    the arguments its train command uses (checked afterwards against its trained tokens)."""
    import numpy as np

    from macft.data.batching import BatchPlan
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))
    data = build_data(str(DATA), None, Renderer(tok), max_seq_len=MAX_SEQ_LEN, seed=SEED)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    plan = BatchPlan(data.train, BATCH, seed=SEED, pad_id=pad, packing=packing, max_seq_len=MAX_SEQ_LEN)
    out = []
    stream = plan.iterate()
    for _ in range(steps):
        _, _, b = next(stream)
        lengths = [int(n) for row in b.segment_ids for n in np.bincount(row)[1:] if n]
        out.append(StepTokens(lengths, int(b.input_ids.size), b.n_trained))
    return out


def run_macft(model: Path, a: argparse.Namespace, work: Path, packing: bool = False) -> dict:
    run = work / ("macft_packed" if packing else "macft_run")
    log_every = a.warmup_steps if 0 < a.warmup_steps < a.steps else a.steps
    cmd = [sys.executable, "-m", "macft", "train", "--backend", "cuda", "--model", str(model),
           "--data", str(DATA), "--output", str(run), "--iters", str(a.steps),
           "--batch-size", str(BATCH), "--grad-accum", "1", "--learning-rate", str(LR),
           "--warmup-ratio", str(WARMUP), "--schedule", "cosine", "--max-grad-norm", "1.0",
           "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", str(DROPOUT),
           "--lora-targets", "all-linear", "--seed", str(SEED), "--precision", a.precision,
           "--quantize", a.quantize, "--max-seq-len", str(MAX_SEQ_LEN),
           "--eval-every", "0", "--save-every", "0", "--log-every", str(log_every),
           "--packing" if packing else "--no-packing"]
    env = {**os.environ, "MACFT_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"macft{' --packing' if packing else ''} failed:\n{p.stderr[-4000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["type"] == "train"]
    summary = json.loads((run / "summary.json").read_text())
    # each train row covers the steps since the previous one: tokens / (tokens per second)
    windows, prev = [], 0
    for r in train:
        tokens = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        windows.append({"step": r["step"], "trained": tokens, "seconds": tokens / r["tokens_per_sec"]})
    # the first window is the warm-up (--log-every = --warmup-steps), unless there is none
    timed = windows[1:] if len(windows) > 1 else windows
    first_timed = windows[0]["step"] + 1 if len(windows) > 1 else 1
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "np") as f:
        trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    plan = macft_steps(model, a.steps, packing)
    plan_ok = sum(s.trained for s in plan) == summary["trained_tokens"]
    if not plan_ok:
        print(f"warning: macft{' --packing' if packing else ''} trained {summary['trained_tokens']} tokens, "
              f"the rebuilt batch plan {sum(s.trained for s in plan)}: its real/processed tokens and MFU "
              "are left out", file=sys.stderr)
    return {"trained_tokens": summary["trained_tokens"], "peak_memory_gb": summary["peak_memory_gb"],
            "final_val_loss": summary["final_val_loss"], "wall_seconds": wall,
            "train_seconds": sum(w["seconds"] for w in windows),
            "tokens_per_sec_all_steps": summary["trained_tokens"] / sum(w["seconds"] for w in windows),
            "timed_from_step": first_timed, "timed_seconds": sum(w["seconds"] for w in timed),
            "timed_trained": sum(w["trained"] for w in timed), "windows": windows,
            "steps": [asdict(s) for s in plan] if plan_ok else None, "trainable_params": trainable,
            "notes": summary.get("notes", [])}


# --------------------------------------------------------------------------- the Trainer arm


def run_hf(model: Path, a: argparse.Namespace, work: Path) -> dict:
    out = work / "hf.json"
    cmd = [sys.executable, __file__, "--_hf-arm", str(out), "--model", str(model), "--steps", str(a.steps),
           "--quantize", a.quantize, "--max-length", str(a.max_length), "--precision", a.precision,
           "--warmup-steps", str(a.warmup_steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"Trainer arm failed:\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def hf_arm(model_dir: Path, a: argparse.Namespace, out: Path) -> None:
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
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from cuda_backend.engine import batch_loss
    from macft.data.batching import eval_batches
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    steps, max_length = a.steps, a.max_length
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
    bf16 = a.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if a.quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if a.quantize == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none", task_type="CAUSAL_LM",
        target_modules=list(LORA_TARGETS)))
    trainable, _ = model.get_nb_trainable_parameters()
    if cuda:
        optim = "paged_adamw_8bit"
    else:
        optim = "adamw_bnb_8bit" if a.quantize == "4bit" else "adamw_torch"
    args = TrainingArguments(
        output_dir=str(out.parent / "hf_out"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=int(round(steps * WARMUP)), weight_decay=0.0, max_grad_norm=1.0, optim=optim,
        logging_steps=max(steps // 4, 1), save_strategy="no", report_to=[], seed=SEED,
        bf16=bf16, fp16=False, use_cpu=not cuda, dataloader_num_workers=0)
    seen: list[StepTokens] = []
    ends: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        """Counts the tokens of each batch as it is trained on (the data loader runs ahead)."""

        def training_step(self, model, inputs, *rest, **kw):
            att = inputs["attention_mask"]
            seen.append(StepTokens([int(n) for n in att.sum(1).tolist()], int(att.numel()),
                                   int((inputs["labels"] != -100).sum())))
            return super().training_step(model, inputs, *rest, **kw)

    trainer = CountingTrainer(model=model, args=args, train_dataset=train_ds,
                              data_collator=default_data_collator, callbacks=[StepClock()])
    load_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = trainer.train()
    train_peak = torch.cuda.max_memory_allocated() if cuda else 0
    w = a.warmup_steps if 0 < a.warmup_steps < steps else 0
    trained = sum(s.trained for s in seen)
    model.eval()
    device = next(p for p in model.parameters()).device
    tot, n = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for b in eval_batches(data.valid, BATCH, pad):
            s, k = batch_loss(model, b, device)
            tot += float(s)
            n += k
    if cuda:  # whole process (load, training, evaluation), like macft's counter
        peak = max(load_peak, torch.cuda.max_memory_allocated()) / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    real = sum(sum(r["attention_mask"]) for r in train_ds)
    out.write_text(json.dumps({
        "trained_tokens": trained, "train_seconds": res.metrics["train_runtime"],
        "tokens_per_sec_all_steps": trained / res.metrics["train_runtime"],
        "timed_from_step": w + 1, "timed_seconds": ends[-1] - ends[w],
        "timed_trained": sum(s.trained for s in seen[w:]),
        "peak_memory_gb": peak, "train_peak_memory_gb": train_peak / 1e9 if cuda else None,
        "load_peak_memory_gb": load_peak / 1e9 if cuda else None,
        "final_val_loss": tot / n, "trainable_params": int(trainable), "optimizer": optim,
        "padding_share": 1 - real / (len(train_ds) * max_length),
        "steps": [asdict(s) for s in seen]}))


# --------------------------------------------------------------------------- report


def device_facts() -> dict:
    try:
        import torch
    except ImportError:
        return {"cuda": False, "name": None, "bf16": False, "torch": None, "cuda_version": None}
    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "name": torch.cuda.get_device_name(0) if cuda else None,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "torch": torch.__version__,
            "cuda_version": torch.version.cuda}


def machine(dev: dict) -> str:
    if dev["cuda"]:
        return f"{dev['name']}, CUDA {dev['cuda_version']}, torch {dev['torch']}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"


def add_speed(arm: dict, fm: FlopModel, peak_tflops: float | None) -> None:
    """Timed-step tokens/s, token counts, FLOP/s and MFU of one arm's results (in place)."""
    arm["tokens_per_sec"] = arm["timed_trained"] / arm["timed_seconds"]
    steps = arm["steps"]
    if steps is None:
        arm.update(timed_real=None, timed_processed=None, model_tflops_per_sec=None,
                   model_tflops_per_sec_incl_padding=None, mfu=None, mfu_incl_padding=None)
        return
    timed = [StepTokens(**s) for s in steps[arm["timed_from_step"] - 1:]]
    useful, processed = step_flops(fm, timed)
    secs = arm["timed_seconds"]
    arm.update(timed_real=sum(s.real for s in timed), timed_processed=sum(s.processed for s in timed),
               timed_model_flops=useful, timed_model_flops_incl_padding=processed,
               model_tflops_per_sec=useful / secs / 1e12,
               model_tflops_per_sec_incl_padding=processed / secs / 1e12,
               mfu=useful / secs / (peak_tflops * 1e12) if peak_tflops else None,
               mfu_incl_padding=processed / secs / (peak_tflops * 1e12) if peak_tflops else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: a random-init --shape built here)")
    ap.add_argument("--shape", choices=SHAPES, default="tiny", help="the random-init model to build")
    ap.add_argument("--layers", type=int, help="layers of the built model (default: tiny 6; "
                    f"gemma3-1b {GEMMA3_1B_LAYERS} on a GPU, 4 on the CPU)")
    ap.add_argument("--keep", type=Path, help="build the model here and reuse it (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup-steps", type=int, help="steps left out of the speed numbers "
                    "(default: 5 when --steps >= 20, else 0)")
    ap.add_argument("--max-length", type=int, default=256, help="Trainer arm: pad every row to this")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--quantize", choices=("none", "4bit"), default="none")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s for MFU, in TFLOP/s "
                    "(default: dense bf16 from a table by GPU name)")
    ap.add_argument("--json", type=Path, help="also write every raw number here")
    ap.add_argument("--_hf-arm", dest="hf_arm", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    if a.layers is not None and a.layers < 1:
        ap.error("--layers must be at least 1")
    if a.warmup_steps is None:
        a.warmup_steps = 5 if a.steps >= 20 else 0
    if not 0 <= a.warmup_steps < a.steps:
        ap.error("--warmup-steps must be at least 0 and below --steps")
    return a


def mfu_peak(a: argparse.Namespace, dev: dict) -> tuple[float | None, str]:
    """The peak the MFU divides by, and where it came from."""
    if a.peak_tflops:
        return a.peak_tflops, "--peak-tflops"
    if not dev["cuda"]:
        return None, "no GPU"
    if a.precision != "bf16":
        return None, "fp32 run (the table holds bf16 peaks; give --peak-tflops)"
    peak = peak_tflops_for(dev["name"])
    return peak, ("dense bf16, table" if peak else f"{dev['name']} is not in the table (give --peak-tflops)")


def main() -> None:
    a = parse_args()
    if a.hf_arm:
        hf_arm(a.model, a, a.hf_arm)
        return
    dev = device_facts()
    if a.precision == "bf16" and not dev["bf16"]:
        raise SystemExit("--precision bf16 needs a CUDA GPU with bf16 (macft computes in fp32 on the "
                         "CPU and on older GPUs, so the arms would not compare): use --precision fp32")
    with tempfile.TemporaryDirectory(prefix="macft-bench-") as tmp:
        work = Path(tmp)
        if a.model:
            model = a.model
        else:
            layers = a.layers or default_layers(a.shape, dev["cuda"])
            root = a.keep or work
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            model = build_model(root, a.shape, layers)
            print(f"model: {model.name} ({time.perf_counter() - t0:.0f} s to build or find)", flush=True)
        fm = FlopModel.from_config(json.loads((model / "config.json").read_text()))
        arms = {}
        for name, run in (("hf_trainer", lambda: run_hf(model, a, work)),
                          ("macft", lambda: run_macft(model, a, work)),
                          ("macft_packing", lambda: run_macft(model, a, work, packing=True))):
            t0 = time.perf_counter()
            arms[name] = run()
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    peak, peak_from = mfu_peak(a, dev)
    for arm in arms.values():
        add_speed(arm, fm, peak)
    hf, mf, mp = arms["hf_trainer"], arms["macft"], arms["macft_packing"]
    for name, arm in arms.items():
        if arm["trainable_params"] != fm.lora_params:
            print(f"warning: {name} trains {arm['trainable_params']:,} parameters, the FLOP count "
                  f"assumes {fm.lora_params:,}", file=sys.stderr)
    res = {"machine": machine(dev), "device": dev, "model": str(a.model) if a.model else a.shape,
           "config": {k: v for k, v in vars(a).items() if k != "hf_arm"} | {"batch": BATCH, "rank": RANK},
           "flop_model": asdict(fm) | {"layer_params": fm.layer_params, "head_params": fm.head_params,
                                       "lora_params": fm.lora_params,
                                       "flops_per_position": fm.flops_per_position,
                                       "flops_per_trained_token": fm.flops_per_trained_token},
           "peak_tflops": peak, "peak_tflops_from": peak_from,
           "macft": mf, "macft_packing": mp, "hf_trainer": hf,
           "tokens_per_sec_ratio": mf["tokens_per_sec"] / hf["tokens_per_sec"],
           "peak_memory_ratio": mf["peak_memory_gb"] / hf["peak_memory_gb"],
           "packing_tokens_per_sec_ratio": mp["tokens_per_sec"] / hf["tokens_per_sec"],
           "packing_peak_memory_ratio": mp["peak_memory_gb"] / hf["peak_memory_gb"]}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))
    print(report(res))


def report(res: dict) -> str:
    c, hf, mf, mp = res["config"], res["hf_trainer"], res["macft"], res["macft_packing"]
    fm = res["flop_model"]
    mem = "peak max_memory_allocated (GB)" if res["device"]["cuda"] else "peak RSS (GB)"

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def row(label, key, fmt, ratio=False):
        cells = [num(arm.get(key), fmt) for arm in (hf, mf, mp)]
        r = [f"{mf[key] / hf[key]:.2f}x" if ratio and mf.get(key) and hf.get(key) else "",
             f"{mp[key] / hf[key]:.2f}x" if ratio and mp.get(key) and hf.get(key) else ""]
        return f"| {label} | {cells[0]} | {cells[1]} | {r[0]} | {cells[2]} | {r[1]} |"

    lines = [
        f"Machine: {res['machine']}",
        f"Model: {res['model']} ({fm['layers']} layers, hidden {fm['hidden']}, vocab {fm['vocab']:,}; "
        f"frozen matmul weights {fm['layer_params'] / 1e6:,.1f} M in the layers + "
        f"{fm['head_params'] / 1e6:,.1f} M output projection, LoRA {fm['lora_params'] / 1e6:.2f} M); "
        f"{c['precision']}, quantize {c['quantize']}; {c['steps']} steps of batch {c['batch']}, "
        f"speed over steps {c['warmup_steps'] + 1}-{c['steps']}; Trainer rows padded to "
        f"{c['max_length']} ({hf['padding_share']:.0%} padding)",
        f"Model FLOPs: {fm['flops_per_position'] / 1e9:.3g} GFLOP per position + attention, "
        f"{fm['flops_per_trained_token'] / 1e9:.3g} GFLOP per trained token (output projection); "
        + (f"MFU against {res['peak_tflops']:.1f} TFLOP/s ({res['peak_tflops_from']})" if res["peak_tflops"]
           else f"MFU: n/a ({res['peak_tflops_from']})"),
        "",
        "| | Trainer + peft (padded) | macft (length-grouped) | ratio | macft --packing | ratio |",
        "|---|---|---|---|---|---|",
        row("trained tokens/s", "tokens_per_sec", ",.0f", ratio=True),
        row("trained tokens (timed steps)", "timed_trained", ",d"),
        row("real tokens (timed steps)", "timed_real", ",d"),
        row("processed positions (timed steps)", "timed_processed", ",d"),
        row("model TFLOP/s", "model_tflops_per_sec", ".3g", ratio=True),
        row("MFU", "mfu", ".1%", ratio=True),
        row("MFU incl. padding", "mfu_incl_padding", ".1%"),
        row(mem, "peak_memory_gb", ".2f", ratio=True),
        row("final validation loss", "final_val_loss", ".3f"),
        row("timed seconds", "timed_seconds", ".2f"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
