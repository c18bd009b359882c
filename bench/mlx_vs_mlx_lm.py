"""Benchmark: `macft train --backend mlx` against `mlx_lm lora`, same model, data, settings.

    python bench/mlx_vs_mlx_lm.py [--sizes S,M,L,G1B] [--iters 60] [--reps 2] [--seq-lens 512,1024]

For each tiny random-init Gemma-3 size, both tools train the same number of steps on
examples/data/nya_chat with the same LoRA (rank 16, scale 2, dropout 0, every
attention and MLP projection of every layer), AdamW (bias-corrected, no weight decay) at a
constant learning rate, no gradient clipping,
batch size 4, loss on the last assistant turn (mlx-lm's --mask-prompt). Runs
alternate (mlx-lm, macft, macft --packing, then again) and the median is taken.

G1B is Gemma-3 1B's shape where the loss lives: its real hidden size (1152), MLP width,
heads and 262,144-token vocabulary, with 6 layers instead of 26 (mlx-lm's gemma3_text needs 6) (``--g1b-layers``). It
trains on synthetic chat rows of about ``--seq-lens`` tokens each (a user turn of a third,
the answer the rest; loss on the answer), batch 4, for ``--g1b-iters`` steps reported one
by one; the packed arm is left out there (rows are already full).

Measured per run, from each tool's own reports: trained tokens/s (loss-mask
tokens per second of training time, excluding the first report window, which
holds compilation), peak memory (both use mx.get_peak_memory), final validation
loss over the whole validation set. Both processes load the system OpenBLAS before
MLX (mlx-lm through LD_PRELOAD, macft by itself), so neither runs on the reference BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "nya_chat"
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

SIZES = {
    "S": dict(hidden=256, layers=6, heads=4, kv_heads=1, head_dim=64, intermediate=512),
    "M": dict(hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1536),
    "L": dict(hidden=1024, layers=8, heads=8, kv_heads=4, head_dim=128, intermediate=3072),
    # Gemma-3 1B's published dimensions and vocabulary (google/gemma-3-1b-pt), fewer layers
    "G1B": dict(hidden=1152, layers=6, heads=4, kv_heads=1, head_dim=256, intermediate=6912),
}
G1B_VOCAB = 262144

DRIVER = textwrap.dedent("""
    import json, sys
    import mlx_lm.lora as L
    from mlx_lm.tuner.callbacks import TrainingCallback
    rec = []
    class CB(TrainingCallback):
        def on_train_loss_report(self, info): rec.append({"type": "train", **info})
        def on_val_loss_report(self, info): rec.append({"type": "val", **info})
    L.get_reporting_callbacks = lambda *a, **k: CB()
    out = sys.argv[1]
    sys.argv = ["mlx_lm.lora"] + sys.argv[2:]
    L.main()
    json.dump(rec, open(out, "w"))
