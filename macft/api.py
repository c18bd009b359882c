"""macft in Python: train, reopen, chat, export and estimate without the command line.

The ``macft`` commands are thin adapters over these functions (command line -> config ->
call -> printing), so both do the same thing by the same rules::

    import macft

    run = macft.train(model="google/gemma-3-1b-it", data="examples/data/nya_chat",
                      output="runs/nya", iters=200, learning_rate=1e-4)
    run = macft.open_run("runs/nya")              # the same run, later
    with macft.load_chat_model(run) as chat:
        print(chat.generate("What is the capital of France?").text)
    result = macft.export(run, quant=["q4_k_m", "q8_0"])
    print(result.files, result.report.files[0].agreement)
    print(macft.estimate(model="google/gemma-3-4b-it", batch_size=8).fits)

Options are named as the command-line flags, with underscores (``--batch-size`` ->
``batch_size``, ``--lora-rank`` -> ``lora_rank``); an unknown name is refused with a
:class:`~macft.errors.ConfigError` naming the close ones. Settings resolve as on the command
line: defaults < ``preset`` < ``config`` (a YAML file or a whole :class:`RunConfig`) < options.

Nothing is printed unless ``verbose=True``: macft's warnings arrive as Python warnings
(:mod:`warnings`), its errors as :class:`~macft.errors.MacftError` exceptions.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunConfig, field_specs
from .errors import ConfigError, MacftError
from .run import CONFIG, Run, open_run
from .ui import silenced

if TYPE_CHECKING:
    from .commands.estimate import EstimateReport
    from .inference import Generation
    from .training.events import TrainingCallback

__all__ = ["Chat", "ExportReport", "ExportResult", "ExportedFile", "Run", "RunConfig", "estimate", "export",
           "load_chat_model", "open_run", "train"]

TRAIN_SECTIONS = ("model", "lora", "data", "train")


# --------------------------------------------------------------------------- options


def option_name(flag: str) -> str:
    """The Python name of a command-line flag: ``--lora-rank`` -> ``lora_rank``."""
    return flag.lstrip("-").replace("-", "_")


def config_values(where: str, options: dict[str, Any], sections: tuple[str, ...],
                  others: Sequence[str] = ()) -> dict[str, Any]:
    """``options`` (named as the flags of the ``sections``' config fields) as config values
    (``"section.name"`` keys). Unknown names are refused all at once, with the close ones among
    the fields and ``others`` (the function's other parameters)."""
    specs = {option_name(s.flag): s for s in field_specs(sections)}
    values: dict[str, Any] = {}
    problems = []
    for name, value in options.items():
        spec = specs.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, [*specs, *others], n=3, cutoff=0.6)
            problems.append(f"unknown option '{name}'"
                            + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
            continue
        values[spec.key] = _plain(value)
    if problems:
        raise ConfigError(problems, where)
    return values


def _plain(value: Any) -> Any:
    """Paths as strings, tuples as lists: what the config's types take."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _config_source(config: RunConfig | str | os.PathLike | None) -> tuple[RunConfig | None, str | None]:
    """(a whole config, a YAML file) from ``config``."""
    if config is None or isinstance(config, RunConfig):
        return config, None
    if isinstance(config, (str, os.PathLike)):
        return None, os.fspath(config)
    raise MacftError(f"config must be a RunConfig or the path of a YAML file, got {type(config).__name__}.")


def _run_path(run: Run | str | os.PathLike) -> str:
    return str(run.path) if isinstance(run, Run) else os.fspath(run)


# --------------------------------------------------------------------------- train


def train(config: RunConfig | str | os.PathLike | None = None, *, preset: str | None = None,
          resume: Run | str | os.PathLike | None = None, force: bool = False,
          callbacks: Sequence[TrainingCallback] | None = None, verbose: bool = False,
          auto: bool = False, auto_budget: str | float | None = None, **options: Any) -> Run:
    """Fine-tune a model (``macft train``); returns the finished :class:`Run`.

    ``config``: a :class:`RunConfig` or a YAML file; ``options``: config settings named as the
    flags (``model``, ``data``, ``output``, ``iters``, ``batch_size``, ``learning_rate``,
    ``backend``, ``seed``, ``lora_rank``, ...); ``preset``: start from a preset (see
    ``macft models``); ``resume``: continue an interrupted run (only iters, epochs, eval_every,
    save_every and log_every may change); ``force``: train even when the memory estimate says
    it will not fit, or resume on other base weights; ``callbacks``:
    :class:`~macft.training.events.TrainingCallback` objects that see every event after the
    built-in ones (progress, metrics.jsonl, loss.png). ``auto``: search the learning rate, rank
    and epochs first (``macft train --auto``; ``auto_budget`` as ``--auto-budget``); the
    options given, and every setting of ``config``, are kept as they are.

    The run directory is ``output`` (default ``runs/<model>-<date>``, from the working
    directory). Interrupted (Ctrl-C), training stops at a checkpoint and the run is returned
    unfinished: ``run.summary()["interrupted"]`` is True and ``train(resume=run)`` continues it.
    """
    from .commands import train as command

    values = config_values("macft.train()", options, TRAIN_SECTIONS,
                           ("config", "preset", "resume", "force", "callbacks", "verbose", "auto",
                            "auto_budget"))
    base, config_file = _config_source(config)
    resume_dir = _run_path(resume) if resume is not None else None
    request = None
    if auto:
        from .auto.driver import AutoRequest, explicit_keys
        from .auto.plan import Budget

        request = AutoRequest(Budget.parse(auto_budget), explicit=explicit_keys(values, config_file, base))
    with silenced(not verbose):
        cfg, ckpt = command.resolve(values, config_file=config_file, preset=preset, resume=resume_dir,
                                    base=base)
        done = command.train(cfg, ckpt, command.TrainOptions(
            preset=preset, resume=Path(resume_dir) if resume_dir else None, force=force,
            callbacks=list(callbacks or []), auto=request))
    return open_run(done.run_dir)


# --------------------------------------------------------------------------- estimate


def estimate(config: RunConfig | str | os.PathLike | None = None, *, preset: str | None = None,
             calibrate_steps: int = 4, verbose: bool = False, **options: Any) -> EstimateReport:
    """Predict a training's peak memory part by part (``macft estimate``), before any weight
    is loaded; returns an :class:`~macft.commands.estimate.EstimateReport` (``.parts_bytes``,
    ``.total_bytes``, ``.budget_bytes``, ``.fits``, ``.suggestions`` that fit when it does not).

    Options as for :func:`train`. With ``data``, the estimate uses the data's real largest
    batch, and ``calibrate_steps`` > 0 also trains that many steps in a throw-away directory
    to time an epoch (``.calibration``; this loads the weights); 0: memory only."""
    from .commands import estimate as command

    values = config_values("macft.estimate()", options, TRAIN_SECTIONS,
                           ("config", "preset", "calibrate_steps", "verbose"))
    base, config_file = _config_source(config)
    with silenced(not verbose):
        cfg = command.resolve(values, config_file=config_file, preset=preset, base=base)
        return command.estimate_and_show(cfg, preset=preset, calibrate_steps=calibrate_steps)


# --------------------------------------------------------------------------- export


@dataclass
class ExportedFile:
    """One GGUF file of an export and how it compared with the Hugging Face model it was made
    from (None: not verified, or not measured for this kind of file)."""

    file: str  # its name in the output directory
    kind: str  # the quant type, "f16"/"bf16" (16-bit), or "lora"
    size: int  # bytes
    agreement: float | None = None  # share of the reference's greedy tokens reproduced
    identical: int | None = None  # greedy generations identical to the reference's
    generations: int = 0
    same_top: float | None = None  # next-token (argmax) agreement over the validation tokens
    perplexity: float | None = None  # on the validation tokens
    ref_perplexity: float | None = None
    kl_divergence: float | None = None
    stop_rate: float | None = None  # share of the answers that ended on an end token
    ref_stop_rate: float | None = None
    tokenization_ok: bool | None = None  # llama.cpp tokenizes the prompts as transformers does
    base_gguf: str | None = None  # a GGUF LoRA: the base GGUF it was checked on
    ppl_ratio: float | None = None  # perplexity / the reference's
    imatrix: bool | None = None  # quantized with the importance matrix (None: a type that ignores it)
    without_imatrix: dict[str, Any] | None = None  # the same type without it, on the same tokens
    imatrix_kl_change: float | None = None  # KL with / KL without - 1 (negative: the matrix helped)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # tensors llama.cpp gave another type
    extra: dict[str, Any] = field(default_factory=dict)  # the report's other keys for this file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportedFile:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class ExportReport:
    """``export-report.json``: what was exported, how, and how each file verified."""

    macft_version: str | None = None
    created: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # run, adapter, base, quant types, outtype
    files: list[ExportedFile] = field(default_factory=list)  # every GGUF made, intermediate ones too
    outputs: list[str] = field(default_factory=list)  # the names kept in the output directory
    validation: dict[str, Any] = field(default_factory=dict)  # prompts, reference perplexity, ...
    merge: dict[str, Any] = field(default_factory=dict)  # base used; QLoRA: "candidates", "chosen", "why"
    imatrix: dict[str, Any] = field(default_factory=dict)  # the importance matrix: used, source, chunks
    recommended: str | None = None  # the smallest file within KL 0.05 of the 16-bit model
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the numbers say is broken
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    llama_cpp: dict[str, Any] = field(default_factory=dict)  # the llama.cpp build used
    extra: dict[str, Any] = field(default_factory=dict)  # the report's other keys

    @property
    def verified(self) -> bool:
        """Whether the files were compared with the Hugging Face model (not ``no_verify``)."""
        return any(f.agreement is not None for f in self.files)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportReport:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["files"] = [ExportedFile.from_dict(f) for f in values.get("files") or []]
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: str | os.PathLike) -> ExportReport:
        """The report in an export directory (or the ``export-report.json`` file itself)."""
        import json

        from export.pipeline import REPORT

        p = Path(path)
        if p.is_dir():
            p = p / REPORT
        if not p.is_file():
            raise MacftError(f"{p} does not exist.", "Pass an export directory written by `macft export`.")
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "files")}
        out["files"] = [f.to_dict() for f in self.files]
        out.update(self.extra)
        return out


@dataclass
class ExportResult:
    output: Path  # the output directory (GGUF files, Modelfile, README.md, export-report.json)
    files: list[Path]  # the GGUF files kept there
    report: ExportReport


# export's own options (besides the config section 'export:') and their defaults, as the flags'
EXPORT_OPTIONS: dict[str, Any] = {
    "adapter": None, "model": None, "best": False, "force": False, "name": None, "prompts": None,
    "verify_prompts": 8, "max_new_tokens": 48, "eval_tokens": 4096, "threads": 0, "no_verify": False}


def export(run: Run | str | os.PathLike | None = None, quant: str | Sequence[str] | None = None,
           output: str | os.PathLike | None = None, *, verbose: bool = False, **options: Any) -> ExportResult:
    """Merge a run's adapter into its base and write GGUF files verified against the Hugging
    Face model (``macft export``); returns the files and the report.

    ``quant``: one type or several (q4_k_m, q8_0, ...; default: the run's ``export.quant``,
    q4_k_m); ``output``: default ``RUN/export``. ``options`` as the flags: ``best``,
    ``force``, ``name``, ``prompts``, ``verify_prompts``, ``max_new_tokens``, ``eval_tokens``,
    ``threads``, ``no_verify``, and the config's export settings (``outtype``, ``merge_base``
    = "auto" / "dequantized" / "original", ``imatrix`` = "auto" / "off" / a file,
    ``lora_gguf``, ``llama_cpp``, ``keep_intermediate``). Without ``run``: ``adapter=DIR,
    model=BASE`` exports a PEFT adapter made elsewhere."""
    from export.job import ExportOptions, resolve_job
    from export.pipeline import run_export

    own = {k: v for k, v in options.items() if k in EXPORT_OPTIONS}
    settings = {k: v for k, v in options.items() if k not in EXPORT_OPTIONS}
    if quant is not None:
        settings["quant"] = quant if isinstance(quant, str) else ",".join(quant)
    export_values = config_values("macft.export()", settings, ("export",),
                                  ("run", "output", "verbose", *EXPORT_OPTIONS))
    o = {**EXPORT_OPTIONS, **{k: _plain(v) for k, v in own.items()}}
    for flag in ("verify_prompts", "max_new_tokens", "eval_tokens"):
        if o[flag] < 1:
            raise MacftError(f"--{flag.replace('_', '-')} must be at least 1, got {o[flag]}.")
    opts = ExportOptions(prompts_file=o["prompts"], n_prompts=o["verify_prompts"],
                         max_new_tokens=o["max_new_tokens"], eval_tokens=o["eval_tokens"],
                         threads=o["threads"], verify=not o["no_verify"], force=o["force"])
    with silenced(not verbose):
        job = resolve_job(run=_run_path(run) if run is not None else None, adapter=o["adapter"],
                          model=o["model"], output=_plain(output), name=o["name"], best=o["best"],
                          export_values=export_values, options=opts)
        report = run_export(job)
    return ExportResult(output=job.output,
                        files=[job.output / n for n in report.get("outputs", []) if n.endswith(".gguf")],
                        report=ExportReport.from_dict(report))


# --------------------------------------------------------------------------- chat


def _messages(messages_or_text: str | Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if isinstance(messages_or_text, str):
        msgs = [{"role": "user", "content": messages_or_text}]
    else:
        msgs = [dict(m) for m in messages_or_text]
    if system and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


class Chat:
    """A fine-tune (or a base model, or a GGUF) to talk to. ``generate`` answers a message or
    a conversation; ``stream`` yields the answer's text as it is generated. Close it (or use
    ``with``) to free the model."""

    def __init__(self, model: Any, *, system: str | None = None, verbose: bool = False):
        self.model = model  # the backend's ChatModel (macft.inference)
        self.system = system
        self.verbose = verbose

    @property
    def kind(self) -> str:
        """"mlx", "cuda" or "gguf"."""
        return str(self.model.kind)

    @property
    def description(self) -> str:
        return str(self.model.description)

    @property
    def last(self) -> Generation | None:
        """The last finished generation."""
        return getattr(self.model, "last", None)

    def generate(self, messages_or_text: str | Sequence[dict[str, str]], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 system: str | None = None) -> Generation:
        """The answer (``.text``; ``.stopped``: it ended on an end token, not the token limit)
        to a user message or a conversation (``[{"role": "user", "content": ...}, ...]``);
        greedy unless ``temperature`` > 0."""
        for _ in self.stream(messages_or_text, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, system=system):
            pass
        return self.model.last

    def stream(self, messages_or_text: str | Sequence[dict[str, str]], *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               system: str | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece; the finished generation is then :attr:`last`."""
        from .inference import Sampling

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        msgs = _messages(messages_or_text, system or self.system)
        with silenced(not self.verbose):
            prompt = self.model.prompt(msgs)
        pieces = self.model.stream(prompt, sampling)
        while True:
            with silenced(not self.verbose):  # not around the yield: the caller may print
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece

    def adapters(self, enabled: bool) -> AbstractContextManager[None]:
        """Within this block the adapter is on (the fine-tune) or off (the base model)."""
        return self.model.adapters(enabled)

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CHAT_OPTIONS = ("run", "best", "model", "adapter", "gguf", "lora_gguf", "backend", "llama_cpp", "force")


