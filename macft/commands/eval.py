"""`macft eval`: validation loss / perplexity, base vs fine-tuned generations against the
references, stop rate, retention on general data, and the GGUF's numbers for the same prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ..chat_session import load_chat_model, read_run
from ..data.batching import eval_batches
from ..data.dataset import tokenize_samples
from ..data.templates import renderer_for
from ..errors import MacftError
from ..evaluate import (
    general_batches,
    loss_and_ppl,
    mean_kl,
    prompt_cases,
    score_generations,
)
from ..inference import Sampling
from ..run import write_text_atomic
from ..ui import console, status, task_progress

HELP = "Judge a run: loss, perplexity, base vs fine-tuned answers, stop rate, retention, GGUF."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="RUN", required=True, help="The run directory to judge.")
    p.add_argument("--best", action="store_true", help="Judge best_adapter/ instead of adapter/.")
    p.add_argument("--gguf", metavar="FILE", help="Also run the same prompts through this GGUF (llama.cpp).")
    p.add_argument("--general", metavar="DATA", help="General held-out data (any supported format) for the "
                   "retention numbers: KL to the base and perplexity before vs after.")
    p.add_argument("--prompts", type=int, default=16, metavar="N", help="Held-out prompts to generate from (default 16).")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="Longest answer (default 64).")
    p.add_argument("--backend", choices=["auto", "mlx", "cuda"], help="Override the run's backend.")
    p.add_argument("--llama-cpp", metavar="DIR", help="Your own llama.cpp checkout for --gguf.")
    p.add_argument("--output", metavar="DIR", help="Where eval-report.json / .md go (default: the run).")
    p.add_argument("--force", action="store_true", help="Judge the adapter even when the base model's "
                   "weights differ from those it was trained on.")


def run(args: argparse.Namespace) -> int:
    trained = read_run(args.run, args.best)
    cfg = trained.config
    from export.prompts import run_samples

    samples, source, notes = run_samples(cfg, trained.resolved.to_dict())
    if not samples:
        raise MacftError(f"No validation data found for {trained.path}: {'; '.join(notes) or 'none'}.",
                         "Check that the run's data paths still exist (config.yaml, data.train / data.valid).")
    with status("Loading the fine-tuned model ..."):
        model = load_chat_model(run=args.run, best=args.best, backend=args.backend,
                                force=getattr(args, "force", False))
    tok = model.tokenizer
    renderer = renderer_for(tok, cfg.data.loss_on, cfg.data.chat_template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples, _ = tokenize_samples(samples, renderer, cfg.data.max_seq_len, source)
    batches = eval_batches(examples, cfg.train.batch_size, pad)
    cases = prompt_cases(samples, args.prompts)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0)
    report: dict[str, Any] = {"run": str(trained.path), "adapter": str(trained.adapter(args.best)),
                              "validation": source, "prompts": len(cases), "max_new_tokens": args.max_new_tokens}
    n_steps = 2 * len(cases) + (len(cases) if args.gguf else 0)
    with task_progress() as prog:
        t = prog.add_task("evaluating", total=n_steps)
        report["fine_tuned"] = {**loss_and_ppl(model, batches, True)}
        report["base"] = {**loss_and_ppl(model, batches, False)}
        tuned = score_generations(model, cases, sampling, True, lambda: prog.advance(t))
        base = score_generations(model, cases, sampling, False, lambda: prog.advance(t))
        report["fine_tuned"].update(tuned.row())
        report["base"].update(base.row())
        if args.general:
            gb = general_batches(args.general, renderer, cfg.data.max_seq_len, cfg.train.batch_size, pad)
            g_t, g_b = loss_and_ppl(model, gb, True), loss_and_ppl(model, gb, False)
            report["retention"] = {"data": args.general, "kl_to_base": mean_kl(model, gb),
                                   "perplexity_base": g_b["perplexity"], "perplexity_fine_tuned": g_t["perplexity"],
                                   "tokens": g_t["tokens"]}
        gg = None
        if args.gguf:
            gguf_model = load_chat_model(run=args.run, gguf=args.gguf, llama_cpp=args.llama_cpp)
            gg = score_generations(gguf_model, cases, sampling, True, lambda: prog.advance(t))
            report["gguf"] = {"file": str(args.gguf), **gg.row()}
    report["samples"] = [
        {"prompt": c.messages[-1]["content"], "reference": c.reference, "fine_tuned": tuned.answers[i],
         "base": base.answers[i], **({"gguf": gg.answers[i]} if gg else {})}
        for i, c in enumerate(cases)]
    out_dir = Path(args.output) if args.output else trained.path
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "eval-report.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_text_atomic(out_dir / "eval-report.md", markdown(report))
    show(report)
    console.print(f"Report: [bold]{out_dir / 'eval-report.json'}[/] and {out_dir / 'eval-report.md'}")
    return 0


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if pct:
        return f"{v:.0%}"
    return f"{v:.3f}" if abs(v) < 1e5 else f"{v:.3g}"


def rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for name, key in (("base", "base"), ("fine-tuned", "fine_tuned"), ("GGUF", "gguf")):
        r = report.get(key)
        if not r:
            continue
        out.append((name, _fmt(r.get("loss")), _fmt(r.get("perplexity")), _fmt(r.get("exact_match"), True),
                    _fmt(r.get("rouge_l")), _fmt(r.get("stop_rate"), True)))
    return out


HEAD = ("model", "val loss", "perplexity", "exact match", "ROUGE-L", "stop rate")


def show(report: dict[str, Any]) -> None:
    t = Table(title=f"macft eval: {report['prompts']} held-out prompts ({report['validation']})")
    for h in HEAD:
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in rows(report):
        t.add_row(*r)
    console.print(t)
    if "retention" in report:
        r = report["retention"]
        console.print(f"Retention on {r['data']}: KL(fine-tuned || base) {r['kl_to_base']:.4f} per token; "
                      f"perplexity {r['perplexity_base']:.4g} (base) -> {r['perplexity_fine_tuned']:.4g} "
                      "(fine-tuned)")
    s = Table(title="Side by side (first 3)", show_lines=True)
    s.add_column("prompt")
    s.add_column("reference")
    s.add_column("base")
    s.add_column("fine-tuned")
    if "gguf" in report:
        s.add_column("GGUF")
    for x in report["samples"][:3]:
        s.add_row(x["prompt"], x["reference"] or "", _one_line(x["base"]), _one_line(x["fine_tuned"]),
                  *([_one_line(x["gguf"])] if "gguf" in report else []))
    console.print(s)


def _one_line(text: str, limit: int = 200) -> str:
    """Answers as one line: newlines shown as ⏎ (a base model may answer with nothing else)."""
    t = text.replace("\n", "⏎")
    return (t[:limit] + "…") if len(t) > limit else t


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# macft eval: {report['run']}", "", f"{report['prompts']} held-out prompts from "
             f"{report['validation']}, greedy, at most {report['max_new_tokens']} new tokens.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    if "retention" in report:
        r = report["retention"]
        lines += ["", f"Retention on `{r['data']}`: KL(fine-tuned ‖ base) = {r['kl_to_base']:.4f} per token; "
                  f"perplexity {r['perplexity_base']:.4g} (base) → {r['perplexity_fine_tuned']:.4g} (fine-tuned)."]
    lines += ["", "| prompt | reference | base | fine-tuned |" + (" GGUF |" if "gguf" in report else ""),
              "|---|---|---|---|" + ("---|" if "gguf" in report else "")]
    for x in report["samples"]:
        cells = [x["prompt"], x["reference"] or "", x["base"], x["fine_tuned"]] + ([x["gguf"]] if "gguf" in report else [])
        lines.append("| " + " | ".join(_one_line(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
