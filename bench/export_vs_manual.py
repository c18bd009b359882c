"""Benchmark: `macft export` against the manual route people follow, same model and adapter.

    flock /tmp/macft-heavy.lock python bench/export_vs_manual.py [--sizes tiny,M,L] [--quant q4_k_m]
                                                                  [--write-results]

The manual route, as the usual guides give it, each step its own process:

1. peft: ``AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16)``, ``PeftModel.from_pretrained``,
   ``merge_and_unload()``, ``save_pretrained``, tokenizer ``save_pretrained``, and copying
   ``tokenizer.model`` (transformers 5 no longer writes it; the Gemma converter needs it);
2. ``python convert_hf_to_gguf.py merged --outtype bf16`` (the pinned llama.cpp, its gguf-py);
3. ``llama-quantize model-bf16.gguf model-q4_k_m.gguf Q4_K_M``.

macft runs ``python -m macft export --adapter A --model BASE --quant q4_k_m --no-verify`` (the same
work: streaming merge, tokenizer fix, conversion, quantization, Modelfile), and once more with its
verification (reported apart: that is extra work the manual route does not do).

Measured per route: wall time, and peak RSS summed over the process and its children, sampled
every 20 ms with psutil. Models: the tiny test Gemma-3 (fp32, 14 MB) and random-init Gemma-3
models stored in bf16 (M: ~120M parameters, 0.25 GB; L: ~430M, 0.85 GB), with the tiny model's
tokenizer; adapter: random LoRA rank 16 on every attention and MLP projection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "examples" / "data"
SECTION = "export_vs_manual"

SIZES = {
    "M": dict(hidden=1024, layers=8, heads=8, kv_heads=4, head_dim=128, intermediate=4096),
    "L": dict(hidden=1536, layers=12, heads=12, kv_heads=4, head_dim=128, intermediate=6144),
}

MANUAL_MERGE = textwrap.dedent("""
    import shutil, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    base, adapter, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    # transformers 5 does not write tokenizer.model; without it the converter fails on Gemma
    shutil.copy(f"{base}/tokenizer.model", out)
