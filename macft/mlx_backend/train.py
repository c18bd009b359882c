"""MLX training: load, quantize, add LoRA, run the shared loop, write both adapter formats."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil

from ..errors import MacftError
from ..run import BEST_ADAPTER, MLX_ADAPTER, write_quantization
from ..training.loop import LoopResult
from ..training.loop import train as run_loop
from ..ui import console, human_bytes
from .device import on_metal
from .engine import MLXEngine
from .model import GROUP_SIZE, adapter_spec, add_lora, load, mx_dtype, quantize

MEMORY_HINT = ("Try a smaller --batch-size, --quantize 4bit, --grad-checkpoint, or a shorter "
               "--max-seq-len.")


def memory_budget() -> int:
    """Bytes MLX may use: the recommended working set on Metal, else available RAM.

    ``MACFT_MLX_MEMORY_LIMIT_GB`` caps it (also used by tests to provoke the error).
    """
    cap = os.environ.get("MACFT_MLX_MEMORY_LIMIT_GB")
    if on_metal():
        info = mx.device_info()
        budget = int(info.get("max_recommended_working_set_size") or info.get("memory_size", 0))
    else:
        budget = int(psutil.virtual_memory().available)
    if cap:
        budget = min(budget, int(float(cap) * 1e9))
    return budget


def weights_bytes(model_path: Path, dtype_bytes: int, bits: int | None) -> int:
    """Memory the frozen base will take once loaded (from the safetensors headers)."""
    from ..sizing.shapes import count_safetensors_params

    total_params = count_safetensors_params(model_path, text_only=False)
    if bits:
        return int(total_params * (bits / 8 + 2 * dtype_bytes / GROUP_SIZE))
    return total_params * dtype_bytes


def set_limits(budget: int) -> None:
    if on_metal():
        # Keep the model's memory wired (no paging out mid-step) and let the buffer cache
        # use what is left, as mlx-lm does.
        mx.set_wired_limit(budget)
    mx.set_memory_limit(budget)


def write_quantization_record(run_dir: Path, bits: int, group_size: int, quantized: list[str],
                              unquantized: list[str]) -> None:
    """How the base was quantized (mlx-lm's affine 4/8-bit), for export to repeat."""
    write_quantization(run_dir, {
        "method": "mlx-affine", "bits": bits, "group_size": group_size, "mode": "affine",
        "quantized": quantized, "unquantized": unquantized})


def run_training(backend: Any, job: Any, callback: Any) -> LoopResult:
    cfg = job.cfg
    precision = backend.precision(cfg, job.model_info)
    dtype = mx_dtype(precision)
    bits = {"4bit": 4, "8bit": 8}.get(cfg.model.quantize)
    budget = memory_budget()
    need = weights_bytes(job.model_path, 4 if precision == "fp32" else 2, bits)
    if need > 0.9 * budget:
        raise MacftError(
            f"The model needs about {human_bytes(need)} for its weights alone, but only "
            f"{human_bytes(budget)} is available to MLX here.", MEMORY_HINT)
    set_limits(budget)

    lm = load(job.model_path, dtype, job.model_info)
    if bits:
        if not on_metal():
            job.notes.append("4/8-bit matmuls on the CPU are several times slower than fp32 LoRA")
        quantize(lm, bits)
        write_quantization_record(job.run_dir, bits, GROUP_SIZE,
                                  [lm.hf_name(n) for n in lm.quantized], [lm.hf_name(n) for n in lm.unquantized])
    from .blas import status as blas_status

    fast, msg = blas_status()
    if not fast and not on_metal():
        console.print(f"[yellow]warning:[/] {msg}")
    mx.random.seed(cfg.train.seed)
    keys, layers = add_lora(lm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                            cfg.lora.layers)
    spec = adapter_spec(lm, cfg.model.name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    job.notes[:0] = [f"precision {precision}"] + lm.notes
    if lm.prequantized:
        job.notes.append(f"base model is pre-quantized ({lm.prequantized.get('bits')}-bit)")
    for n in lm.notes:
        console.print(f"  {n}")

    engine = MLXEngine(lm, spec, weight_decay=cfg.train.weight_decay, packing=cfg.data.packing,
                       device=backend.device(), seed=cfg.train.seed,
                       grad_checkpoint=cfg.train.grad_checkpoint,
                       distill_weight=cfg.train.distill_weight,
                       distill_temperature=cfg.train.distill_temperature)
    if engine.split_note:
        job.notes.append(engine.split_note)
        console.print(f"  {engine.split_note}")
    try:
        if job.resume_from is None:
            probe_memory(engine, job.plan, budget)
        result = run_loop(engine, job.plan, job.valid_batches, job.settings, job.run_dir, callback,
                          job.resume_from)
    except RuntimeError as e:
        if _is_oom(e):
            raise MacftError(f"MLX ran out of memory ({str(e).splitlines()[0]}).", MEMORY_HINT) from None
        raise
    finally:
        engine.close()
    if not result.interrupted:
        if result.stopped_early:  # adapter/ is the best one: so is mlx-lm's copy
            engine.load_adapter_weights(job.run_dir / BEST_ADAPTER)
        write_mlx_adapter(job.run_dir / MLX_ADAPTER, engine, keys, len(layers))
    return result


def probe_memory(engine: MLXEngine, plan: Any, budget: int) -> None:
    """Run the largest batch once (no update) so a batch that cannot fit fails now, not in hour two."""
    batch = plan.largest_batch()
    engine.train_micro(batch)
    engine.discard_gradients()
    peak = mx.get_peak_memory()
    if peak > budget:
        b, t = batch.shape
        raise MacftError(
            f"The largest batch ({b} x {t} tokens) needs about {human_bytes(peak)} for one training "
            f"step, but only {human_bytes(budget)} is available to MLX here.", MEMORY_HINT)


def _is_oom(e: Exception) -> bool:
    s = str(e).lower()
    return any(t in s for t in ("out of memory", "malloc", "memory limit", "allocate"))


def write_mlx_adapter(path: Path, engine: MLXEngine, keys: list[str], num_layers: int) -> None:
    """mlx-lm's own format, for `mlx_lm.generate --adapter-path`."""
    from mlx.utils import tree_flatten

    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(engine.model.trainable_parameters()))
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    spec = engine.spec
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": keys},
        "base_model": spec.base_model}, indent=1))
