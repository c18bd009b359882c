"""Test and benchmark helpers: adapters and run directories for local tiny models.

- :func:`random_adapter`: a PEFT adapter with random, non-zero A and B (numpy only).
- :func:`train_adapter`: a PEFT LoRA adapter actually trained for a few steps with peft on
  CPU (fp32), so the model answers in the data's style and ends its turns: verification
  then has something real to compare.
- :func:`write_run_dir`: a run directory as ``macft train`` writes it, around an adapter.

Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from macft.adapter import AdapterSpec, write_peft_adapter

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_weights(base_dir: Path) -> dict[str, tuple[int, ...]]:
    from .merge import base_shards
    from .safetensors_io import SafetensorsFile

    out = {}
    for p in base_shards(base_dir):
        for name, t in SafetensorsFile(p).tensors.items():
            if name.endswith(".weight") and len(t.shape) == 2 and name.split(".")[-2] in PROJ:
                out[name[:-7]] = t.shape
    return out


def random_adapter(base_dir: Path, out: Path, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                   b_scale: float = 0.05, base_name: str | None = None) -> Path:
    """Random LoRA on every attention / MLP projection of ``base_dir`` (PEFT format)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for name, (o, i) in sorted(_linear_weights(base_dir).items()):
        a = rng.standard_normal((rank, i), dtype=np.float32) / np.sqrt(i)
        b = rng.standard_normal((o, rank), dtype=np.float32) * b_scale
        modules[name] = (a, b)
    spec = AdapterSpec(base_name or str(base_dir), rank, alpha, 0.0, sorted({n.split(".")[-1] for n in modules}))
    write_peft_adapter(out, modules, spec)
    return out


def train_adapter(base_dir: Path, data_file: Path, out: Path, *, steps: int = 120, lr: float = 3e-3,
                  rank: int = 8, batch: int = 8, seed: int = 0, quantize_4bit: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter with peft on CPU (fp32; optionally on a bitsandbytes NF4 base).

    Returns {"losses": [...]}; the adapter is saved (PEFT format) to ``out``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from macft.data.dataset import load_samples
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    from .reference import flush_denormals

    torch.manual_seed(seed)
    tok = load_tokenizer(str(base_dir))
    rend = Renderer(tok)
    _, samples = load_samples(str(data_file))
    examples = [rend.render(s) for s in samples]
    kw: dict[str, Any] = {"dtype": torch.float32}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kw)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=list(PROJ)))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    # Without flushing denormals a random-init model spends seconds per step on them
    # (measured here: 11 s instead of 0.15 s for the first steps).
    with flush_denormals(torch):
        for _ in range(steps):
            losses.append(_step(peft_model, opt, examples, rng, batch))
    peft_model.save_pretrained(str(out))
    return {"losses": losses}


def _step(peft_model: Any, opt: Any, examples: list, rng: Any, batch: int) -> float:
    import torch

    idx = rng.choice(len(examples), min(batch, len(examples)), replace=False)
    length = max(len(examples[i].ids) for i in idx)
    ids = torch.zeros(len(idx), length, dtype=torch.long)
    att = torch.zeros(len(idx), length, dtype=torch.long)
    lab = torch.full((len(idx), length), -100, dtype=torch.long)
    for j, i in enumerate(idx):
        e = examples[i]
        n = len(e.ids)
        ids[j, :n] = torch.tensor(e.ids)
        att[j, :n] = 1
        m = torch.tensor(e.mask, dtype=torch.bool)
        lab[j, :n] = torch.where(m, torch.tensor(e.ids), torch.tensor(-100))
    loss = peft_model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def write_run_dir(run_dir: Path, base_dir: Path, adapter_dir: Path, data_dir: Path, *,
                  base_quantization: dict | None = None, chat_template: str = "model",
                  fallback_template: str | None = None, end_tokens: list[str] | None = None,
                  quantize: str = "none", fingerprint: bool = False) -> Path:
    """A run directory like ``macft train`` writes (config.yaml, adapter/, metrics.jsonl);
    ``fingerprint``: with the base's fingerprint recorded, as ``macft train`` now does."""
    from macft.config import build_config, dump_yaml
    from macft.run import ADAPTER, CONFIG, METRICS, QUANTIZATION

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(base={"model": {"name": str(base_dir), "quantize": quantize},
                             "data": {"train": str(data_dir / "train.jsonl"), "valid": str(data_dir / "valid.jsonl")},
                             "train": {"backend": "cuda", "output": str(run_dir)}})
    config = json.loads((base_dir / "config.json").read_text())
    resolved = {
        "backend": "cuda", "device": "CPU", "model_path": str(base_dir),
        "model_type": config.get("model_type"), "architectures": config.get("architectures"),
        "chat_template": chat_template, "fallback_template": fallback_template,
        "end_tokens": end_tokens or ["<end_of_turn>", "<eos>"], "data_format": "chat",
    }
    if fingerprint:
        from macft.fingerprint import base_fingerprint

        resolved["base_fingerprint"] = base_fingerprint(base_dir)
    (run_dir / CONFIG).write_text(dump_yaml(cfg, resolved), encoding="utf-8")
    shutil.copytree(adapter_dir, run_dir / ADAPTER, dirs_exist_ok=True)
    (run_dir / METRICS).write_text(json.dumps({"type": "eval", "step": 1, "val_loss": 1.0}) + "\n")
    if base_quantization is not None:
        (run_dir / QUANTIZATION).write_text(json.dumps(base_quantization, indent=2))
    return run_dir
