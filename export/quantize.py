"""Quantize a 16-bit GGUF with ``llama-quantize`` and list the tensors that fell back.

k-quants work on blocks of 256 columns. A tensor whose row width is not a multiple of the
block makes llama-quantize use a fallback type (q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0,
...) and print one warning per tensor plus "N of M tensor(s) required fallback quantization".
llama-quantize writes these through libllama's default logger (directly to stderr), so the
lines are complete.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from macft.config import QUANT_TYPES
from macft.errors import MacftError, ToolError

from .llama_cpp import LlamaCpp

FTYPES = {"q4_k_m": "Q4_K_M", "q4_0": "Q4_0", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
          "q8_0": "Q8_0", "f16": "F16", "bf16": "BF16", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K",
          "iq4_xs": "IQ4_XS", "iq3_m": "IQ3_M"}
# Approximate bits per weight, for the disk-space estimate.
BITS_PER_WEIGHT = {"q4_k_m": 4.9, "q4_0": 4.6, "q4_k_s": 4.6, "q5_k_m": 5.7, "q6_k": 6.6, "q8_0": 8.5,
                   "f16": 16.0, "bf16": 16.0, "q3_k_m": 3.9, "q2_k": 3.4, "iq4_xs": 4.3, "iq3_m": 3.7}
assert set(FTYPES) == set(QUANT_TYPES) == set(BITS_PER_WEIGHT)
# The types whose quantizer weighs each column by an importance matrix when it gets one
# (llama.cpp's quantize_q*_K / quantize_iq* / quantize_q4_0 take ``quant_weights``); q8_0 and
# the 16-bit types ignore it.
IMATRIX_TYPES = ("q2_k", "q3_k_m", "q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "iq3_m", "iq4_xs")
# The i-quants are made for an importance matrix; macft refuses them without one.
NEEDS_IMATRIX = ("iq3_m", "iq4_xs")

_FALLBACK = re.compile(
    r"warning:\s+(?P<name>\S+)\s+-\s+ncols\s+(?P<ncols>\d+)\s+not divisible by\s+(?P<block>\d+)\s+"
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?P<f16>\(WARNING: must use F16[^)]*\)\s*)?"
    r"->\s*falling back to\s+(?P<used>\S+)")
_SUMMARY = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass
class QuantResult:
    path: Path
    qtype: str
    fallbacks: list[dict] = field(default_factory=list)
    tensors: int | None = None


def parse_quant_types(values: list[str]) -> list[str]:
    """Lower-cased, de-duplicated; one error names every unknown type and the valid ones."""
    out, bad = [], []
    for v in values:
        q = v.strip().lower()
        if not q:
            continue
        if q not in FTYPES:
            bad.append(v)
        elif q not in out:
            out.append(q)
    if bad:
        raise MacftError(f"Unknown quantization type{'s' if len(bad) > 1 else ''}: {', '.join(bad)}.",
                         f"Use one or more of: {', '.join(QUANT_TYPES)} (comma separated, e.g. "
                         "--quant q4_k_m,q8_0).")
    if not out:
        raise MacftError("No quantization type given.", f"Use --quant with one or more of: {', '.join(QUANT_TYPES)}.")
    return out


def quantize(tools: LlamaCpp, src: Path, dst: Path, qtype: str, threads: int = 0,
             imatrix: Path | None = None) -> QuantResult:
    """``llama-quantize [--imatrix FILE] src dst TYPE`` into a temporary name, renamed when
    complete. ``imatrix`` is passed only to the types that use it (:data:`IMATRIX_TYPES`)."""
    tmp = dst.with_name(dst.name + ".tmp")
    cmd = [str(tools.tool("llama-quantize"))]
    cwd = None
    if imatrix is not None and qtype in IMATRIX_TYPES:
        # run beside the matrix and name it without its directory: llama-quantize writes the
        # name into the GGUF's metadata (quantize.imatrix.file), and local paths stay local
        cwd = imatrix.resolve().parent
        cmd += ["--imatrix", imatrix.name]
    cmd += [str(src.resolve()), str(tmp.resolve()), FTYPES[qtype], str(threads or os.cpu_count() or 1)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=cwd)
    except OSError as e:
        raise ToolError(cmd, str(e), "Check the llama.cpp build (`macft setup llama-cpp`).") from None
    log = r.stdout + "\n" + r.stderr
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ToolError(cmd, log, f"llama-quantize could not make {FTYPES[qtype]} from {src.name}. "
                        "Check free disk space; try another --quant type.")
    os.replace(tmp, dst)
    res = QuantResult(dst, qtype)
    for m in _FALLBACK.finditer(log):
        res.fallbacks.append({"tensor": m["name"], "wanted": m["wanted"], "used": m["used"],
                              "ncols": int(m["ncols"]), "block": int(m["block"])})
    s = _SUMMARY.search(log)
    if s:
        res.tensors = int(s.group(2))
    return res
