"""`macft models`: presets, and the architectures each backend can train."""

from __future__ import annotations

import argparse
import importlib.util
import json
import pkgutil
from typing import Any

from rich.table import Table

from ..presets import PRESETS
from ..ui import console, out

# The families macft names first; "tested" ones are trained end to end in macft's test suite
# (tiny random-init models of that architecture), the others load through the same code paths.
TESTED = {"gemma3_text": "Gemma-3 1B", "gemma3": "Gemma-3 4B+ (text part)", "qwen2": "Qwen2 / Qwen2.5",
          "llama": "Llama 2/3", "mistral": "Mistral", "qwen3": "Qwen3"}
TRAINED_IN_TESTS = {"gemma3_text", "qwen2"}


def mlx_architectures() -> list[str] | None:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    models = [m.name for m in pkgutil.iter_modules([p + "/models" for p in spec.submodule_search_locations])]
    skip = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "ssm", "mla",
            "gated_delta", "bitlinear_layers"}
    return sorted(m for m in models if m not in skip)


def torch_architectures() -> list[str] | None:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def report() -> dict[str, Any]:
    return {
        "presets": {p.name: {"hub_id": p.hub_id, "description": p.description, "end_tokens": list(p.end_tokens),
                             "config": p.config, "notes": list(p.notes)} for p in PRESETS.values()},
        "families": TESTED,
        "trained_in_tests": sorted(TRAINED_IN_TESTS),
        "backends": {"mlx": mlx_architectures(), "cuda": torch_architectures()},
    }


def run(args: argparse.Namespace) -> int:
    rep = report()
    if args.json:
        out.print_json(json.dumps(rep))
        return 0
    t = Table(title="Presets (macft train --preset NAME)")
    for c in ("preset", "model", "settings", "end tokens"):
        t.add_column(c)
    for p in PRESETS.values():
        c = p.config
        settings = (f"rank {c['lora']['rank']}, lr {c['train']['learning_rate']:g}, {c['train']['epochs']:g} epochs, "
                    f"max len {c['data']['max_seq_len']}, quantize {c['model'].get('quantize', 'none')}")
        t.add_row(p.name, f"{p.hub_id}\n[dim]{p.description}[/]", settings, ", ".join(p.end_tokens))
    console.print(t)
    t = Table(title="Architectures")
    t.add_column("model_type")
    t.add_column("family")
    t.add_column("mlx")
    t.add_column("cuda (PyTorch)")
    t.add_column("trained in macft's tests")
    mlx, cuda = rep["backends"]["mlx"], rep["backends"]["cuda"]
    for mt, fam in TESTED.items():
        t.add_row(mt, fam, _mark(mlx, mt), _mark(cuda, mt), "yes" if mt in TRAINED_IN_TESTS else "-")
    console.print(t)
    for name, arch in (("mlx", mlx), ("cuda", cuda)):
        if arch is None:
            console.print(f"[dim]{name}: not installed here (pip install 'macft[{name}]')[/]")
        else:
            others = [a for a in arch if a not in TESTED]
            console.print(f"[bold]{name}[/] also loads {len(others)} more architectures: "
                          f"{', '.join(others[:40])}{' ...' if len(others) > 40 else ''}")
    console.print("Export additionally needs llama.cpp's converter to know the architecture.")
    return 0


def _mark(arch: list[str] | None, mt: str) -> str:
    if arch is None:
        return "[dim]not installed[/]"
    target = {"mistral": "llama"}.get(mt, mt) if arch and "mistral" not in arch else mt
    return "[green]yes[/]" if target in arch or mt in arch else "[red]no[/]"
