"""Merge a LoRA adapter into its base without loading the model.

The base's safetensors shards are streamed tensor by tensor into new shards with the same
names and layout. An adapted weight becomes ``W + scale * B @ A``, computed in fp32 on
blocks of rows and cast back to the weight's own dtype; every other tensor is copied byte
for byte. Peak memory stays near one block of rows (or, for a bitsandbytes base, one
weight), not the model.

For a QLoRA adapter the base is by default the one training saw: each weight training
quantized is quantized and dequantized (in fp32) first, see :mod:`export.dequant`.

Adapter modules are matched to base weights through :func:`export.names.canonical`, so an
adapter named after transformers' module tree (``transformer.h.0.attn.c_attn``) fits every
published naming of the base (``h.0.attn.c_attn.weight``). GPT-2's Conv1D weights are stored
[in, out]: their update is applied transposed, and a QLoRA roundtrip happens on the
transposed weight, the [out, in] matrix the trainers quantized.

Tokenizer files, config, generation config and chat template are copied alongside.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macft.adapter import CONFIG_NAME, WEIGHTS_NAME, read_peft_adapter
from macft.errors import MacftError
from macft.model_info import ModelInfo

from .dequant import BaseQuantization
from .names import PEFT_PREFIX, canonical, stored_in_out, weight_index
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo, from_f32

INDEX_NAME = "model.safetensors.index.json"
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx",
                 ".npz", ".lock")
BLOCK_ELEMENTS = 2 << 20  # rows per block: about 8 MB of fp32 (peak ~4 such buffers)


@dataclass
class Update:
    """One adapted weight: ``W += scale * B @ A`` (transposed when ``fan_in_fan_out``)."""

    module: str
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 of the update, in the weight's layout, fp32."""
        if self.fan_in_fan_out:
            return self.scale * (self.a[:, r0:r1].T @ self.b.T)
        return self.scale * (self.b[r0:r1] @ self.a)


@dataclass
class MergePlan:
    base_dir: Path
    adapter_dir: Path
    shards: list[SafetensorsFile]
    updates: dict[str, Update]  # base tensor name -> update
    quant: BaseQuantization | None  # apply the training-time roundtrip when set
    adapter_config: dict = field(default_factory=dict)
    in_out: set[str] = field(default_factory=set)  # base tensors stored [in, out] (Conv1D)

    def base_description(self) -> str:
        if self.quant is None:
            return "the base's weights as stored"
        return f"trained base: {self.quant.describe()}, dequantized in fp32"

    @property
    def total_bytes(self) -> int:
        return sum(p.path.stat().st_size for p in self.shards)


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    merged: int
    dequantized: int
    bytes_written: int
    seconds: float
    base: str


# --------------------------------------------------------------------------- planning


