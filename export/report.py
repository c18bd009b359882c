"""The summary table printed at the end of ``macft export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from macft.ui import console, human_bytes


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _kl(x: float | None) -> str:
    return "-" if x is None else f"{max(x, 0.0):.2g}" if x < 0.01 else f"{x:.3f}"


def _imatrix_cell(f: dict) -> str:
    """'yes -23%': made with the matrix, KL change against the same type without it."""
    if f.get("imatrix") is None:
        return ""
    change = f.get("imatrix_kl_change")
    if f.get("imatrix"):
        return "yes" + ("" if change is None else f" {change:+.0%}")
    if "with_imatrix" in f:
        return f"no ({change:+.0%} with)" if change is not None else "no"
    return "no"


def merge_choice_lines(m: dict) -> list[str]:
    """The measured merge bases, in words (--merge-base auto)."""
    cands = m.get("candidates") or {}
    if not cands:
        return []
    parts = []
    for base, f in cands.items():
        kl = "-" if f.get("kl_divergence") is None else f"{f['kl_divergence']:.3g}"
        agree = "-" if f.get("agreement") is None else f"{f['agreement']:.0%}"
        parts.append(f"{base}: KL {kl}, greedy agreement {agree}")
    return [f"Merge base measured against the training-time model ({'; '.join(parts)}): kept "
            f"[bold]{m.get('chosen')}[/]."]


def _ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if x < 1e5 else f"{x:.3e}"


def print_summary(report: dict[str, Any], output: Path) -> None:
    from rich.table import Table

    v = report.get("validation", {})
    verified = any(f.get("agreement") is not None for f in report.get("files", []))
    t = Table(title="GGUF files verified with llama.cpp" if verified else "GGUF files (NOT verified)",
              title_justify="left")
    t.add_column("file", no_wrap=True)
    t.add_column("type", no_wrap=True)
    for col in ("size", "agree", "same top", "KL div", "perplexity", "stop", "imatrix"):
        t.add_column(col, justify="right", no_wrap=True)
    outtype = (report.get("outtype") or {}).get("chosen") or report.get("inputs", {}).get("outtype", "16-bit")
    t.add_row(f"merged HF model ({outtype} weights)", "reference", "", "", "", "", _ppl(v.get("reference_perplexity")),
              _pct(v.get("reference_stop_rate")), "")
    remarks = []
    for f in report.get("files", []):
        published = f["file"] in report.get("outputs", [])
        t.add_row(f["file"] + ("" if published else " *"), f["kind"], human_bytes(f["size"]),
                  _pct(f.get("agreement")), "-" if f.get("same_top") is None else f"{f['same_top']:.1%}",
                  _kl(f.get("kl_divergence")), _ppl(f.get("perplexity")), _pct(f.get("stop_rate")), _imatrix_cell(f))
        if f.get("fallbacks"):
            names = ", ".join(sorted({x["tensor"] for x in f["fallbacks"]})[:6])
            remarks.append(f"{f['file']}: {len(f['fallbacks'])} tensor(s) quantized to a fallback type "
                           f"(row width not a multiple of the block): {names}"
                           + (" ..." if len(f["fallbacks"]) > 6 else ""))
        if f.get("base_gguf"):
            remarks.append(f"{f['file']}: checked with --lora on {f['base_gguf']}")
    if console.is_terminal:
        console.print(t)
    else:  # logs and pipes: do not squeeze the table into 80 columns
        from rich.console import Console

        Console(stderr=True, width=max(console.width, 132), highlight=False, quiet=console.quiet).print(t)
    if any(f["file"] not in report.get("outputs", []) for f in report.get("files", [])):
        console.print("* intermediate file, removed at the end (keep it with --keep-intermediate)")
    for r in remarks:
        console.print(r)
    m = report.get("merge", {})
    for line in merge_choice_lines(m):
        console.print(line)
    imx = report.get("imatrix") or {}
    if imx.get("used"):
        console.print(f"Importance matrix: {imx.get('source')}"
                      + (f", {imx['rows']} rows, {imx['chunks']} chunks of {imx['n_ctx']} tokens" if imx.get("chunks")
                         else "") + "; 'imatrix' gives the KL divergence change against the same type quantized "
                      "without it, on the same tokens.")
    chk = m.get("check", {})
    if "max_abs_logit_diff" in chk:
        console.print(f"Merge ({m.get('base_used')}): max logit difference {chk['max_abs_logit_diff']:.3g} "
                      f"against the training-time model over {chk['positions']} prompt positions "
                      f"(top token agrees on {chk['top1_agreement']:.1%}; expected {chk['expected']}).")
    if verified:
        console.print(f"Agreement: share of the reference's greedy tokens reproduced before the first "
                      f"difference ({v.get('prompts', 0)} prompts, ≤{v.get('max_new_tokens')} tokens). Same top: "
                      f"next-token agreement on {v.get('scored_tokens', 0)} validation tokens.")
    for n in report.get("notes", []):
        console.print(f"[yellow]note:[/] {n}")
    from macft.ui import warn

    for w in report.get("warnings", []):
        warn(w)
    console.print(f"Outputs in [bold]{output}[/]: {', '.join(report.get('outputs', []))}, export-report.json")


# A GGUF far worse than the Hugging Face model it was made from (perplexity 10x, ln ratio > 2.3):
# quantization has destroyed it. 16-bit files never get here (beyond TOL_LN_PPL the export fails).
COLLAPSE_PPL_RATIO = 10.0
# A GGUF that ends its answers at most half as often as the reference (which ended most of them):
# users see answers that run on to the token limit.
STOP_RATE_MIN_REF = 0.5
STOP_RATE_FRACTION = 0.5


def collapse_warnings(report: dict[str, Any]) -> list[str]:
    """What the verification numbers say is broken, in words.

    Warnings, not errors: by this point every file is written and the 16-bit GGUF verified as a
    faithful conversion (a wrong conversion already failed the export), so what these catch is
    quantization damage to a (small) model. Failing would throw away a finished export whose
    other files are fine; exiting 0 without a word would hide it in a table. So: a warning
    after the table, also in export-report.json ("warnings").

    The merged model's own perplexity is not judged here: without the base's perplexity on the
    same text there is no yardstick (the tiny random-init test models are worse than a uniform
    guess before any adapter). An adapter on the wrong base is caught before the merge, by the
    fingerprint the run recorded (macft.fingerprint.check_base)."""
    out = []
    v = report.get("validation") or {}
    ref_ppl, ref_stop = v.get("reference_perplexity"), v.get("reference_stop_rate")
    for f in report.get("files", []):
        s, r = f.get("stop_rate"), f.get("ref_stop_rate", ref_stop)
        if r is not None and s is not None and r >= STOP_RATE_MIN_REF and s <= STOP_RATE_FRACTION * r:
            out.append(f"{f['file']} ends its answers in {_pct(s)} of the prompts, the Hugging Face model in "
                       f"{_pct(r)}: in use it will often run on to the token limit"
                       + (" (quantization damage: try a larger type such as q8_0)" if f.get("kind") not in
                          ("f16", "bf16", "f32", "lora") else ""))
        p, rp = f.get("perplexity"), f.get("ref_perplexity") or ref_ppl
        if p is not None and rp and p > COLLAPSE_PPL_RATIO * rp:
            out.append(f"{f['file']} has a perplexity of {_ppl(p)} on the validation data, the Hugging Face "
                       f"model {_ppl(rp)}: quantization has broken this file; use a larger type such as q8_0.")
    return out
