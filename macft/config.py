"""Typed configuration: one dataclass per concern, CLI > YAML > defaults.

Every field carries its help text and (optionally) its CLI flag in
``field(metadata=...)``. The CLI builds its flags from these dataclasses, YAML
files use the same names grouped by section::

    model: {name: google/gemma-3-1b-it, quantize: 4bit}
    lora:  {rank: 16, alpha: 32}
    data:  {train: data/train.jsonl, max_seq_len: 1024}
    train: {learning_rate: 2.0e-4, epochs: 3}

All problems (unknown keys, wrong types, values out of range) are collected and
raised together as one :class:`~macft.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .data.textio import encoding_problem
from .errors import ConfigError, MacftError

QUANTIZE_CHOICES = ("none", "4bit", "8bit")
BACKEND_CHOICES = ("auto", "mlx", "cuda")
FORMAT_CHOICES = ("auto", "chat", "sharegpt", "instruction", "completion", "text")
LOSS_ON_CHOICES = ("assistant", "last_assistant", "all")
SCHEDULE_CHOICES = ("cosine", "linear", "constant")
PRECISION_CHOICES = ("auto", "bf16", "fp32", "fp16")
QUANT_TYPES = ("q4_k_m", "q4_0", "q4_k_s", "q5_k_m", "q6_k", "q8_0", "f16", "bf16",
               "q3_k_m", "q2_k", "iq4_xs", "iq3_m")
# "trained" is the name older runs saved for "dequantized".
MERGE_BASE_CHOICES = ("auto", "dequantized", "original", "trained")

# Every attention and MLP projection of the architectures we support; "all-linear"
# resolves to the ones the model actually has.
DEFAULT_LORA_TARGETS = ["all-linear"]


def opt(default: Any, help: str, *, flag: str | None = None, cli: bool = True):
    """A config field with help text. Mutable defaults are copied per instance."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: Optional[str] = opt(
        None, "Base model: a Hugging Face hub id or a local directory (HF safetensors format).",
        flag="--model")
    quantize: Literal["none", "4bit", "8bit"] = opt(
        "none", "Quantize the frozen base model while training (QLoRA): none, 4bit or 8bit.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model.")


@dataclass
class LoraConfig:
    rank: int = opt(16, "LoRA rank r: size of the low-rank update.")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = opt(0.05, "Dropout on the LoRA input during training.")
    targets: list[str] = opt(
        DEFAULT_LORA_TARGETS,
        "Module names to adapt, comma separated (q_proj,v_proj,...); "
        "'all-linear' means every attention and MLP projection.")
    layers: int = opt(-1, "Adapt only the last N transformer blocks; -1 adapts all of them.")


@dataclass
class DataConfig:
    train: Optional[str] = opt(
        None, "Training data: a .jsonl/.json/.csv/.parquet file, a directory holding "
        "train.* (and optionally valid.*), or a Hugging Face dataset id.", flag="--data")
    valid: Optional[str] = opt(None, "Validation data file (same formats as --data).")
    valid_fraction: float = opt(
        0.1, "Share of the training rows held out for validation when no validation file is given.")
    format: Literal["auto", "chat", "sharegpt", "instruction", "completion", "text"] = opt(
        "auto", "Data format; 'auto' detects it from the rows.")
    max_seq_len: int = opt(2048, "Longest example in tokens; longer ones are truncated (see README).")
    loss_on: Literal["assistant", "last_assistant", "all"] = opt(
        "assistant", "Tokens the loss covers: every assistant turn, only the last assistant turn, "
        "or every token.")
    chat_template: Optional[str] = opt(
        None, "Chat template: the tokenizer's own (default; macft's generic '### User' format when "
        "it has none), a named one (rinna, llama2, alpaca, chatml, gemma3, fallback) or a .jinja "
        "file. `macft data inspect` suggests one for models that ship none.")
    packing: bool = opt(
        False, "Pack several examples into one sequence (no attention across examples) "
        "instead of padded batches: random order without padding.")
    group_by_length: bool = opt(
        False, "Batch examples of similar length together (less padding, faster; measured 4-5% higher "
        "validation loss than the default random-order batches, bench/RESULTS.md auto_vs_grid).")
    split: str = opt("train", "Split to read when --data is a Hugging Face dataset id.")
    encoding: str = opt(
        "auto", "Text encoding of JSONL/JSON/CSV data (train, valid and rehearsal files): 'auto' reads "
        "UTF-8 and detects others (Shift-JIS/CP932, EUC-JP, UTF-16) with a note; or force one, "
        "e.g. cp932, euc-jp, utf-16.")
    rehearsal_data: Optional[str] = opt(
        None, "General data mixed into training to limit forgetting (same formats as --data).")
    rehearsal_ratio: float = opt(
        0.0, "Share of each epoch's examples drawn from --rehearsal-data (e.g. 0.2).")