""")


def build_model(size: str, root: Path, g1b_layers: int = 6) -> Path:
    from macft.tiny import TinySize, build_tiny_gemma3, corpus_from_jsonl

    out = root / f"gemma3-{size}"
    if not (out / "model.safetensors").exists():
        if size == "G1B":
            shape = dict(SIZES[size], layers=g1b_layers)
            build_tiny_gemma3(out, corpus_from_jsonl([DATA / "train.jsonl"]), TinySize(**shape, initializer_range=0.02),
                              model_vocab=G1B_VOCAB)
        else:
            build_tiny_gemma3(out, corpus_from_jsonl([DATA / "train.jsonl"]), TinySize(**SIZES[size]))
    return out


def long_chat(model: Path, root: Path, seq_len: int, n_train: int = 32, n_valid: int = 8) -> Path:
    """Chat rows of about ``seq_len`` tokens (under it, so neither tool truncates): a user
    turn of a third of them and an answer of the rest, words drawn from the nya data."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    words = " ".join(json.loads(x)["messages"][-1]["content"]
                     for x in (DATA / "train.jsonl").read_text().splitlines() if x.strip()).split()
    rng = random.Random(seq_len)

    def text(n_tokens: int) -> str:
        out: list[str] = []
        while len(tok(" ".join(out), add_special_tokens=False)["input_ids"]) < n_tokens:
            out.extend(rng.choice(words) for _ in range(8))
        return " ".join(out)

    out = root / f"chat-{seq_len}"
    out.mkdir(exist_ok=True)
    budget = seq_len - 24  # template tokens and slack
    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                msgs = [{"role": "user", "content": text(budget // 3)},
                        {"role": "assistant", "content": text(budget - budget // 3 - 16)}]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return out


def run_mlx_lm(model: Path, iters: int, lr: float, work: Path, data: Path = DATA, report: int = 10) -> dict:
    cfg = work / "mlx_lm.yaml"
    # AdamW with bias correction and no weight decay: the same update rule as macft's
    cfg.write_text(json.dumps({"lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": KEYS},
                               "optimizer": "adamw",
                               "optimizer_config": {"adamw": {"weight_decay": 0.0, "bias_correction": True}}}))
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    out = work / "mlx_lm.json"
    from macft.mlx_backend.blas import find_openblas

    env = dict(os.environ)
    blas = find_openblas()
    if blas:
        env["LD_PRELOAD"] = blas
    cmd = [sys.executable, str(driver), str(out), "--model", str(model), "--train", "--data", str(data),
           "--config", str(cfg), "--iters", str(iters), "--batch-size", "4", "--learning-rate", str(lr),
           "--num-layers", "-1", "--mask-prompt", "--steps-per-report", str(report), "--steps-per-eval", "100000",
           "--val-batches", "-1", "--save-every", "100000", "--adapter-path", str(work / "mlx_lm_adapters"),
           "--max-seq-length", "2048", "--seed", "0"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"mlx_lm lora failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t
    rec = json.loads(out.read_text())
    train = [r for r in rec if r["type"] == "train"]
    vals = [r for r in rec if r["type"] == "val"]
    return {"tok_s": statistics.mean(r["tokens_per_second"] for r in train[1:]),
            "peak_gb": max(r["peak_memory"] for r in train),
            "val_loss": vals[-1]["val_loss"], "wall_s": wall}


def run_macft(model: Path, iters: int, lr: float, work: Path, packing: bool, data: Path = DATA,
              report: int = 10) -> dict:
    run = work / ("macft-pack" if packing else "macft")
    cmd = [sys.executable, "-m", "macft", "train", "--backend", "mlx", "--model", str(model), "--data", str(data),
           "--output", str(run), "--iters", str(iters), "--batch-size", "4", "--learning-rate", str(lr),
           "--schedule", "constant", "--warmup-ratio", "0", "--weight-decay", "0", "--max-grad-norm", "0",
           "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--loss-on", "last_assistant",
           "--log-every", str(report), "--eval-every", "0", "--max-seq-len", "2048", "--save-every", "0", "--seed", "0",
           "--packing" if packing else "--no-packing"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, MACFT_QUIET="1"))
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    vals = [r for r in rows if r["type"] == "eval"]
    return {"tok_s": statistics.mean(r["tokens_per_sec"] for r in train[1:]),
            "peak_gb": max(r["peak_memory_gb"] for r in train),
            "val_loss": vals[-1]["val_loss"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="S,M,L,G1B")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-lens", default="512,1024", help="G1B: tokens per row")
    ap.add_argument("--g1b-iters", type=int, default=4, help="G1B: steps per run (the first is not timed)")
    ap.add_argument("--g1b-layers", type=int, default=6, help="G1B: layers (mlx-lm needs >= 6)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes.split(","):
            model = build_model(size, root, args.g1b_layers)
            if size == "G1B":
                cases = [(f"G1B x{n}", long_chat(model, root, int(n)), args.g1b_iters, 1, False)
                         for n in args.seq_lens.split(",")]
            else:
                cases = [(size, DATA, args.iters, 10, True)]
            for label, data, iters, report, with_packing in cases:
                res = results.setdefault(label, {"mlx_lm": [], "macft": [], "macft_packing": []})
                arms = [("mlx_lm", lambda w, m=model, d=data, i=iters, r=report: run_mlx_lm(m, i, args.lr, w, d, r)),
                        ("macft", lambda w, m=model, d=data, i=iters, r=report:
                            run_macft(m, i, args.lr, w, False, d, r))]
                if with_packing:
                    arms.append(("macft_packing", lambda w, m=model, d=data, i=iters, r=report:
                                 run_macft(m, i, args.lr, w, True, d, r)))
                else:
                    del res["macft_packing"]
                for rep in range(args.reps):
                    for name, fn in arms:
                        work = root / f"{label.replace(' ', '_')}-{name}-{rep}"
                        work.mkdir()
                        r = fn(work)
                        res[name].append(r)
                        print(f"{label} {name:<14} rep {rep}: {r['tok_s']:8.1f} tok/s  peak {r['peak_gb']:.3f} GB  "
                              f"val {r['val_loss']:.3f}  wall {r['wall_s']:.1f} s", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"{'size':<10}{'tool':<15}{'trained tok/s':>14}{'ratio':>8}{'peak GB':>9}{'mem ratio':>10}{'val loss':>10}")
    for size, res in results.items():
        base = {k: statistics.median(r[k] for r in res["mlx_lm"]) for k in ("tok_s", "peak_gb", "val_loss")}
        for name, runs in res.items():
            med = {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "peak_gb", "val_loss")}
            print(f"{size:<10}{name:<15}{med['tok_s']:>14.1f}{med['tok_s'] / base['tok_s']:>8.2f}"
                  f"{med['peak_gb']:>9.3f}{med['peak_gb'] / base['peak_gb']:>10.2f}{med['val_loss']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