def base_shards(base_dir: Path) -> list[Path]:
    """The safetensors shards of an HF model directory, in index order."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (base_dir / n).is_file()]
        if missing:
            raise MacftError(f"{base_dir}: {INDEX_NAME} names shards that are missing: {', '.join(missing)}.",
                             "Download the complete model (every model-*.safetensors file).")
        return [base_dir / n for n in names]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p for p in base_dir.glob("*.safetensors") if not p.name.startswith("adapter"))
    if found:
        return found
    others = sorted(p.name for p in base_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    raise MacftError(
        f"{base_dir} has no *.safetensors weights" + (f" (found {', '.join(others[:4])})" if others else "") + ".",
        "macft merges Hugging Face safetensors checkpoints. Re-save the model with "
        "`model.save_pretrained(dir, safe_serialization=True)` or download its safetensors files.")


def check_base_config(base_dir: Path) -> ModelInfo:
    from macft.model_info import read_model_info

    info = read_model_info(base_dir)
    q = info.quantization
    if q:
        method = q.get("quant_method") or (f"MLX {q['bits']}-bit" if "bits" in q else "unknown method")
        raise MacftError(
            f"{base_dir} is stored quantized ({method}): its weights cannot be merged with a LoRA update.",
            "Pass the original 16-bit model with --model (the one the quantized copy was made from).")
    return info


def load_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """The adapter's LoRA pairs (fp32) and config; refuses what a plain merge cannot express."""
    if not adapter_dir.is_dir():
        raise MacftError(f"Adapter directory {adapter_dir} does not exist.",
                         "Pass the adapter/ directory of a run, or a PEFT LoRA adapter directory.")
    modules, cfg = read_peft_adapter(adapter_dir)
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')}; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        problems.append("use_dora is true: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: fully trained modules are not supported")
    header = SafetensorsFile(adapter_dir / WEIGHTS_NAME)
    odd = [k for k in header.tensors
           if not re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k)]
    if odd:
        problems.append("tensors other than lora_A / lora_B weights (e.g. embedding LoRA, biases, "
                        f"DoRA magnitudes): {', '.join(sorted(odd)[:8])}{' ...' if len(odd) > 8 else ''}")
    if problems:
        raise MacftError(f"{adapter_dir} cannot be merged:\n" + "\n".join(f"  - {p}" for p in problems),
                         "Train a plain LoRA adapter on linear layers (macft train writes one).")
    out = {n: (np.asarray(a, np.float32), np.asarray(b, np.float32)) for n, (a, b) in modules.items()}
    return out, cfg


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    for key, value in (pattern or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    return default


def module_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, float(cfg.get("lora_alpha", rank)))
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def plan_merge(base_dir: Path, adapter_dir: Path, quant: BaseQuantization | None) -> MergePlan:
    """Match every adapter module to a base weight; one error lists every mismatch."""
    model_type = check_base_config(base_dir).text_model_type
    modules, cfg = load_adapter(adapter_dir)
    shards = [SafetensorsFile(p) for p in base_shards(base_dir)]
    where: dict[str, TensorInfo] = {}
    for sf in shards:
        where.update(sf.tensors)
    index = weight_index(list(where))
    # Conv1D weights by the base's architecture (as PEFT decides by the module's class, whatever
    # the adapter says: an adapter trained on a 4-bit GPT-2 says fan_in_fan_out false); the
    # adapter's own flag covers Conv1D architectures this table does not know.
    in_out = {n for n, t in where.items()
              if n.endswith(".weight") and stored_in_out(model_type, n[:-7], t.shape)}
    adapter_fan = bool(cfg.get("fan_in_fan_out"))
    problems: list[str] = []
    updates: dict[str, Update] = {}
    for module in sorted(modules):
        a, b = modules[module]
        c = canonical(module)
        names = index.get(c)
        if not names:
            if c == "lm_head" and "embed_tokens" in " ".join(index):
                problems.append(f"{module}: the base ties lm_head to the input embeddings, so it has "
                                "no lm_head weight to merge into")
            else:
                problems.append(f"{module}: the base has no weight {c}.weight (in any naming)")
            continue
        if len(names) > 1:
            problems.append(f"{module}: ambiguous, the base has {', '.join(names)}")
            continue
        t = where[names[0]]
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"{module}: base weight {t.name} is {t.dtype}, not a float tensor")
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form "
                            "a rank-r pair")
            continue
        if len(t.shape) != 2:
            problems.append(f"{module}: base weight {t.name} has shape {list(t.shape)}, not a matrix")
            continue
        fan = t.name in in_out or adapter_fan
        if fan:
            in_out.add(t.name)
        out_f, in_f = (t.shape[1], t.shape[0]) if fan else t.shape
        if b.shape[0] != out_f or a.shape[1] != in_f:
            problems.append(f"{module}: the adapter expects a weight of shape [{b.shape[0]}, {a.shape[1]}] "
                            f"(out, in), the base's {t.name} is {list(t.shape)}")
            continue
        updates[t.name] = Update(module, a, b, module_scale(cfg, module, a.shape[0]), fan)
    if problems:
        n = len(problems)
        claimed = cfg.get("base_model_name_or_path") or "unknown"
        raise MacftError(
            f"The adapter in {adapter_dir} does not fit the base model {base_dir}: {n} mismatch"
            f"{'es' if n != 1 else ''} ({len(modules)} adapted modules):\n"
            + "\n".join(f"  - {p}" for p in problems),
            f"Pass the base model the adapter was trained on with --model (its adapter_config.json "
            f"names '{claimed}').")
    return MergePlan(base_dir, adapter_dir, shards, updates, quant, cfg, in_out)


# --------------------------------------------------------------------------- merging