@dataclass
class TrainConfig:
    backend: Literal["auto", "mlx", "cuda"] = opt(
        "auto", "Training backend: mlx (Apple silicon), cuda (PyTorch: NVIDIA GPU, or CPU), auto.")
    output: Optional[str] = opt(None, "Run directory; default runs/<model>-<date>.")
    batch_size: int = opt(4, "Examples per micro-batch (packed sequences when packing).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "Learning-rate decay after warm-up.")
    warmup_ratio: float = opt(0.05, "Share of optimizer steps spent warming the learning rate up.")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this value; 0 disables clipping.")
    iters: int = opt(0, "Optimizer steps to train; 0 means use --epochs.")
    epochs: float = opt(3.0, "Passes over the training data (when --iters is 0).")
    eval_every: int = opt(50, "Compute the validation loss every N optimizer steps (0: only at the end).")
    early_stop: int = opt(
        0, "Stop when the validation loss has not improved for N evaluations in a row (0: never); "
        "the run's adapter/ is then its best one (best_adapter/).")
    save_every: int = opt(100, "Write a resumable checkpoint every N optimizer steps (0: only at the end).")
    log_every: int = opt(10, "Report the training loss every N optimizer steps.")
    seed: int = opt(0, "Random seed (data order, LoRA init, dropout).")
    grad_checkpoint: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    distill_weight: float = opt(
        0.0, "Forgetting control (LwF): add this weight times KL(fine-tuned || base) over the batch's "
        "tokens; the base logits come from the same model with its adapters switched off.")
    distill_temperature: float = opt(1.0, "Softmax temperature of the distillation KL.")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = opt(
        "auto", "Compute precision: auto picks bf16 on GPUs / Apple silicon that support it, "
        "fp32 on CPUs. Gemma-3 never runs in fp16.")


@dataclass
class ExportConfig:
    quant: list[str] = opt(["q4_k_m"], f"GGUF quantization types, comma separated: {', '.join(QUANT_TYPES)}.")
    outtype: Literal["auto", "bf16", "f16"] = opt(
        "auto", "Type of the 16-bit GGUF converted from the merged model; auto: f16 when every weight "
        "fits its range (more precise), else bf16.")
    merge_base: Literal["auto", "dequantized", "original", "trained"] = opt(
        "auto", "QLoRA adapters: merge into the base as training saw it (dequantized), into the "
        "original 16-bit weights, or auto: both, measured against the training-time model on the "
        "validation data, keeping the closer ('trained' = dequantized).")
    imatrix: str = opt(
        "auto", "Importance matrix for the K- and i-quants: auto (computed with llama-imatrix from "
        "the run's own training conversations), a file made by llama-imatrix, or off "
        "(--no-imatrix).")
    lora_gguf: bool = opt(False, "Also write the adapter alone as a GGUF LoRA.")
    llama_cpp: Optional[str] = opt(
        None, "Your own llama.cpp checkout (with built tools) instead of the pinned one.")
    keep_intermediate: bool = opt(False, "Keep the merged HF model and the 16-bit GGUF.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "export": ExportConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldSpec:
    section: str
    name: str
    type: Any
    default: Any
    help: str
    flag: str
    cli: bool

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def dest(self) -> str:
        return f"{self.section}__{self.name}"


def field_specs(sections: tuple[str, ...] | None = None) -> list[FieldSpec]:
    """All config fields (optionally of some sections), with their CLI flags."""
    out = []
    for sec, cls in SECTIONS.items():
        if sections is not None and sec not in sections:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f.metadata.get("flag") or (
                f"--lora-{_kebab(f.name)}" if sec == "lora" else f"--{_kebab(f.name)}")
            out.append(FieldSpec(sec, f.name, hints[f.name], default, f.metadata["help"], flag,
                                 f.metadata.get("cli", True)))
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return type_name(args[0]) + " or null"
    if origin is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp))


