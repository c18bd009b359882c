"""``macft export``, step by step.

1. check everything that can be checked up front (llama.cpp tools, architecture, disk space);
2. merge the adapter into its base, streaming the shards (:mod:`export.merge`);
3. fix the merged tokenizer files (:mod:`export.tokenizer_fix`);
4. convert to a 16-bit GGUF (:mod:`export.convert`);
5. compute the Hugging Face references and measure the merge against the training-time model
   (:mod:`export.reference`);
6. verify the 16-bit GGUF, failing loudly when it disagrees beyond tolerance (a conversion
   bug, not quantization noise), then quantize and verify every requested type;
7. optionally the GGUF LoRA, verified on the base GGUF;
8. Modelfile, README, export-report.json.

Everything is written inside a work directory in the output directory and moved into place
only when all of it succeeded; a failure leaves the output directory as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft._version import __version__
from macft.errors import MacftError
from macft.model_info import ModelInfo
from macft.ui import console, human_bytes, task_progress

from .job import ExportJob

REPORT = "export-report.json"


@dataclass
class Outputs:
    final: list[Path] = field(default_factory=list)  # paths inside the work dir, moved at the end
    intermediate: list[Path] = field(default_factory=list)  # kept only with --keep-intermediate


def _step(msg: str, t0: float) -> None:
    console.print(f"[green]✓[/] {msg} [dim]({time.time() - t0:.1f} s)[/]")


def _free_bytes(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def estimate_bytes(job: ExportJob, shard_bytes: int, numel: int, adapter_bytes: int, n_vocab: int) -> int:
    from .quantize import BITS_PER_WEIGHT
    from .verify import MAX_KLD_FILE

    o = job.options
    need = shard_bytes + numel * 2  # merged copy + 16-bit GGUF
    if len(job.merge_bases) > 1:  # --merge-base auto on a QLoRA run: both merges, both converted
        need += shard_bytes + numel * 2
    quantized = [int(numel * BITS_PER_WEIGHT[q] / 8) for q in o.quants if q != o.outtype]
    need += sum(quantized) + max(quantized, default=0)  # + one comparison file without the imatrix
    if o.lora_gguf:
        need += numel * 2 + adapter_bytes
    need += min(MAX_KLD_FILE, o.eval_tokens * (n_vocab + 6) * 2)
    return int(need * 1.05) + (100 << 20)


def run_export(job: ExportJob) -> dict[str, Any]:
    """Do the export; returns the report (also written to ``export-report.json``)."""
    t_start = time.time()
    timings: dict[str, float] = {}
    base_dir, info, plan, tools, arch, need = _check_up_front(job)
    created = not job.output.exists()
    try:
        job.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from macft.errors import os_error_message

        raise MacftError(*os_error_message(e, f"creating the output directory {job.output}")) from None
    remove_stale_work_dirs(job.output)
    work = job.output / f"{WORK_PREFIX}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        report = _run_steps(job, tools, base_dir, info, arch, plan, work, timings)
        _publish(job, work, report)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if created and job.output.exists() and not any(job.output.iterdir()):
            job.output.rmdir()
        full = _disk_full(e, job.output, need)
        if full is not None:
            raise full from None
        raise
    shutil.rmtree(work, ignore_errors=True)
    report["timings"]["total"] = round(time.time() - t_start, 1)
    from .report import print_summary

    _write_report(job, report, need)
    print_summary(report, job.output)
    return report


def _check_up_front(job: ExportJob) -> tuple[Path, ModelInfo, Any, Any, str, int]:
    """1. Everything that can be checked before anything is written: the base against the run,
    the base and the adapter, the llama.cpp tools and the converter's packages, the
    architecture, the disk space. Returns (base_dir, info, merge plan, tools, architecture,
    bytes the export needs)."""
    from macft.model_info import read_model_info
    from macft.models import resolve_model_path

    from .convert import check_architecture, check_converter_deps
    from .llama_cpp import locate
    from .merge import base_shards, plan_merge

    o = job.options
    base_dir = resolve_model_path(job.base)
    info = read_model_info(base_dir)
    if job.run is not None:
        job.run.check_base(base_dir, force=o.force, other_base_hint=" with --model BASE")
    plan = plan_merge(base_dir, job.adapter_dir, job.merge_quant(job.merge_bases[0]))  # checks base and adapter
    tools = locate(o.llama_cpp)
    _check_imatrix_tool(job, tools)
    check_converter_deps()
    arch = check_architecture(tools, info)
    numel = sum(t.numel for sf in plan.shards for t in sf.tensors.values())
    shard_bytes = sum(p.stat().st_size for p in base_shards(base_dir))
    adapter_bytes = sum(p.stat().st_size for p in job.adapter_dir.iterdir() if p.is_file())
    n_vocab = info.vocab_size
    need = estimate_bytes(job, shard_bytes, numel, adapter_bytes, n_vocab)
    free = _free_bytes(job.output)
    if free < need:
        raise MacftError(
            f"Not enough disk space for this export in {job.output}: it needs about {human_bytes(need)} "
            f"(merged model, 16-bit GGUF, {len(o.quants)} quantized file(s)), {human_bytes(free)} is free.",
            "Free some space, pass --output on a disk with more room, or ask for fewer --quant types.")
    return base_dir, info, plan, tools, arch, need


def _check_imatrix_tool(job: ExportJob, tools) -> None:
    """The i-quants need the matrix this llama.cpp cannot compute: refuse before anything is
    written (the K-quants go on without it, with a note)."""
    from .llama_cpp import IMATRIX_TOOL
    from .quantize import NEEDS_IMATRIX

    needs = [q for q in job.options.quants if q in NEEDS_IMATRIX]
    if job.imatrix_plan.mode != "data" or not needs:
        return
    try:
        tools.tool(IMATRIX_TOOL)
    except MacftError:
        raise MacftError(
            f"{', '.join(needs)} needs an importance matrix, and the llama.cpp build in {tools.bin_dir} has no "
            f"{IMATRIX_TOOL} to compute one.",
            f"Build it (cmake --build build --target {IMATRIX_TOOL}), pass --imatrix FILE, or leave out "
            "--llama-cpp to use the pinned build.") from None


def _write_report(job: ExportJob, report: dict[str, Any], need: int) -> None:
    """``export-report.json``, with the warnings collapsed, written under a temporary name."""
    from .report import collapse_warnings

    report["warnings"] = collapse_warnings(report)
    tmp = job.output / f".{REPORT}.tmp"
    try:
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, job.output / REPORT)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = _disk_full(e, job.output, need)
        if full is None:
            raise
        raise full from None


WORK_PREFIX = ".macft-export-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def remove_stale_work_dirs(output: Path) -> list[Path]:
    """Work directories that exports killed (SIGKILL, power loss) left behind: those whose
    process is gone are removed, those of running exports left alone."""
    removed = []
    for d in output.glob(f"{WORK_PREFIX}*"):
        pid = d.name[len(WORK_PREFIX):]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
            console.print(f"Removed {d.name}/ ({human_bytes(size)}), left by an export that was killed "
                          f"(process {pid} is gone).")
    stale_report = output / f".{REPORT}.tmp"
    if stale_report.is_file():
        stale_report.unlink(missing_ok=True)
    return removed


def _disk_full(e: BaseException, output: Path, need: int) -> MacftError | None:
    """The error for a disk that filled up during the export (ours or a llama.cpp tool's):
    where, how much the export needs and how much is free now, after the partial files went."""
    from macft.errors import ToolError, is_disk_full

    if not is_disk_full(e):
        return None
    where = None
    if isinstance(e, OSError):
        where = e.filename
    elif isinstance(e, ToolError):
        where = next((Path(t).name for t in e.command.split() if "convert" in t or "llama-" in t), None)
    probe = output
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = human_bytes(shutil.disk_usage(probe).free)
    except OSError:
        free = "an unknown amount"
    what = f" (writing {where})" if where else ""
    return MacftError(
        f"The disk filled up during the export into {output}{what}: the export needs about "
        f"{human_bytes(need)}, and {free} is free there now that its partial files are removed.",
        "Free some space, pass --output on a disk with more room, or ask for fewer --quant types.")


@dataclass
class _Export:
    """What the steps share: the job, the llama.cpp tools, the work directory, and the report,
    its timings and notes, which they fill in."""

    job: ExportJob
    tools: Any
    work: Path
    report: dict[str, Any]
    timings: dict[str, float]
    notes: list[str]
    out: Outputs = field(default_factory=Outputs)


@dataclass
class _Prompts:
    """The validation prompts (``ev``, an eval set) and what rendered them."""

    tok: Any
    renderer: Any
    end_tokens: list[str]
    ev: Any
    source: str


def _run_steps(job: ExportJob, tools, base_dir: Path, info: ModelInfo, arch: str, plan, work: Path,
               timings: dict[str, float]) -> dict[str, Any]:
    """Steps 2 to 8, every file written inside ``work``; returns the report, its ``_final``
    entry listing the files to move into the output directory."""
    from .gguf_info import read_gguf

    o = job.options
    notes: list[str] = []
    ex = _Export(job, tools, work, _new_report(job, tools, base_dir, info, arch, timings, notes), timings, notes)
    bases = job.merge_bases
    merged = _merge_step(ex, plan, bases[0], work / "merged")
    fallback = _tokenizer_step(ex, merged)
    gguf16 = _convert_step(ex, merged)
    info16 = read_gguf(gguf16)
    prompts, info16, refs = _reference_step(ex, base_dir, merged, gguf16, info16, plan, bases)
    check = _checker(ex, prompts.ev, refs)
    checks = [_verify_16bit(ex, gguf16, info16, check)]
    imx = _imatrix_step(ex, gguf16, prompts.renderer)
    for q in o.quants:
        if q != o.outtype:
            checks.append(_quantize_step(ex, gguf16, q, check, imx))
    mmproj = None
    if info.multimodal:
        mmproj = _export_mmproj(job, tools, merged, work, ex.out, arch, notes, ex.report)
    lora_file = base_gguf = None
    if o.lora_gguf:
        lora_file, base_gguf, lora_check = _lora_step(ex, base_dir, fallback, check)
        checks.append(lora_check)
    report = ex.report
    report["files"] = checks
    report["tolerance"] = _tolerance()
    # -- 8. Modelfile, README ---------------------------------------------------------------
    main = work / f"{job.name}-{o.quants[0]}.gguf"  # the first type asked for
    _write_modelfile_and_readme(job, work, main, ex.out, prompts.renderer, prompts.tok, prompts.end_tokens,
                                info, tools, lora_file, base_gguf, report, mmproj)
    if o.keep_intermediate:
        ex.out.final.append(merged)
        ex.out.final.extend(p for p in ex.out.intermediate if p not in ex.out.final)
    report["outputs"] = [p.name for p in ex.out.final]
    report["_final"] = [str(p) for p in ex.out.final]
    return report


def _new_report(job: ExportJob, tools, base_dir: Path, info: ModelInfo, arch: str, timings: dict[str, float],
                notes: list[str]) -> dict[str, Any]:
    o = job.options
    return {
        "macft_version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "llama_cpp": tools.info(),
        "inputs": {"run": str(job.run_dir) if job.run_dir else None, "adapter": str(job.adapter_dir),
                   "base": job.base, "base_dir": str(base_dir), "architecture": arch,
                   "n_vocab": info.vocab_size,
                   "quant": o.quants, "outtype": o.outtype, "merge_base": o.merge_base,
                   "base_quantization": job.recorded_quant.describe() if job.recorded_quant else None},
        "timings": timings,
        "notes": notes,
    }


def _merge_step(ex: _Export, plan, base: str, dest: Path) -> Path:
    """2. The adapter merged into its base (``base``: "as stored", "dequantized" or
    "original", see ExportJob.merge_bases), streaming the shards into ``dest``. The record
    goes to the report's "merge" (or, for a second candidate, its "candidates")."""
    import dataclasses

    from .merge import merge

    job = ex.job
    t0 = time.time()
    total = sum(len(sf.tensors) for sf in plan.shards)
    plan = dataclasses.replace(plan, quant=job.merge_quant(base))
    with task_progress() as prog:
        task = prog.add_task(f"merging{'' if base == 'as stored' else ' into the ' + base + ' base'} "
                             "(streaming the shards)", total=total)
        res = merge(plan, dest, on_tensor=lambda _n: prog.advance(task))
    ex.timings[f"merge {base}" if base != "as stored" else "merge"] = round(time.time() - t0, 2)
    base_used = res.base
    if base == "original":
        base_used = (f"original weights as stored (training saw {job.recorded_quant.describe()}; "
                     "--merge-base original)")
    record = {"base": base, "base_used": base_used, "tensors": res.tensors, "adapted": res.merged,
              "dequantized": res.dequantized, "bytes": res.bytes_written, "seconds": round(res.seconds, 2)}
    ex.report.setdefault("merge", {}).setdefault("made", []).append(record)
    if len(ex.report["merge"]["made"]) == 1:
        ex.report["merge"].update(record)
    _step(f"merged: {res.merged} adapted weights into {res.tensors} tensors ({base_used})", t0)
    return dest


def _tokenizer_step(ex: _Export, merged: Path) -> str | None:
    """3. The merged model's tokenizer files fixed. Returns the chat template written into them
    when the model's own is not the one training used (or it has none), else None; the base
    model's view in step 7 gets the same."""
    from macft.chat_session import run_chat_template
    from macft.data.render import FALLBACK_TEMPLATE

    from .tokenizer_fix import fix_tokenizer

    fallback = run_chat_template(ex.job.resolved)  # the template training used, when not the model's own
    if fallback is None and not _has_chat_template(merged):
        fallback = FALLBACK_TEMPLATE
    ex.report["tokenizer_fixes"] = fix_tokenizer(merged, fallback, restore=ex.job.options.restore_special_tokens)
    return fallback


def _convert_step(ex: _Export, merged: Path) -> Path:
    """4. The merged model as a 16-bit GGUF (``--outtype auto`` is decided here)."""
    from .convert import convert_model
    from .merge import choose_outtype

    o = ex.job.options
    t0 = time.time()
    if o.outtype == "auto":
        o.outtype, why = choose_outtype(merged)
        ex.report["outtype"] = {"chosen": o.outtype, "why": why}
    gguf16 = ex.work / f"{ex.job.name}-{o.outtype}.gguf"
    with _spinner(f"converting to a {o.outtype} GGUF (convert_hf_to_gguf.py)"):
        convert_model(ex.tools, merged, gguf16, o.outtype)
    ex.timings["convert"] = round(time.time() - t0, 2)
    _step(f"converted: {gguf16.name} ({human_bytes(gguf16.stat().st_size)})", t0)
    return gguf16


def _reference_step(ex: _Export, base_dir: Path, merged: Path, gguf16: Path, info16, plan,
                    bases: list[str]) -> tuple[_Prompts, Any, dict]:
    """5. The validation prompts and, unless --no-verify, the Hugging Face references the GGUF
    files are checked against (and the merge check). With two merge bases (--merge-base auto
    on a QLoRA run) the second merge is made here, both are measured against the
    training-time model and the closer one ends up in ``merged`` / ``gguf16``. Returns the
    prompts, the 16-bit GGUF's info (reconverted when llama.cpp tokenized the prompts
    differently) and the references."""
    o = ex.job.options
    t0 = time.time()
    prompts = _prompts(ex.job, merged, ex.notes)
    refs: dict = {}
    if o.verify:
        ev, tok = prompts.ev, prompts.tok
        info16 = _reconcile_tokenization(ex.tools, merged, gguf16, o, ev, tok, info16, ex.report)
        second = None
        if len(bases) > 1:
            second = _second_merge(ex, plan, bases[1], merged)
        refs = _references(ex, base_dir, merged, gguf16, second, bases, ev, info16, tok)
        ex.timings["reference"] = round(time.time() - t0, 2)
        _step(f"reference: {len(ev.prompts)} prompts, {refs['merged'].kld.scored if refs['merged'].kld else 0} "
              f"scored tokens from {prompts.source}", t0)
    else:
        ex.notes.append("verification skipped (--no-verify): the GGUF files were not compared with the "
                       "Hugging Face model")
        if len(bases) > 1:
            ex.notes.append("--merge-base auto needs verification to measure the merges: merged into the "
                            "dequantized base (as training saw it)")
        ex.report["merge"]["check"] = {}
        ex.report["validation"] = {"source": None}
    return prompts, info16, refs


def _second_merge(ex: _Export, plan, base: str, first: Path) -> tuple[Path, Path]:
    """The other merge candidate with the first one's (fixed) tokenizer files, converted to a
    16-bit GGUF; (merged dir, 16-bit GGUF)."""
    from .convert import convert_model
    from .merge import SKIP_SUFFIXES

    o = ex.job.options
    dest = _merge_step(ex, plan, base, ex.work / f"merged-{base}")
    for p in first.iterdir():  # tokenizer fixes, add_prefix_space: identical for both
        if p.is_file() and not p.name.endswith(SKIP_SUFFIXES):
            shutil.copy2(p, dest / p.name)
    gguf = ex.work / f"{ex.job.name}-{base}-{o.outtype}.gguf"
    t0 = time.time()
    with _spinner(f"converting the {base} merge to a {o.outtype} GGUF"):
        convert_model(ex.tools, dest, gguf, o.outtype)
    _step(f"converted: {gguf.name} ({human_bytes(gguf.stat().st_size)})", t0)
    return dest, gguf


def _prompts(job: ExportJob, merged: Path, notes: list[str]) -> _Prompts:
    """The prompts to check on: --prompts, else the run's validation data, else generic ones."""
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    from .prompts import build_eval_set, file_samples, generic_samples, run_samples

    o = job.options
    tok = load_tokenizer(str(merged))
    renderer = Renderer(tok, job.cfg.data.loss_on if job.cfg else "assistant")
    end_tokens = list(job.resolved.end_tokens or renderer.end_tokens())
    if o.prompts_file:
        samples, source = file_samples(o.prompts_file), f"--prompts {o.prompts_file}"
    else:
        samples, source, why = run_samples(job.cfg, job.resolved.to_dict()) if job.cfg else ([], "", [])
        notes.extend(why)
        if not samples:
            samples, source = generic_samples(), "built-in generic prompts (no validation data)"
    max_len = job.cfg.data.max_seq_len if job.cfg else 2048
    ev = build_eval_set(renderer, samples, source, n_prompts=o.n_prompts, max_seq_len=max_len,
                        end_tokens=end_tokens)
    notes.extend(ev.notes)
    return _Prompts(tok, renderer, end_tokens, ev, source)


def _checker(ex: _Export, ev, refs: dict) -> Callable[..., Any]:
    """``check(path, kind, ref, **kw)``: a GGUF file run by llama.cpp and compared with the
    reference ``refs[ref]``; with --no-verify only its name, kind and size."""
    from .verify import GGUFCheck, LlamaRunner, check_gguf

    o = ex.job.options
    runner = LlamaRunner(ex.tools, o.threads)
    n_ctx = _gen_ctx(ev, o.max_new_tokens)

    def check(path: Path, kind: str, ref: str, **kw) -> GGUFCheck:
        if not o.verify:
            target = kw.get("lora") or path
            return GGUFCheck(kw.get("label") or target.name, kind, target.stat().st_size)
        with _spinner(f"verifying {(kw.get('label') or path.name)} with llama.cpp"):
            return check_gguf(runner, path, kind, refs[ref], max_new=o.max_new_tokens, n_ctx=n_ctx,
                              workdir=ex.work, **kw)

    return check


def _verify_16bit(ex: _Export, gguf16: Path, info16, check: Callable[..., Any]) -> dict:
    """6. The 16-bit GGUF checked against the merged model. Beyond tolerance it is a conversion
    bug (or llama.cpp tokenizing the prompts otherwise), not quantization noise: the export
    fails. Returns the file's entry in the report."""
    from .verify import conversion_problems

    o = ex.job.options
    t0 = time.time()
    c16 = check(gguf16, o.outtype, "merged")
    problems = conversion_problems(c16)
    if problems and c16.tokenization_ok is False:
        tried = ex.report.get("tokenization_fix", {})
        raise MacftError(
            "llama.cpp splits this model's chat prompts into other tokens than training did, so in "
            "llama.cpp the fine-tune would read inputs it never learned on. First differences:\n"
            + "\n".join(f"  - {d}" for d in c16.tokenization_problems[:5])
            + (f"\nmacft tried {tried['tried']}: {tried['result']}." if tried else ""),
            "The adapter is fine (`macft chat --run RUN` uses transformers' tokenizer). A different "
            "--chat-template (e.g. one without a BOS written into the text) usually avoids it; please "
            "report the model id with export-report details.")
    if problems:
        raise MacftError(
            f"The {o.outtype} GGUF disagrees with the merged Hugging Face model beyond tolerance. "
            "This is a conversion bug, not quantization noise:\n" + "\n".join(f"  - {p}" for p in problems),
            "Re-run with --keep-intermediate and --debug and report it with export-report details; "
            "try --outtype f16, or --llama-cpp with another llama.cpp version.")
    entry = {**c16.to_dict(), "types": info16.type_counts(), "fallbacks": []}
    (ex.out.final if o.outtype in o.quants else ex.out.intermediate).append(gguf16)
    if o.verify:
        _step(f"verified {gguf16.name}: {_figures(c16)}", t0)
    return entry


def _imatrix_step(ex: _Export, gguf16: Path, renderer) -> Any:
    """6a. The importance matrix for the K- and i-quants: computed with llama-imatrix on the
    16-bit GGUF over the run's training conversations, or the user's --imatrix FILE. Returns
    an :class:`export.imatrix.Imatrix` or None (the reason goes to the notes and the report)."""
    from .imatrix import compute, external, wants_imatrix
    from .llama_cpp import IMATRIX_TOOL

    job, o = ex.job, ex.job.options
    plan = job.imatrix_plan
    rec: dict[str, Any] = {"used": False}
    ex.report["imatrix"] = rec
    if not wants_imatrix([q for q in o.quants if q != o.outtype]):
        rec["why"] = "no requested type uses an importance matrix"
        return None
    if plan.mode == "off":
        rec["why"] = plan.why
        ex.notes.append(plan.why if plan.why.startswith("no importance") else f"no importance matrix: {plan.why}")
        return None
    if plan.mode == "file":
        imx = external(plan.file)
        rec.update({"used": True, **imx.to_dict(), "file": str(imx.path)})
        return imx
    try:
        ex.tools.tool(IMATRIX_TOOL)
    except MacftError:
        why = (f"no importance matrix: the llama.cpp build in {ex.tools.bin_dir} has no {IMATRIX_TOOL} "
               f"(build it: cmake --build build --target {IMATRIX_TOOL})")
        rec["why"] = why
        ex.notes.append(why)
        return None
    t0 = time.time()
    imx, why = compute(ex.tools, gguf16, plan, renderer, ex.work, job.name, o.threads)
    if imx is None:
        rec["why"] = f"no importance matrix: {why}"
        ex.notes.append(rec["why"])
        return None
    rec.update(used=True, **imx.to_dict())
    ex.out.final.append(imx.path)
    ex.timings["imatrix"] = round(time.time() - t0, 2)
    return imx


SCORE_FIGURES = ("kl_divergence", "kl_divergence_err", "same_top", "perplexity", "ln_ppl_ratio", "scored_tokens")
# The file without the importance matrix replaces the one with it only when its KL divergence
# is lower by more than this many standard errors of the difference (both errors as
# llama-perplexity gives them, added as if independent: the same tokens make the real
# error of the difference smaller, so this errs towards the matrix, llama.cpp's recommendation).
# Measured on a 1152-wide test model: differences of 1.4 sigma between the two files were noise
# that reversed on other tokens; a 2x worse matrix stood at 9 sigma.
IMATRIX_MARGIN_SIGMA = 2.0


def _quantize_step(ex: _Export, gguf16: Path, q: str, check: Callable[..., Any], imx=None) -> dict:
    """6b. One quantized type made from the 16-bit GGUF and checked against the merged model
    (reported, not enforced). With an importance matrix the type is also made without it and
    measured on the same validation tokens; the file with the lower KL divergence is kept
    (normally the imatrix one) and both figures go to the report. Returns the file's entry."""
    from .gguf_info import read_gguf
    from .quantize import IMATRIX_TYPES, quantize

    o = ex.job.options
    t0 = time.time()
    dst = ex.work / f"{ex.job.name}-{q}.gguf"
    uses = imx is not None and q in IMATRIX_TYPES
    with _spinner(f"quantizing to {q}{' with the importance matrix' if uses else ''} (llama-quantize)"):
        qres = quantize(ex.tools, gguf16, dst, q, o.threads, imatrix=imx.path if uses else None)
    chk = check(dst, q, "merged")
    entry = {**chk.to_dict(), "types": read_gguf(dst).type_counts(), "fallbacks": qres.fallbacks,
             "imatrix": bool(uses)}
    if chk.ln_ppl_ratio is not None:
        entry["ppl_ratio"] = float(math.exp(chk.ln_ppl_ratio))
    if uses and o.verify and chk.kl_divergence is not None:
        entry.update(_without_imatrix(ex, gguf16, dst, q, check, chk))
    ex.out.final.append(dst)
    ex.timings[f"quantize+verify {q}"] = round(time.time() - t0, 2)
    fb = f", {len(qres.fallbacks)} tensor(s) fell back" if qres.fallbacks else ""
    gain = entry.get("imatrix_kl_change")
    imx_txt = "" if gain is None else f", KL {gain:+.0%} with the importance matrix"
    _step(f"{dst.name}: {_figures(chk)}{imx_txt}{fb}", t0)
    return entry


def _without_imatrix(ex: _Export, gguf16: Path, dst: Path, q: str, check: Callable[..., Any], chk) -> dict:
    """The same type quantized without the importance matrix, scored on the same tokens.
    Replaces ``dst`` when it measures clearly closer to the 16-bit model (IMATRIX_MARGIN_SIGMA;
    then checked in full)."""
    from .gguf_info import read_gguf
    from .quantize import quantize

    o = ex.job.options
    alt = ex.work / f"{ex.job.name}-{q}-noimatrix.gguf"
    with _spinner(f"quantizing to {q} without the importance matrix, for comparison"):
        quantize(ex.tools, gguf16, alt, q, o.threads)
    c2 = check(alt, q, "merged", scores_only=True, label=f"{dst.name} without imatrix")
    without = {k: getattr(c2, k) for k in SCORE_FIGURES}
    if c2.ln_ppl_ratio is not None:
        without["ppl_ratio"] = float(math.exp(c2.ln_ppl_ratio))
    out: dict[str, Any] = {"without_imatrix": without}
    if c2.kl_divergence is not None and chk.kl_divergence:
        out["imatrix_kl_change"] = chk.kl_divergence / c2.kl_divergence - 1 if c2.kl_divergence else None
    sigma = math.hypot(chk.kl_divergence_err or 0.0, c2.kl_divergence_err or 0.0)
    out["imatrix_kl_change_sigma"] = (round((chk.kl_divergence - c2.kl_divergence) / sigma, 2)
                                      if sigma and c2.kl_divergence is not None else None)
    if c2.kl_divergence is not None and c2.kl_divergence + IMATRIX_MARGIN_SIGMA * sigma < chk.kl_divergence:
        # measured worse with the matrix: publish the plain file, checked in full
        with_figures = {k: getattr(chk, k) for k in SCORE_FIGURES}
        os.replace(alt, dst)
        full = check(dst, q, "merged")
        out.update({**full.to_dict(), "types": read_gguf(dst).type_counts(), "imatrix": False,
                    "with_imatrix": with_figures,
                    "imatrix_note": "measured closer to the 16-bit model without the importance matrix "
                                    f"(by more than {IMATRIX_MARGIN_SIGMA:g} standard errors): the published "
                                    "file is quantized without it"})
        if full.ln_ppl_ratio is not None:
            out["ppl_ratio"] = float(math.exp(full.ln_ppl_ratio))
        ex.notes.append(f"{dst.name}: the importance matrix made it worse on the validation data "
                        f"(KL {with_figures['kl_divergence']:.4g} vs {c2.kl_divergence:.4g}); published without it")
    else:
        alt.unlink(missing_ok=True)
    return out


def _lora_step(ex: _Export, base_dir: Path, fallback: str | None,
               check: Callable[..., Any]) -> tuple[Path, Path, dict]:
    """7. The adapter as a GGUF LoRA, checked on a GGUF of the base converted for the purpose
    (kept with --keep-intermediate). Returns the LoRA file, that base GGUF and the report entry."""
    from .convert import convert_lora, convert_model
    from .gguf_info import read_gguf
    from .verify import conversion_problems

    job, o = ex.job, ex.job.options
    t0 = time.time()
    view = _base_view(base_dir, ex.work / "base", fallback, o.restore_special_tokens)
    lora_file = ex.work / f"{job.name}-lora-f16.gguf"
    base_gguf = ex.work / f"{_base_name(job.base)}-{o.outtype}.gguf"
    with _spinner("converting the adapter to a GGUF LoRA (convert_lora_to_gguf.py)"):
        convert_lora(ex.tools, job.adapter_dir, view, lora_file)
    with _spinner(f"converting the base model to {base_gguf.name} for checking the LoRA"):
        convert_model(ex.tools, view, base_gguf, o.outtype)
    cl = check(base_gguf, "lora", "lora", lora=lora_file, label=lora_file.name)
    problems = conversion_problems(cl)
    if problems:
        raise MacftError(
            f"The GGUF LoRA on {base_gguf.name} disagrees with the base + adapter in Hugging Face "
            "beyond tolerance:\n" + "\n".join(f"  - {p}" for p in problems),
            "Re-run without --lora-gguf (the merged GGUF files are unaffected) and report it.")
    entry = {**cl.to_dict(), "types": read_gguf(lora_file).type_counts(), "fallbacks": [],
             "base_gguf": base_gguf.name}
    ex.out.final.append(lora_file)
    ex.out.intermediate.append(base_gguf)
    ex.timings["lora"] = round(time.time() - t0, 2)
    _step(f"{lora_file.name} on {base_gguf.name}: {_figures(cl)}", t0)
    return lora_file, base_gguf, entry


def _export_mmproj(job: ExportJob, tools, merged: Path, work: Path, out, arch: str, notes: list[str],
                   report: dict) -> Path | None:
    """The vision projector as an mmproj GGUF beside the text GGUF, checked with llama-mtmd-cli."""
    from .mmproj import check_pair, convert_mmproj, mmproj_architectures, write_test_image

    if arch not in mmproj_architectures(tools.root):
        why = (f"llama.cpp ({tools.description}) cannot convert the vision projector of {arch}: "
               "the GGUF files are text-only (the image input is dropped)")
        notes.append(why)
        report["mmproj"] = {"exported": False, "why": why}
        return None
    t0 = time.time()
    dst = work / f"mmproj-{job.name}-f16.gguf"
    with _spinner("converting the vision projector (convert_hf_to_gguf.py --mmproj)"):
        convert_mmproj(tools, merged, dst)
    rec: dict[str, Any] = {"exported": True, "file": dst.name, "bytes": dst.stat().st_size,
                           "note": "the vision tower is not fine-tuned (text-only LoRA): this is the base's"}
    main = work / f"{job.name}-{job.options.quants[0]}.gguf"
    try:
        tools.tool("llama-mtmd-cli")
    except MacftError:
        rec["check"] = None
        notes.append(f"{dst.name} was not checked: this llama.cpp build has no llama-mtmd-cli")
    else:
        with _spinner("checking the text GGUF + projector with llama-mtmd-cli and a test image"):
            chk = check_pair(tools, main, dst, write_test_image(work / "test-image.png"), job.options.threads)
        rec["check"] = chk.to_dict()
        if not chk.ok:
            raise MacftError(
                f"llama.cpp could not use {main.name} with its vision projector {dst.name}:\n"
                + "\n".join(f"      {line}" for line in chk.log_tail),
                "Export again with --keep-intermediate and --debug and report it; the text GGUF files "
                "alone are unaffected.")
    out.final.append(dst)
    report["mmproj"] = rec
    _step(f"vision projector: {dst.name} ({human_bytes(dst.stat().st_size)})"
          + (", loaded with the text GGUF by llama-mtmd-cli and answered about a test image"
             if rec.get("check") else ""), t0)
    return dst


def llama_prompt_text(p, info16, ev, tok) -> str:
    """A rendered prompt as llama.cpp receives it: without the BOS text when the GGUF adds BOS
    itself (the ids stay those training used)."""
    bos_text = tok.bos_token
    if info16.add_bos and p.ids and p.ids[0] == ev.bos_id and bos_text and p.text.startswith(bos_text):
        return p.text[len(bos_text):]
    return p.text


def _reconcile_tokenization(tools, merged: Path, gguf16: Path, o, ev, tok, info16, report: dict):
    """Make llama.cpp split the chat prompts into exactly the ids training used, where the
    GGUF's metadata can: SentencePiece's space prefix.

    A SentencePiece tokenizer adds a "▁" before the first piece of a text. transformers does it
    once, at the very start of the string; llama.cpp, with ``add_space_prefix`` (its default),
    after every special token too. So when a chat template writes ``<s>[INST]`` (Llama-2) or a
    fallback ``<s>### User``, training saw ``[`` / ``##`` while llama.cpp reads ``▁[`` / ``▁###``.
    The converter takes ``add_prefix_space`` from tokenizer_config.json: set it the other way,
    convert again, and keep it only if every prompt then tokenizes exactly as in training.
    """
    from .convert import convert_model
    from .gguf_info import read_gguf
    from .verify import LlamaRunner

    if not ev.prompts:
        return info16
    runner = LlamaRunner(tools, o.threads)

    def mismatched(info) -> int:
        return sum(runner.tokenize(gguf16, llama_prompt_text(p, info, ev, tok)) != p.ids for p in ev.prompts)

    bad = mismatched(info16)
    if not bad or info16.metadata.get("tokenizer.ggml.model") != "llama":
        return info16
    tc = merged / "tokenizer_config.json"
    before = tc.read_text(encoding="utf-8") if tc.is_file() else None
    cfg = json.loads(before) if before else {}
    prefix = bool(info16.metadata.get("tokenizer.ggml.add_space_prefix", True))
    cfg["add_prefix_space"] = not prefix
    tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    with _spinner("llama.cpp splits the prompts differently: converting again with "
                  f"add_space_prefix={str(not prefix).lower()}"):
        convert_model(tools, merged, gguf16, o.outtype)
    fixed = read_gguf(gguf16)
    still = mismatched(fixed)
    entry = {"problem": f"{bad} of {len(ev.prompts)} prompts tokenized differently by llama.cpp "
                        "(SentencePiece space prefix after special tokens)",
             "tried": f"tokenizer.ggml.add_space_prefix = {str(not prefix).lower()}"}
    if still == 0:
        report.setdefault("tokenizer_fixes", []).append(
            f"llama.cpp put a SentencePiece space prefix where training had none: the GGUF now says "
            f"add_space_prefix={str(not prefix).lower()}, and all {len(ev.prompts)} prompts tokenize "
            "exactly as in training")
        report["tokenization_fix"] = {**entry, "result": "fixed"}
        return fixed
    report["tokenization_fix"] = {**entry, "result": f"not fixed ({still} still differ): reverted"}
    if before is None:
        tc.unlink()
    else:
        tc.write_text(before, encoding="utf-8")
    convert_model(tools, merged, gguf16, o.outtype)
    return read_gguf(gguf16)


def _references(ex: _Export, base_dir: Path, merged: Path, gguf16: Path, second: tuple[Path, Path] | None,
                bases: list[str], ev, info16, tok) -> dict:
    """Reference figures of the merged model (and of base + adapter for the LoRA); the merge
    check; with a ``second`` merge candidate, the measured choice between the two."""
    from .reference import HFModel, compare_logits
    from .verify import Reference, plan_kld, write_kld_file

    job, o, work, notes, report = ex.job, ex.job.options, ex.work, ex.notes, ex.report
    prompts_txt = [llama_prompt_text(p, info16, ev, tok) for p in ev.prompts]
    n_vocab = len(info16.tokens)
    kld = plan_kld(ev.stream, add_bos=info16.add_bos, bos_id=ev.bos_id, n_vocab=n_vocab,
                   max_scored=o.eval_tokens,
                   max_ctx=int(info16.metadata.get(f"{info16.architecture}.context_length", 2048)))
    if kld is None:
        notes.append(f"the validation data has too few tokens ({len(ev.stream)}) for a perplexity check")

    def reference(model: HFModel, label: str) -> Reference:
        kfile, ppl = None, None
        if kld is not None:
            kfile = work / f"{label}.kld"
            ppl = write_kld_file(kfile, kld, n_vocab, lambda c, k: model.logits(c, keep_last=k))
        greedy = [model.greedy(p.ids, o.max_new_tokens, ev.end_ids) for p in ev.prompts]
        stopped = [bool(g) and g[-1] in ev.end_ids for g in greedy]
        return Reference(label, kfile, kld, ppl, prompts_txt, [p.ids for p in ev.prompts], greedy, stopped,
                         ev.end_ids, lambda ids: tok.decode(ids, skip_special_tokens=False))

    refs: dict[str, Reference] = {}
    threads = o.threads
    # the training-time model: the base as training saw it + the adapter, unmerged (peft)
    t = HFModel(base_dir, job.adapter_dir, job.recorded_quant, threads=threads)
    n_adapter = len(_adapter_modules(job.adapter_dir))
    applied = t.applied == n_adapter
    trained_logits = [t.logits(p.ids) for p in ev.prompts] if applied else None
    if second is not None:
        refs["trained"] = reference(t, "trained")
    t.close()
    chosen = bases[0]
    if second is not None:
        chosen = _choose_merge(ex, refs, ev, bases, (merged, gguf16), second)
    check: dict[str, Any] = {"against": "training-time model (base as training saw it + adapter via peft)"}
    m = HFModel(merged, threads=threads)
    if not applied:
        notes.append(f"peft applied {t.applied} of the adapter's {n_adapter} modules to the training-time "
                     "model; the merge check is skipped")
    else:
        check.update(compare_logits([m.logits(p.ids) for p in ev.prompts], trained_logits))
        reproduces = chosen in ("as stored", "dequantized")
        check["expected"] = ("equal up to rounding" if reproduces else
                             "different by the base's quantization error (merged into the original weights)")
        if reproduces and check.get("top1_agreement", 1.0) < 0.95:
            raise MacftError(
                "The merged model does not reproduce the training-time model: its top token agrees on "
                f"{check['top1_agreement']:.1%} of the validation prompt positions (max logit difference "
                f"{check['max_abs_logit_diff']:.3g}). This is a merge bug.",
                "Report it with --debug output; as a workaround use --lora-gguf with the base GGUF.")
    # The 16-bit GGUF stores the weights rounded to the outtype; so does the reference (it
    # changes nothing for weights stored in bf16, which is how most checkpoints come).
    m.round_weights(o.outtype)
    refs["merged"] = reference(m, "merged")
    m.close()
    report["merge"]["check"] = check
    if o.lora_gguf:
        # the GGUF LoRA runs (f16) on the base GGUF (outtype): round the base the same way
        t = HFModel(base_dir, None, None, threads=threads)
        t.round_weights(o.outtype)
        t.add_adapter(job.adapter_dir, "f16")
        refs["lora"] = reference(t, "lora")
        t.close()
    report["validation"] = {
        "source": ev.source, "prompts": len(ev.prompts), "stream_tokens": len(ev.stream),
        "scored_tokens": kld.scored if kld else 0, "n_ctx": kld.n_ctx if kld else None,
        "max_new_tokens": o.max_new_tokens, "end_tokens": ev.end_tokens,
        "reference_perplexity": refs["merged"].ppl, "reference_stop_rate": refs["merged"].stop_rate,
        "reference": f"the merged model, weights rounded to {o.outtype} as stored in the GGUF, "
                     "computed in fp32 by transformers",
    }
    return refs


MERGE_FIGURES = ("kl_divergence", "kl_divergence_err", "same_top", "agreement", "identical", "stop_rate",
                 "perplexity", "ln_ppl_ratio")


def _choose_merge(ex: _Export, refs: dict, ev, bases: list[str], first: tuple[Path, Path],
                  second: tuple[Path, Path]) -> str:
    """--merge-base auto: the 16-bit GGUF of each merge measured against the training-time
    model through the verification harness (KL divergence on the validation stream, greedy
    agreement on the prompts); the closer one ends up in ``first``'s paths. The first (the
    dequantized base: it reproduces what training computed) is kept unless the second's KL is
    lower by more than IMATRIX_MARGIN_SIGMA standard errors (without KL figures: unless its
    greedy agreement is higher). Returns the base kept."""
    t0 = time.time()
    check = _checker(ex, ev, refs)
    o = ex.job.options
    measured = {}
    for base, (_, gguf) in zip(bases, (first, second), strict=True):
        c = check(gguf, o.outtype, "trained", label=f"{base} merge ({gguf.name})")
        measured[base] = {k: getattr(c, k) for k in MERGE_FIGURES}

    f1, f2 = measured[bases[0]], measured[bases[1]]
    if f1["kl_divergence"] is not None and f2["kl_divergence"] is not None:
        sigma = math.hypot(f1["kl_divergence_err"] or 0.0, f2["kl_divergence_err"] or 0.0)
        second_wins = f2["kl_divergence"] + IMATRIX_MARGIN_SIGMA * sigma < f1["kl_divergence"]
    else:
        second_wins = (f2["agreement"] or 0.0) > (f1["agreement"] or 0.0)
    chosen = bases[1] if second_wins else bases[0]
    other = next(b for b in bases if b != chosen)
    a, b = measured[chosen], measured[other]
    if a["kl_divergence"] is not None and b["kl_divergence"] is not None:
        why = (f"KL divergence to the training-time model {a['kl_divergence']:.4g} vs {b['kl_divergence']:.4g} "
               f"({other})")
    else:
        why = f"greedy agreement with the training-time model {a['agreement']:.0%} vs {b['agreement']:.0%} ({other})"
    if chosen != bases[0]:
        shutil.rmtree(first[0])
        os.replace(second[0], first[0])
        os.replace(second[1], first[1])
    else:
        shutil.rmtree(second[0])
        second[1].unlink()
    rec = ex.report["merge"]
    made = {m["base"]: m for m in rec["made"]}
    rec.update(made[chosen])
    rec["candidates"] = measured
    rec["chosen"] = chosen
    rec["why"] = why
    rec["measured_on"] = (f"the 16-bit GGUF of each merge against the training-time model: "
                          f"{refs['trained'].kld.scored if refs['trained'].kld else 0} validation tokens, "
                          f"{len(ev.prompts)} greedy generations")
    ex.timings["merge base choice"] = round(time.time() - t0, 2)
    _step(f"merge base: kept {chosen}, {why}", t0)
    return chosen


def _figures(c) -> str:
    if c.agreement is None:
        return "not verified"
    top = "-" if c.same_top is None else f"{c.same_top:.1%}"
    return f"agreement {c.agreement:.0%}, same top {top}"


def _adapter_modules(adapter_dir: Path) -> list[str]:
    from macft.adapter import WEIGHTS_NAME

    from .safetensors_io import SafetensorsFile

    sf = SafetensorsFile(adapter_dir / WEIGHTS_NAME)
    return sorted({k.split(".lora_A")[0] for k in sf.tensors if ".lora_A" in k})


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    tc = model_dir / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"))


def _base_view(base_dir: Path, view: Path, fallback: str | None, restore: bool) -> Path:
    """The base model seen by the converters: its weights linked, its tokenizer files fixed."""
    from .merge import copy_side_files
    from .tokenizer_fix import fix_tokenizer

    view.mkdir(parents=True)
    copy_side_files(base_dir, view)
    for p in base_dir.glob("*.safetensors"):
        os.symlink(p.resolve(), view / p.name)
    fix_tokenizer(view, fallback, restore=restore)
    return view


def _base_name(base: str) -> str:
    from .job import _slug

    return _slug(Path(base.rstrip("/")).name) + "-base"


def _gen_ctx(ev, max_new: int) -> int:
    longest = max((len(p.ids) for p in ev.prompts), default=0) + max_new + 16
    return max(256, -(-longest // 256) * 256)


def _tolerance() -> dict:
    from .verify import TOL_KLD, TOL_LN_PPL, TOL_SAME_TOP

    return {"16-bit GGUF and GGUF LoRA": {"kl_divergence_at_most": TOL_KLD, "same_top_at_least": TOL_SAME_TOP,
                                          "abs_ln_ppl_ratio_at_most": TOL_LN_PPL, "tokenization": "identical ids"},
            "quantized": "reported, not enforced"}


def _write_modelfile_and_readme(job, work, main, out, renderer, tok, end_tokens, info, tools,
                                lora_file, base_gguf, report, mmproj=None) -> None:
    from .modelfile import (
        check_parts,
        derive_parts,
        go_template,
        modelfile_text,
        pick_file,
        readme_text,
    )

    template, exact, system = None, False, None
    try:
        parts = derive_parts(renderer, tok.bos_token)
        template, exact = go_template(parts), check_parts(renderer, parts, tok.bos_token)
        system = parts.default_system
    except (ValueError, KeyError) as e:
        report["notes"].append(f"no Ollama TEMPLATE could be derived from the chat template ({e})")
    num_ctx = min(8192, max(2048, job.cfg.data.max_seq_len if job.cfg else 2048))
    mf = work / "Modelfile"
    lora_note = (f"# The adapter alone: FROM <the base model>, then\n# ADAPTER ./{lora_file.name}"
                 if lora_file else None)
    mf.write_text(modelfile_text(main.name, template, end_tokens, info.family, num_ctx, lora_note,
                                 system, mmproj=mmproj.name if mmproj else None), encoding="utf-8")
    files = [(p.name, k["kind"], p.stat().st_size) for p in out.final
             for k in report["files"] if k["file"] == p.name]
    published = [p.name for p in out.final]
    kl = {f["file"]: f.get("kl_divergence") for f in report["files"]}
    imx = {f["file"]: f["imatrix"] for f in report["files"] if f.get("imatrix") is not None}
    pick = pick_file(report["files"], published) if job.options.verify else None
    report["recommended"] = pick
    readme = work / "README.md"
    readme.write_text(readme_text(name=job.name, files=files, main=main.name,
                                  lora=lora_file.name if lora_file else None,
                                  base_gguf=base_gguf.name if (base_gguf and job.options.keep_intermediate) else None,
                                  template_exact=exact, end_tokens=end_tokens, bin_dir=tools.bin_dir,
                                  report=REPORT, verified=job.options.verify,
                                  mmproj=mmproj.name if mmproj else None, kl=kl, imatrix=imx, pick=pick),
                      encoding="utf-8")
    report["modelfile"] = {"template_matches_chat_template": exact, "stop": end_tokens}
    out.final += [mf, readme]


def _publish(job: ExportJob, work: Path, report: dict) -> None:
    """Move the finished outputs from the work directory into the output directory."""
    for p in map(Path, report.pop("_final")):
        dst = job.output / p.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(p, dst)


class _spinner:
    def __init__(self, msg: str):
        from macft.ui import status

        self.cm = status(msg)

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)
