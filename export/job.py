"""What to export, resolved and checked before anything is written.

Every check that can fail on bad input runs here, so a refused export leaves nothing behind:
the run or adapter, the base model, the quantization types, the output location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft.adapter import CONFIG_NAME, WEIGHTS_NAME
from macft.config import RunConfig, build_config
from macft.errors import MacftError
from macft.run import Resolved, Run, open_run

from .dequant import BaseQuantization, read_base_quantization
from .imatrix import ImatrixPlan, plan_imatrix
from .quantize import parse_quant_types


@dataclass
class ExportOptions:
    quants: list[str] = field(default_factory=lambda: ["q4_k_m"])
    outtype: str = "auto"
    merge_base: str = "auto"  # auto | dequantized | original
    imatrix: str = "auto"  # auto | off | a file
    lora_gguf: bool = False
    keep_intermediate: bool = False
    llama_cpp: str | None = None
    prompts_file: str | None = None
    n_prompts: int = 8
    max_new_tokens: int = 48
    eval_tokens: int = 4096
    threads: int = 0
    verify: bool = True
    force: bool = False  # merge into a base whose weights differ from the recorded fingerprint
    # Tests switch this off to show that verification catches the converter's special-token bug.
    restore_special_tokens: bool = True


@dataclass
class ExportJob:
    adapter_dir: Path
    base: str
    output: Path
    name: str
    options: ExportOptions
    run: Run | None = None  # --run RUN (None: --adapter DIR --model BASE)
    recorded_quant: BaseQuantization | None = None  # how training quantized the base, if it did
    imatrix_plan: ImatrixPlan = field(default_factory=lambda: ImatrixPlan("off"))

    @property
    def run_dir(self) -> Path | None:
        return self.run.path if self.run else None

    @property
    def cfg(self) -> RunConfig | None:
        return self.run.config if self.run else None

    @property
    def resolved(self) -> Resolved:
        """What training resolved (empty for an adapter made elsewhere)."""
        return self.run.resolved if self.run else Resolved()

    @property
    def merge_bases(self) -> list[str]:
        """The merges to make: both for a QLoRA run under --merge-base auto (measured, the
        closer kept), else the one asked for; a run without a quantized base has one."""
        if self.recorded_quant is None:
            return ["as stored"]
        if self.options.merge_base == "auto":
            return ["dequantized", "original"]
        return [self.options.merge_base]

    def merge_quant(self, base: str) -> BaseQuantization | None:
        """The roundtrip the merge into ``base`` applies (None: the weights as stored)."""
        return self.recorded_quant if base == "dequantized" else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def check_adapter_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise MacftError(f"{what} {path} does not exist.",
                         "Pass the adapter/ directory of a run (or --run RUN), or a PEFT LoRA adapter.")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())[:8]
        raise MacftError(f"{path} is not a PEFT LoRA adapter: {', '.join(missing)} missing "
                         f"(found: {', '.join(present) or 'nothing'}).",
                         "Pass a directory holding adapter_config.json and adapter_model.safetensors.")


def check_output(output: Path) -> None:
    """The output must be (or become) a directory: not a file, nor below one."""
    for p in (output, *output.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "--output" if p == output else f"--output {output} lies below"
                raise MacftError(f"{what} {p} is a file, not a directory.",
                                 "Pass a directory for --output (a new one is created), or move the file away.")
            return


def resolve_job(*, run: str | None, adapter: str | None, model: str | None, output: str | None,
                name: str | None, best: bool, export_values: dict[str, Any],
                options: ExportOptions) -> ExportJob:
    """The export to do, from command-line values (``export_values``: 'export.*' keys)."""
    if run and adapter:
        raise MacftError("--run and --adapter are alternatives; pass one of them.",
                         "--run RUN for a macft run, or --adapter DIR --model BASE for an adapter made elsewhere.")
    if not run and not adapter:
        raise MacftError("Nothing to export: pass --run RUN (a `macft train` run directory) or "
                         "--adapter DIR --model BASE.")
    cfg: RunConfig | None = None
    the_run: Run | None = None
    if run:
        the_run = open_run(run)
        cfg = the_run.config
        try:
            adapter_dir = the_run.adapter(best)
        except MacftError as problem:
            raise MacftError(f"{the_run.path} has no adapter to export. {problem.message}", problem.hint) from None
        check_adapter_dir(adapter_dir, "Adapter")
        base = model or the_run.base_model
        if not base:
            raise MacftError(f"The run in {the_run.path} names no base model.", "Pass --model BASE.")
        default_out = the_run.export_dir
        default_name = _slug(the_run.path.resolve().name)
    else:
        adapter_dir = Path(adapter)  # type: ignore[arg-type]
        check_adapter_dir(adapter_dir, "Adapter")
        if not model:
            raise MacftError("--adapter needs --model: the base model the adapter was trained on.",
                             "Add --model DIR_OR_HUB_ID.")
        base = model
        default_out = adapter_dir.parent / f"{_slug(adapter_dir.resolve().name)}-export"
        default_name = _slug(Path(str(model).rstrip("/")).name) + "-lora"
    # export settings: the run's saved export section < command line
    saved = {"export": (cfg.to_dict()["export"] if cfg else {})}
    raw = export_values.get("export.quant")
    ecfg = build_config(base=saved, cli_values={k: v for k, v in export_values.items() if k != "export.quant"})
    quants_in = str(raw).split(",") if raw is not None else ecfg.export.quant
    options.quants = parse_quant_types(quants_in)
    options.outtype = ecfg.export.outtype
    options.merge_base = {"trained": "dequantized"}.get(ecfg.export.merge_base, ecfg.export.merge_base)
    options.imatrix = ecfg.export.imatrix
    options.lora_gguf = ecfg.export.lora_gguf
    options.keep_intermediate = ecfg.export.keep_intermediate
    options.llama_cpp = ecfg.export.llama_cpp
    if options.prompts_file and not Path(options.prompts_file).is_file():
        raise MacftError(f"--prompts {options.prompts_file} does not exist.",
                         'Pass a JSONL file of chat rows ({"messages": [...]}) or prompt/completion rows.')
    out_path = Path(output) if output else default_out
    check_output(out_path)
    recorded = read_base_quantization(the_run.path if the_run else None)
    imatrix = plan_imatrix(options.imatrix, options.quants, cfg, from_run=the_run is not None)
    return ExportJob(adapter_dir=adapter_dir, base=str(base), output=out_path,
                     name=_slug(name) if name else default_name, options=options, run=the_run,
                     recorded_quant=recorded, imatrix_plan=imatrix)