def coerce(value: Any, tp: Any, from_text: bool = False) -> Any:
    """Convert ``value`` to ``tp`` or raise ``ValueError`` with what was expected.

    ``from_text``: the value came from the command line, so strings are parsed
    ("3" -> 3, "a,b" -> ["a", "b"]). YAML values must already have the right type
    (YAML itself parses numbers and booleans), except that integers are accepted
    for floats and a single string for a list.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_text and value in ("none", "null", "")):
            return None
        return coerce(value, args[0], from_text)
    if origin is Literal:
        choices = typing.get_args(tp)
        v = value.strip().lower() if isinstance(value, str) else value
        if v not in choices:
            raise ValueError(f"expected {type_name(tp)}")
        return v
    if origin is list:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("expected a list of strings (or one comma-separated string)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError("expected a number")
        if not math.isfinite(number):  # float() takes "nan" and "inf"; no setting means them
            raise ValueError("expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("expected a string")
    raise TypeError(f"unsupported config type {tp!r}")


# --------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MacftError(f"Config file {p} does not exist.", "Check the path given to --config.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise MacftError(f"{p}{where}: invalid YAML: {getattr(e, 'problem', e)}",
                         "Fix the YAML syntax at that line.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MacftError(f"{p}: expected a mapping of sections (model, lora, data, train, export), "
                         f"found {type(data).__name__}.")
    return data


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def apply_mapping(cfg: RunConfig, data: dict[str, Any], source: str, problems: list[str]) -> None:
    """Apply a nested {section: {key: value}} mapping onto ``cfg``, collecting problems."""
    specs = {s.key: s for s in field_specs()}
    by_name: dict[str, list[str]] = {}
    for s in specs.values():
        by_name.setdefault(s.name, []).append(s.key)
    for sec, body in data.items():
        if sec == "resolved":  # written by macft into run directories; informational
            continue
        if sec not in SECTIONS:
            if sec in by_name:
                problems.append(f"'{sec}' is not a section; put it under '{by_name[sec][0].split('.')[0]}:' "
                                f"(as {by_name[sec][0]})")
            else:
                problems.append(f"unknown section '{sec}'{_suggest(sec, list(SECTIONS))}; "
                                f"sections are {', '.join(SECTIONS)}")
            continue
        if not isinstance(body, dict):
            problems.append(f"section '{sec}' must be a mapping of keys, found {type(body).__name__}")
            continue
        for key, value in body.items():
            full = f"{sec}.{key}"
            spec = specs.get(full)
            if spec is None:
                names = [s.name for s in specs.values() if s.section == sec]
                sug = _suggest(str(key), names)
                if not sug:
                    sug = _suggest(full, list(specs))
                problems.append(f"unknown key '{full}'{sug}")
                continue
            try:
                setattr(getattr(cfg, sec), key, coerce(value, spec.type))
            except ValueError as e:
                problems.append(f"{full}: {e}, got {value!r} ({type(value).__name__})")


def build_config(
    yaml_path: str | Path | None = None,
    cli_values: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve defaults < ``base`` (e.g. a preset or a saved run) < YAML < CLI.

    ``cli_values`` maps ``"section.name"`` to raw command-line strings (or values).
    Raises one ConfigError with every problem found.
    """
    cfg = RunConfig()
    problems: list[str] = []
    if base:
        apply_mapping(cfg, base, "base", problems)
    source = None
    if yaml_path:
        source = str(yaml_path)
        apply_mapping(cfg, read_yaml(yaml_path), source, problems)
    specs = {s.key: s for s in field_specs()}
    for key, raw in (cli_values or {}).items():
        spec = specs[key]
        try:
            setattr(getattr(cfg, spec.section), spec.name, coerce(raw, spec.type, from_text=True))
        except ValueError as e:
            problems.append(f"{spec.flag}: {e}, got {raw!r}")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: RunConfig, require: tuple[str, ...] = ()) -> None:
    """Check ranges and required keys; raise one ConfigError listing every problem."""
    p: list[str] = []
    specs = {s.key: s for s in field_specs()}
    for key in require:
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) in (None, ""):
            p.append(f"{key} is required (flag {specs[key].flag})")
    lo, da, tr, ex = cfg.lora, cfg.data, cfg.train, cfg.export
    # NaN passes every range check below (each comparison is False) and inf passes some:
    # refuse non-finite numbers first, and check ranges only on finite ones.
    nonfinite: set[str] = set()
    for spec in specs.values():
        v = getattr(getattr(cfg, spec.section), spec.name)
        if isinstance(v, float) and not math.isfinite(v):
            nonfinite.add(spec.key)
            p.append(f"{spec.key} must be a finite number, got {v} (flag {spec.flag})")
    if nonfinite:
        cfg = _finite_copy(cfg, nonfinite)
        lo, da, tr, ex = cfg.lora, cfg.data, cfg.train, cfg.export
    if lo.rank < 1:
        p.append(f"lora.rank must be at least 1, got {lo.rank}")
    if lo.alpha <= 0:
        p.append(f"lora.alpha must be positive, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if lo.layers == 0 or lo.layers < -1:
        p.append(f"lora.layers must be -1 (all) or a positive number of blocks, got {lo.layers}")
    if not lo.targets:
        p.append("lora.targets is empty; use 'all-linear' or module names such as q_proj,v_proj")
    if not 0 <= da.valid_fraction <= 0.5:
        p.append(f"data.valid_fraction must be between 0 and 0.5, got {da.valid_fraction}")
    if da.max_seq_len < 16:
        p.append(f"data.max_seq_len must be at least 16 tokens, got {da.max_seq_len}")
    if tr.batch_size < 1:
        p.append(f"train.batch_size must be at least 1, got {tr.batch_size}")
    if tr.grad_accum < 1:
        p.append(f"train.grad_accum must be at least 1, got {tr.grad_accum}")
    if not 0 < tr.learning_rate < 1:
        p.append(f"train.learning_rate must be in (0, 1), got {tr.learning_rate}")
    if not 0 <= tr.warmup_ratio < 1:
        p.append(f"train.warmup_ratio must be in [0, 1), got {tr.warmup_ratio}")
    if tr.iters < 0:
        p.append(f"train.iters must be 0 (use epochs) or positive, got {tr.iters}")
    if tr.iters == 0 and tr.epochs <= 0:
        p.append(f"train.epochs must be positive when train.iters is 0, got {tr.epochs}")
    for k in ("eval_every", "early_stop", "save_every"):
        if getattr(tr, k) < 0:
            p.append(f"train.{k} must be 0 or positive, got {getattr(tr, k)}")
    if tr.log_every < 1:
        p.append(f"train.log_every must be at least 1, got {tr.log_every}")
    if tr.max_grad_norm < 0:
        p.append(f"train.max_grad_norm must be 0 (off) or positive, got {tr.max_grad_norm}")
    if not 0 <= da.rehearsal_ratio < 1:
        p.append(f"data.rehearsal_ratio must be in [0, 1), got {da.rehearsal_ratio}")
    if da.rehearsal_ratio > 0 and not da.rehearsal_data:
        p.append("data.rehearsal_ratio is set but data.rehearsal_data is not (flag --rehearsal-data)")
    if tr.distill_weight < 0:
        p.append(f"train.distill_weight must be 0 or positive, got {tr.distill_weight}")
    if tr.distill_temperature <= 0:
        p.append(f"train.distill_temperature must be positive, got {tr.distill_temperature}")
    if tr.weight_decay < 0:
        p.append(f"train.weight_decay must be 0 or positive, got {tr.weight_decay}")
    if (why := encoding_problem(da.encoding)) is not None:
        p.append(f"data.encoding: {why} (flag --encoding)")
    bad = [q for q in ex.quant if q.lower() not in QUANT_TYPES]
    if bad:
        p.append(f"export.quant: unknown type(s) {', '.join(bad)}; valid: {', '.join(QUANT_TYPES)}")
    if p:
        raise ConfigError(p)


def _finite_copy(cfg: RunConfig, keys: set[str]) -> RunConfig:
    """``cfg`` with the fields ``keys`` back at their defaults (their problem is already listed)."""
    defaults = RunConfig()
    sections = {}
    for sec in SECTIONS:
        names = {k.split(".")[1] for k in keys if k.startswith(sec + ".")}
        part = getattr(cfg, sec)
        if names:
            part = dataclasses.replace(part, **{n: getattr(getattr(defaults, sec), n) for n in names})
        sections[sec] = part
    return RunConfig(**sections)


# --------------------------------------------------------------------------- saving


def dump_yaml(cfg: RunConfig, resolved: dict[str, Any] | None = None) -> str:
    import yaml

    data: dict[str, Any] = cfg.to_dict()
    if resolved:
        data["resolved"] = resolved
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The README's config reference table, generated from the dataclasses (a test keeps it in sync)."""
    lines = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for s in field_specs():
        d = ",".join(s.default) if isinstance(s.default, list) else s.default
        d = "—" if d is None else f"`{d}`"
        lines.append(f"| `{s.key}` | `{s.flag}` | {d} | {s.help} |")
    return "\n".join(lines)