""")


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (process + children, sampled) of one command."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace")
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            p = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                for q in [p, *p.children(recursive=True)]:
                    try:
                        total += q.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak = max(peak, total)
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out[-3000:]}")
    return {"seconds": time.time() - t0, "peak": peak, "log": out}


def build_base(size: str, root: Path) -> Path:
    from macft.tiny import build_tiny_gemma3, corpus_from_jsonl

    texts = corpus_from_jsonl([DATA / "nya_chat" / "train.jsonl", DATA / "general" / "train.jsonl"])
    tiny = build_tiny_gemma3(root / "tiny", texts)
    if size == "tiny":
        return tiny
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    s = SIZES[size]
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
               num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], intermediate_size=s["intermediate"],
               query_pre_attn_scalar=s["head_dim"], initializer_range=0.02, dtype="bfloat16")
    cfg["layer_types"] = None
    cfg.pop("_sliding_window_pattern", None)
    out = root / f"gemma3-{size}"
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    model.to(torch.bfloat16).save_pretrained(str(out))
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def run_size(size: str, quant: str, root: Path) -> dict:
    from export.fixtures import random_adapter
    from export.gguf_info import TOKEN_CONTROL, read_gguf
    from export.llama_cpp import ensure_built
    from export.quantize import FTYPES

    tools = ensure_built()
    base = build_base(size, root)
    adapter = random_adapter(base, root / f"adapter-{size}", rank=16, b_scale=0.01)
    n_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # -- manual route: three processes --------------------------------------------------------
    man = root / f"manual-{size}"
    steps = [
        measure([sys.executable, "-c", MANUAL_MERGE, str(base), str(adapter), str(man / "merged")], env),
        measure([sys.executable, str(tools.convert_hf), str(man / "merged"), "--outtype", "bf16",
                 "--outfile", str(man / "model-bf16.gguf")], tools.script_env()),
        measure([str(tools.tool("llama-quantize")), str(man / "model-bf16.gguf"),
                 str(man / f"model-{quant}.gguf"), FTYPES[quant], str(os.cpu_count())], env),
    ]
    manual = {"seconds": sum(s["seconds"] for s in steps), "peak": max(s["peak"] for s in steps),
              "steps": [round(s["seconds"], 1) for s in steps], "step_peaks": [s["peak"] for s in steps]}
    manual_eot = read_gguf(man / f"model-{quant}.gguf").token_type_of("<end_of_turn>")
    manual["gguf16_bytes"] = (man / "model-bf16.gguf").stat().st_size
    manual["types16"] = read_gguf(man / "model-bf16.gguf").type_counts()
    # -- macft, the same work (no verification), then with verification ---------------------
    res = {}
    for label, extra in (("macft", ["--no-verify"]), ("macft_verified", [])):
        out = root / f"{label}-{size}"
        r = measure([sys.executable, "-m", "macft", "export", "--adapter", str(adapter), "--model", str(base),
                     "--output", str(out), "--quant", quant, *extra], env)
        rep = json.loads((out / "export-report.json").read_text())
        gguf = out / next(f for f in rep["outputs"] if f.endswith(f"-{quant}.gguf"))
        res[label] = {"seconds": r["seconds"], "peak": r["peak"], "timings": rep["timings"],
                      "quant_bytes": gguf.stat().st_size,
                      "eot_type": read_gguf(gguf).token_type_of("<end_of_turn>"),
                      "files": [{k: f.get(k) for k in ("file", "agreement", "same_top", "kl_divergence")}
                                for f in rep["files"]]}
    return {"size": size, "base_bytes": n_bytes, "manual": manual, "manual_eot_type": manual_eot,
            "control": TOKEN_CONTROL, **res}


def table(rows: list[dict], quant: str) -> str:
    gb = 1024 ** 3
    lines = ["| model (weights) | route | wall time (s) | time ratio | peak RSS (GB) | RSS ratio | "
             "`<end_of_turn>` typed special in the GGUF |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["manual"]
        name = f"{r['size']} ({r['base_bytes'] / 1e6:.0f} MB)"
        def ok(t: int | None, control: int = r["control"]) -> str:
            return "yes" if t == control else f"no (type {t})"
        lines.append(f"| {name} | manual (peft merge_and_unload + convert + quantize) | {m['seconds']:.1f} "
                     f"({' + '.join(map(str, m['steps']))}) | 1.00x | {m['peak'] / gb:.2f} | 1.00x | "
                     f"{ok(r['manual_eot_type'])} |")
        for label, desc in (("macft", "`macft export --no-verify`"),
                            ("macft_verified", "`macft export` (with verification)")):
            x = r[label]
            lines.append(f"| {name} | {desc} | {x['seconds']:.1f} | {x['seconds'] / m['seconds']:.2f}x | "
                         f"{x['peak'] / gb:.2f} | {x['peak'] / m['peak']:.2f}x | {ok(x['eot_type'])} |")
    return "\n".join(lines)


METHOD = """\
Same base and adapter in every route: random-init Gemma-3 models (tiny: the 6-layer test model,
fp32; M: hidden 1024 x 8 layers, bf16; L: hidden 1536 x 12 layers, bf16) with the tiny model's
SentencePiece tokenizer, and a random LoRA adapter (rank 16, all attention and MLP projections).
Manual route: a peft script (`merge_and_unload`, `save_pretrained`, tokenizer `save_pretrained`,
copy `tokenizer.model`), then `convert_hf_to_gguf.py --outtype bf16`, then `llama-quantize`, each
a separate process (the step times are in parentheses; its peak is the largest step's). macft:
one `python -m macft export` process and its children. Peak RSS: the process tree's resident
memory, summed and sampled every 20 ms. Both routes use the same pinned llama.cpp build; the
last column reads the token type of `<end_of_turn>` in the quantized GGUF (3 = control)."""


def write_results(text: str) -> None:
    from results_file import write_section

    write_section(SECTION, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,M,L")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--json", metavar="FILE", help="Also write the raw measurements to FILE.")
    ap.add_argument("--write-results", action="store_true", help=f"Replace the '{SECTION}' section of bench/RESULTS.md.")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="macft-bench-export-") as tmp:
        for size in args.sizes.split(","):
            r = run_size(size, args.quant, Path(tmp))
            rows.append(r)
            print(json.dumps(r, indent=1, default=str), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    t = table(rows, args.quant)
    print(t)
    if args.write_results:
        import psutil

        machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, "
                   f"{psutil.virtual_memory().total / 1024 ** 3:.0f} GB RAM")
        write_results(f"## {SECTION}\n\n"
                      f"`flock /tmp/macft-heavy.lock python bench/export_vs_manual.py --sizes {args.sizes} "
                      f"--quant {args.quant} --write-results` on {machine}; {time.strftime('%Y-%m-%d')}; "
                      "one run each.\n\n" + METHOD + "\n\n" + t + "\n")


if __name__ == "__main__":
    main()
