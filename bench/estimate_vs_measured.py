"""`macft estimate` against the peak memory `macft train` measures.

For each model shape, backend and setting: the prediction (``macft estimate --json
--calibrate-steps 0``) and the peak that a short real run reports (``summary.json``
``peak_memory_gb``: MLX's peak on the MLX backend, the process's peak RSS for PyTorch on
the CPU). Models are random-init Gemma-3 with the published dimensions of Gemma-3 1B and
4B (text part; nothing downloaded) or the test fixtures' tiny sizes; the data are plain
texts long enough that every row of a batch is ``--max-seq-len`` tokens.

    python bench/estimate_vs_measured.py --shapes tiny,1b,4b --backends mlx,cuda

Prints a table (predicted / measured) and writes the rows as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"

# Published configs (google/gemma-3-1b-pt config.json; google/gemma-3-4b-pt text_config)
SHAPES = {
    "tiny": dict(hidden=256, layers=6, heads=4, kv_heads=1, head_dim=64, intermediate=512, model_vocab=None),
    "tiny-wide": dict(hidden=512, layers=6, heads=8, kv_heads=2, head_dim=64, intermediate=2048, model_vocab=32768),
    "1b": dict(hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256, intermediate=6912, model_vocab=262144),
    "4b": dict(hidden=2560, layers=34, heads=8, kv_heads=4, head_dim=256, intermediate=10240, model_vocab=262208),
}
# (batch, max_seq_len, quantize, grad_checkpoint) per shape
SETTINGS = {
    "tiny": [(4, 128, "none", False), (8, 256, "none", False), (4, 512, "none", False), (8, 256, "none", True),
             (8, 256, "4bit", False)],
    "tiny-wide": [(4, 256, "none", False), (2, 512, "none", False), (4, 256, "none", True), (4, 256, "4bit", False)],
    # MLX's 4-bit matmuls run on one core on a CPU (a 1B step takes over 10 minutes): on MLX the
    # 4-bit part of the model is checked on the fixtures only
    "1b": [(2, 256, "none", False), (1, 512, "none", True), (2, 256, "4bit", False, "cuda")],
    # 4B on a 2-core CPU: MLX's 4-bit matmuls there take many minutes a step, so MLX runs it
    # in fp32 (16 GB of weights) and PyTorch in NF4
    "4b": [(1, 128, "none", False, "mlx"), (1, 128, "4bit", False, "cuda")],
}


def build(shape: str, root: Path) -> Path:
    from macft.tiny import TinySize, build_tiny_gemma3, corpus_from_jsonl

    d = dict(SHAPES[shape])
    out = root / f"gemma3-{shape}"
    if not out.exists():
        size = TinySize(**{k: v for k, v in d.items() if k != "model_vocab"}, initializer_range=0.02)
        build_tiny_gemma3(out, corpus_from_jsonl([DATA / "nya_chat" / "train.jsonl",
                                                  DATA / "general" / "train.jsonl"]),
                          size, model_vocab=d["model_vocab"], dtype="bfloat16" if shape in ("1b", "4b") else "float32")
    return out


def long_texts(root: Path, n: int = 64) -> Path:
    """Plain-text examples of several thousand characters: cut at --max-seq-len."""
    rows = [json.loads(x) for x in (DATA / "general" / "train.jsonl").read_text().splitlines() if x.strip()]
    texts = [" ".join(m["content"] for m in r["messages"]) for r in rows]
    rng = random.Random(0)
    out = root / "long.jsonl"
    with open(out, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(texts) for _ in range(60))}, ensure_ascii=False) + "\n")
    return out


def macft(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "macft", *args], capture_output=True, text=True, env=env)


def measure(model: Path, data: Path, backend: str, setting: tuple, work: Path, iters: int = 2) -> dict:
    b, t, q, ck = setting
    flags = ["--model", str(model), "--data", str(data), "--backend", backend, "--batch-size", str(b),
             "--max-seq-len", str(t), "--quantize", q, "--valid-fraction", "0.05", "--seed", "0"]
    if ck:
        flags.append("--grad-checkpoint")
    est = macft("estimate", *flags, "--calibrate-steps", "0", "--json")
    if est.returncode not in (0, 1):
        raise RuntimeError(est.stderr[-3000:])
    pred = json.loads(est.stdout)
    out = work / f"{backend}-{b}-{t}-{q}-{int(ck)}"
    tr = macft("train", *flags, "--iters", str(iters), "--eval-every", "0", "--save-every", "0", "--output", str(out),
               "--force")
    if tr.returncode != 0:
        raise RuntimeError(tr.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    return {"backend": backend, "batch": b, "seq": t, "quantize": q, "grad_checkpoint": ck,
            "predicted_gb": pred["total_bytes"] / 1e9, "measured_gb": summary["peak_memory_gb"],
            "parts_gb": {k: v / 1e9 for k, v in pred["parts_bytes"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,tiny-wide")
    ap.add_argument("--backends", default="mlx,cuda")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temp dir)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = long_texts(root)
        for shape in args.shapes.split(","):
            model = build(shape, root)
            for backend in args.backends.split(","):
                for setting in SETTINGS[shape]:
                    if len(setting) > 4:
                        if setting[4] != backend:
                            continue
                        setting = setting[:4]
                    # one optimizer step is enough for the peak; the 4B steps take minutes on a CPU
                    r = measure(model, data, backend, setting, Path(tmp), iters=1 if shape == "4b" else 2)
                    r["shape"] = shape
                    rows.append(r)
                    ratio = r["predicted_gb"] / r["measured_gb"]
                    print(f"{shape:9} {backend:5} b{setting[0]} t{setting[1]} {setting[2]:5} ckpt={int(setting[3])}: "
                          f"predicted {r['predicted_gb']:.3f} GB, measured {r['measured_gb']:.3f} GB, "
                          f"ratio {ratio:.2f}  {json.dumps({k: round(v, 3) for k, v in r['parts_gb'].items()})}",
                          flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| shape | backend | batch x tokens | base | checkpointing | predicted GB | measured GB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['backend']} | {r['batch']} x {r['seq']} | {r['quantize']} | "
              f"{'on' if r['grad_checkpoint'] else 'off'} | {r['predicted_gb']:.2f} | {r['measured_gb']:.2f} | "
              f"{r['predicted_gb'] / r['measured_gb']:.2f} |")


if __name__ == "__main__":
    main()