def load_chat_model(run_or_gguf: Run | str | os.PathLike | None = None, *, system: str | None = None,
                    verbose: bool = False, **options: Any) -> Chat:
    """Load a model to talk to, as ``macft chat`` does: a run (its base + adapter, by the
    backend that trained it), a ``.gguf`` file (through the pinned llama.cpp; with ``run=``,
    the run's tokenizer renders the prompts), or with ``model=BASE`` (and ``adapter=DIR``) a
    base model. ``options`` as the flags: ``best``, ``model``, ``adapter``, ``gguf``,
    ``lora_gguf``, ``backend``, ``llama_cpp``, ``force``. ``system``: the default system
    prompt."""
    unknown = [k for k in options if k not in CHAT_OPTIONS]
    if unknown:
        raise ConfigError([f"unknown option '{k}'" + (
            f" (did you mean {' or '.join(repr(c) for c in close)}?)"
            if (close := difflib.get_close_matches(k, [*CHAT_OPTIONS, "system", "verbose"], n=3, cutoff=0.6))
            else "") for k in unknown], "macft.load_chat_model()")
    kwargs = {k: _plain(v) for k, v in options.items()}
    if isinstance(kwargs.get("run"), Run):
        kwargs["run"] = str(kwargs["run"].path)
    if run_or_gguf is not None:
        src = _run_path(run_or_gguf)
        is_gguf = not isinstance(run_or_gguf, Run) and Path(src).suffix.lower() == ".gguf" and not (
            Path(src) / CONFIG).is_file()
        key = "gguf" if is_gguf else "run"
        if kwargs.get(key):
            raise MacftError(f"{key} given twice: as the first argument ({src}) and as {key}=.")
        kwargs[key] = src
    from .chat_session import load_chat_model as load

    with silenced(not verbose):
        model = load(**kwargs)
    return Chat(model, system=system, verbose=verbose)
