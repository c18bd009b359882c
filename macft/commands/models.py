"""`macft models`: presets, and the architectures each backend can train."""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any

from rich.table import Table

from ..presets import PRESETS
from ..support import CHECKPOINTS, YES
from ..ui import console, out

HELP = "List the presets and the model architectures each backend supports."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")


def mlx_architectures() -> list[str]:
    """model_types the MLX backend trains (explicit config mapping for each)."""
    from ..mlx_backend.supported import SUPPORTED

    return sorted(SUPPORTED)


def torch_architectures() -> list[str] | None:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def report() -> dict[str, Any]:
    return {
        "presets": {p.name: {"hub_id": p.hub_id, "description": p.description, "end_tokens": list(p.end_tokens),
                             "config": p.config, "notes": list(p.notes)} for p in PRESETS.values()},
        "checkpoints": [c.__dict__ for c in CHECKPOINTS],
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
    t = Table(title="Published checkpoints, end to end in macft's conformance suite")
    for c in ("checkpoint", "architecture", "chat template", "mlx", "cuda (PyTorch)", "export (GGUF)"):
        t.add_column(c)
    for c in CHECKPOINTS:
        t.add_row(c.hub_id, c.architecture, "its own" if c.chat_template == "model" else c.chat_template,
                  _mark(c.mlx), _mark(c.cuda), _mark(c.export))
    console.print(t)
    for c in CHECKPOINTS:
        for what in ("mlx", "cuda", "export"):
            if getattr(c, what) != YES:
                console.print(f"  {c.hub_id}, {what}: {getattr(c, what)}")
    from ..mlx_backend.supported import SUPPORTED

    console.print("[bold]mlx[/] trains: " + "; ".join(SUPPORTED.values()))
    cuda = rep["backends"]["cuda"]
    if cuda is None:
        console.print("[dim]cuda: not installed here (pip install 'macft[cuda]')[/]")
    else:
        console.print(f"[bold]cuda[/] (PyTorch) loads every causal LM transformers knows ({len(cuda)} model types).")
    console.print("Export additionally needs llama.cpp's converter to know the architecture.")
    return 0


def _mark(value: str) -> str:
    return "[green]yes[/]" if value == YES else "[red]no[/] (below)"
