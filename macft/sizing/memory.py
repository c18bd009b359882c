"""Peak training memory, part by part, before anything is loaded.

What each backend's "peak memory" means (and so what this predicts):

- ``mlx``: MLX's own peak (``mx.get_peak_memory``): every array MLX holds. On a Mac this
  is the unified memory the run needs; the budget is Metal's recommended working set.
- ``cuda`` on a GPU: ``torch.cuda.max_memory_allocated`` plus the CUDA context.
- ``cuda`` on the CPU: the peak resident size of the whole process (Python, libraries,
  tensors), against the RAM available now.

The parts:

- **weights** of the frozen base at the chosen quantization. MLX quantizes every linear
  layer *and the embedding* whose width divides the group size (64) to ``bits`` plus an
  fp scale and bias per group; bitsandbytes quantizes the linear layers only (NF4: half a
  byte plus an 8-bit absmax per 64 weights with double quantization; LLM.int8: one byte
  plus an fp32 scale per row), the embedding stays in the compute dtype.
- **LoRA and optimizer**: the adapter parameters in fp32, their gradients, AdamW's two
  moments, and (MLX) the gradient accumulator: 4 or 5 fp32 copies.
- **activations** kept for the backward pass, per token and layer, as
  ``c_h*hidden + c_q*heads*head_dim + c_kv*kv_heads*head_dim + c_i*intermediate +
  c_s*heads*seq_len`` values of the compute dtype (the last term: attention scores and
  probabilities, quadratic in the sequence). With gradient checkpointing only each
  layer's input is kept, plus one layer's activations while it is recomputed.
- **logits**: both engines take the final hidden states only at the tokens that carry a
  loss (with LwF: every real token) and run the output layer over them in chunks of at
  most ``CHUNK_LOGITS`` logits, computing each chunk's loss gradient at once
  (:mod:`macft.mlx_backend.loss`, :mod:`cuda_backend.loss`). So the part is a few chunks
  of fp32 logits (``chunk_copies``; MLX also runs ahead by a few operations) plus a few
  fp32 copies of the gathered hidden states and their gradient (``row_copies``), no longer
  ``tokens x vocabulary``. With gradient checkpointing the chunks and the recomputed layer
  are alive at different times, so only the larger counts.
- **framework**: what the framework holds besides (CPU torch: the libraries in RSS).
- **loading** (PyTorch on the CPU only): the peak RSS of loading, the memory-mapped
  safetensors files plus the weights made from them, when it is above the training peak.

The per-value coefficients were measured on this project's fixtures and on random-init
models with Gemma-3 1B and 4B dimensions (``bench/estimate_vs_measured.py``, figures in
``bench/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..training.chunking import chunk_rows
from .shapes import ModelShape

GiB = 1024**3
GROUP = 64


@dataclass(frozen=True)
class Coefficients:
    c_h: float
    c_q: float
    c_kv: float
    c_i: float
    c_s: float
    chunk_copies: float  # fp32 [chunk rows x vocab] tensors alive at the peak
    row_copies: float  # fp32 [trained tokens x hidden] tensors (gathered rows, their gradient)
    framework: int  # bytes
    ckpt_layer_copies: float = 1.0  # per-layer input copies kept with checkpointing


# the chunked loss (fitted on bench/estimate_vs_measured.py's rows, see RESULTS.md)
CHUNK_COPIES_MLX, ROW_COPIES_MLX = 4.0, 3.0
CHUNK_COPIES_TORCH, ROW_COPIES_TORCH = 4.0, 3.0

# measured: see the module docstring
COEFFICIENTS: dict[str, Coefficients] = {
    # least squares over 9 fixture runs (two widths, batch 2-8, 128-512 tokens, 4-bit,
    # checkpointing); residuals under 2%
    "mlx": Coefficients(c_h=8.9, c_q=8.9, c_kv=17.8, c_i=8.1, c_s=1.07, chunk_copies=CHUNK_COPIES_MLX, row_copies=ROW_COPIES_MLX, framework=0,
                        ckpt_layer_copies=6.8),
    # PyTorch on the CPU (peak RSS): the MLX shape scaled by 0.94, checkpointing, logits and the
    # libraries' resident size fitted over the same fixtures plus two runs with Gemma-3 1B's
    # dimensions
    "cuda-cpu": Coefficients(c_h=8.33, c_q=8.33, c_kv=16.7, c_i=7.58, c_s=1.0, chunk_copies=CHUNK_COPIES_TORCH,
                             row_copies=ROW_COPIES_TORCH, framework=int(0.49 * GiB), ckpt_layer_copies=21.0),
    # on a GPU: the same tensors (in bf16 where the run uses it) and the CUDA context; not
    # measured here (no GPU in this project's CI)
    "cuda-gpu": Coefficients(c_h=8.33, c_q=8.33, c_kv=16.7, c_i=7.58, c_s=1.0, chunk_copies=CHUNK_COPIES_TORCH,
                             row_copies=ROW_COPIES_TORCH, framework=int(0.5 * GiB), ckpt_layer_copies=21.0),
}


BNB_CPU = int(0.12 * GiB)  # fitted on the fixtures' 4-bit runs


@dataclass(frozen=True)
class Target:
    """Where the run happens."""

    backend: str  # "mlx" | "cuda"
    device: str  # "metal" | "cpu" | "gpu"
    dtype_bytes: int  # compute dtype of weights and activations (4: fp32, 2: bf16/fp16)
    budget: int  # bytes the run may use
    budget_label: str  # e.g. "available RAM", "GPU memory"

    @property
    def key(self) -> str:
        return "mlx" if self.backend == "mlx" else f"cuda-{'gpu' if self.device == 'gpu' else 'cpu'}"


@dataclass(frozen=True)
class Setting:
    """The training options that move memory."""

    batch: int
    seq_len: int  # longest row of the largest batch
    quantize: str = "none"  # none | 4bit | 8bit
    grad_checkpoint: bool = False
    rank: int = 16
    targets: tuple[str, ...] = ("all-linear",)
    lora_layers: int = -1
    trained_tokens: int | None = None  # tokens with a loss in the largest batch; None: all of them
    distill: bool = False  # LwF: every real token reaches the output layer, twice (base model too)
    grad_accum: int = 1  # does not move memory; kept so suggestions keep the effective batch


@dataclass
class Estimate:
    target: Target
    setting: Setting
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.target.budget


def weight_bytes(shape: ModelShape, target: Target, quantize: str) -> int:
    wb = target.dtype_bytes
    if quantize == "none":
        return shape.params * wb
    bits = 4 if quantize == "4bit" else 8
    linear = shape.layers * shape.linear_params_per_layer
    rest = shape.params - linear
    if target.backend == "mlx":
        per = bits / 8 + 2 * wb / GROUP  # packed weights + scale and bias per group
        emb = shape.vocab * shape.hidden if shape.hidden % GROUP == 0 else 0
        return int(linear * per + emb * per + (rest - emb) * wb)
    if bits == 4:  # NF4 with double quantization
        return int(linear * (0.5 + 1 / GROUP + 4 / (GROUP * 256)) + rest * wb)
    rows = shape.layers * shape.linear_rows_per_layer
    return int(linear + rows * 4 + rest * wb)


def estimate(shape: ModelShape, target: Target, s: Setting) -> Estimate:
    c = COEFFICIENTS[target.key]
    wb = target.dtype_bytes
    b, t = s.batch, s.seq_len
    e = Estimate(target, s)
    e.parts["weights"] = weight_bytes(shape, target, s.quantize)
    lora = shape.lora_params(s.rank, list(s.targets), s.lora_layers)
    e.parts["LoRA + optimizer"] = lora * 4 * (5 if target.backend == "mlx" else 4)
    per_token_layer = wb * (c.c_h * shape.hidden + c.c_q * shape.heads * shape.head_dim
                            + c.c_kv * shape.kv_heads * shape.head_dim + c.c_i * shape.intermediate
                            + c.c_s * shape.heads * t)
    n_layers = shape.layers
    if s.grad_checkpoint:
        act = b * t * (n_layers * c.ckpt_layer_copies * shape.hidden * wb + per_token_layer)
    else:
        act = b * t * n_layers * per_token_layer
    e.parts["activations"] = int(act)
    rows = b * t if s.trained_tokens is None or s.distill else min(b * t, s.trained_tokens)
    chunk = min(rows, chunk_rows(shape.vocab))
    per_row = 2 if s.distill else 1  # LwF: the base model's hidden states and logits too
    chunks = per_row * chunk * shape.vocab * 4 * c.chunk_copies
    if s.grad_checkpoint:
        # the chunks live at the end of the forward pass, the recomputed layer in the backward
        # pass: only the larger of the two counts (measured: tiny-wide, 0.54 GB vs 0.66 summed)
        chunks = max(0.0, chunks - b * t * per_token_layer)
    e.parts["logits"] = int(chunks + per_row * rows * shape.hidden * 4 * c.row_copies)
    framework = c.framework
    if target.backend == "cuda" and target.device == "cpu" and s.quantize != "none":
        framework += BNB_CPU  # bitsandbytes' CPU library and its buffers
    if framework:
        e.parts["framework"] = framework
    if target.backend == "cuda" and target.device == "cpu" and shape.file_bytes:
        # The process's RSS also peaks while loading: every page of the safetensors files
        # (memory-mapped) plus the weights built from them. It wins for a large quantized base
        # (measured: 4B-shaped NF4, 13.6 GB against an 8.3 GB training peak).
        loading = framework + shape.file_bytes + e.parts["weights"]
        if loading > e.total:
            e.parts["loading (mapped files)"] = loading - e.total
    return e


def suggestions(shape: ModelShape, target: Target, s: Setting, limit: int = 3) -> list[tuple[str, Estimate]]:
    """Settings that fit, the smallest change first: gradient checkpointing, smaller
    micro-batches (with gradient accumulation to keep the effective batch), 4-bit base,
    shorter sequences."""
    options: list[tuple[int, str, Setting]] = []
    ckpts = [s.grad_checkpoint] if s.grad_checkpoint else [False, True]
    quants = [s.quantize] if s.quantize == "4bit" else [s.quantize, "4bit"]
    batches = sorted({b for b in (s.batch, s.batch // 2, s.batch // 4, 1) if b >= 1}, reverse=True)
    lens = sorted({n for n in (s.seq_len, s.seq_len // 2, s.seq_len // 4) if n >= 128}, reverse=True) or [s.seq_len]
    for q in quants:
        for ck in ckpts:
            for bs in batches:
                for n in lens:
                    scale = bs * n / (s.batch * s.seq_len)
                    new = replace(s, quantize=q, grad_checkpoint=ck, batch=bs, seq_len=n,
                                  trained_tokens=None if s.trained_tokens is None
                                  else max(1, int(s.trained_tokens * scale)))
                    words = []
                    cost = 0
                    if ck != s.grad_checkpoint:
                        words.append("--grad-checkpoint")
                        cost += 1
                    if bs != s.batch:
                        accum = s.grad_accum * max(1, s.batch // bs)
                        words.append(f"--batch-size {bs} --grad-accum {accum}")
                        cost += 2
                    if q != s.quantize:
                        words.append("--quantize 4bit")
                        cost += 3
                    if n != s.seq_len:
                        words.append(f"--max-seq-len {n}")
                        cost += 4  # changes what the model sees: last resort
                    if words:
                        options.append((cost, " ".join(words), new))
    out: list[tuple[str, Estimate]] = []
    for _, words, new in sorted(options, key=lambda o: o[0]):
        est = estimate(shape, target, new)
        if est.fits:
            out.append((words, est))
        if len(out) >= limit:
            break
    return out