def copy_side_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Config, generation config, tokenizer files (tokenizer.model too), chat template, index."""
    copied = []
    for p in sorted(base_dir.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(SKIP_SUFFIXES) and p.name != INDEX_NAME:
            continue
        shutil.copy2(p, out_dir / p.name)
        copied.append(p.name)
    return copied


# Buffers that checkpoints saved by old transformers carry (GPT-2's causal mask ``attn.bias``
# and ``attn.masked_bias``, GPT-NeoX's ``attention.bias`` / ``masked_bias`` / ``rotary_emb.inv_freq``):
# not weights, recomputed by every loader, and llama.cpp's converter stops on some of them
# ("Can not map tensor 'h.0.attn.bias'"). The merged copy leaves them out.
STALE_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                 ".rotary_emb.inv_freq")


def is_stale_buffer(t: TensorInfo) -> bool:
    if not t.name.endswith(STALE_BUFFERS):
        return False
    if t.name.endswith(".inv_freq"):
        return len(t.shape) == 1
    return len(t.shape) in (0, 4)  # masks are [1, 1, n, n], masked_bias a scalar; real biases 1-D


def merge(plan: MergePlan, out_dir: Path,
          on_tensor: Callable[[str], None] | None = None) -> MergeResult:
    """Write the merged model to ``out_dir`` (which must exist and be empty)."""
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tensors = n_merged = n_deq = written = 0
    dropped: list[str] = []
    for sf in plan.shards:
        entries = [t for t in sf.ordered() if not is_stale_buffer(t)]
        dropped += [t.name for t in sf.ordered() if is_stale_buffer(t)]
        writer = SafetensorsWriter(out_dir / sf.path.name, entries, sf.metadata or {"format": "pt"})
        try:
            for t in entries:
                writer.begin(t.name)
                upd = plan.updates.get(t.name)
                transposed = t.name in plan.in_out
                # (the shape training saw: [out, in])
                shape = tuple(reversed(t.shape)) if transposed else t.shape
                deq = (plan.quant is not None and t.name.endswith(".weight")
                       and t.dtype in FLOAT_DTYPES and plan.quant.applies_to(t.name[:-7], shape))
                if upd is None and not deq:
                    sf.copy_raw(t, writer.stream)
                    writer.done_raw(t.nbytes)
                else:
                    _merge_tensor(sf, t, upd, plan.quant if deq else None, writer, transposed)
                    n_merged += upd is not None
                    n_deq += deq
                n_tensors += 1
                written += t.nbytes
                if on_tensor:
                    on_tensor(t.name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    copy_side_files(plan.base_dir, out_dir)
    if dropped and (out_dir / INDEX_NAME).is_file():
        index = json.loads((out_dir / INDEX_NAME).read_text())
        for name in dropped:
            (index.get("weight_map") or {}).pop(name, None)
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return MergeResult(out_dir, n_tensors, n_merged, n_deq, written, time.time() - t0,
                       plan.base_description())


def _merge_tensor(sf: SafetensorsFile, t: TensorInfo, upd: Update | None,
                  quant: BaseQuantization | None, writer: SafetensorsWriter,
                  transposed: bool = False) -> None:
    """``transposed``: the weight is stored [in, out] (Conv1D); quantization saw its transpose."""
    rows = t.shape[0]  # only matrices are merged or dequantized
    per_row = max(1, t.numel // max(rows, 1))
    if quant is not None and (transposed or not quant.row_blockable):
        # the whole weight at once: bitsandbytes' double quant is global, and the blocks of
        # a transposed weight run down its columns
        step = rows
    else:
        step = max(1, min(rows, BLOCK_ELEMENTS // per_row))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = sf.read_f32(t, (r0, r1))
        if quant is not None:
            w = np.ascontiguousarray(quant.roundtrip(np.ascontiguousarray(w.T)).T) if transposed \
                else quant.roundtrip(w)
        if upd is not None:
            w += upd.rows(r0, r1)
        writer.write(from_f32(w, t.dtype))


def adapter_files(adapter_dir: Path) -> list[Path]:
    return [adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME]


__all__ = ["MergePlan", "MergeResult", "Update", "plan_merge", "merge", "base_shards", "PEFT_PREFIX"]


F16_MAX = 65504.0


def choose_outtype(model_dir: Path, chunk_elems: int = 1 << 24) -> tuple[str, str]:
    """f16 when every floating-point weight fits its range (bf16 -> f16 is then exact up to
    f16's smallest subnormals, and f16 keeps 3 more mantissa bits through llama.cpp's
    16-bit matrix products), else bf16. Returns (outtype, why). Reads row blocks, not tensors."""
    worst, where = 0.0, ""
    for shard in base_shards(model_dir):
        sf = SafetensorsFile(shard)
        for t in sf.ordered():
            if t.dtype not in FLOAT_DTYPES or not t.shape:
                continue
            rows = t.shape[0]
            per_row = max(1, t.numel // rows)
            step = max(1, chunk_elems // per_row)
            for a in range(0, rows, step):
                m = float(np.abs(sf.read_f32(t, (a, min(rows, a + step)))).max(initial=0.0))
                if m > worst:
                    worst, where = m, t.name
            if worst >= F16_MAX:
                return "bf16", f"{where} holds {worst:.4g}, beyond f16's range"
    return "f16", f"every weight fits f16 (largest |w| = {worst:.4g} in {where or 'none'})"
