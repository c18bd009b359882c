"""macft from Python: train, reopen, chat, export, estimate: everything `macft` does on the
command line, through the API (``import macft``).

Offline and small: the base model is a tiny random-init Gemma-3 built here (a stand-in for a
downloaded one such as google/gemma-3-1b-it; pass ``model="google/gemma-3-1b-it"`` instead),
trained a few steps on the bundled 「にゃ」 chat data. Run it from a clone of the repository::

    python examples/python_api.py --output /tmp/macft-api

Everything goes to ``--output``: base-model/, run/ (the run directory: adapter/,
metrics.jsonl, config.yaml, ...) and run/export/ (the GGUF file, Modelfile,
export-report.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import macft
from macft.api import ExportReport
from macft.tiny import build_tiny_gemma3, corpus_from_jsonl

DATA = Path(__file__).resolve().parent / "data"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="macft-python-api", help="Where everything goes.")
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "cuda"])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--verbose", action="store_true", help="Show macft's own progress and tables.")
    args = ap.parse_args(argv)
    out = Path(args.output)

    # A base model to fine-tune (tiny, random weights, with a real tokenizer).
    base = build_tiny_gemma3(out / "base-model", corpus_from_jsonl(
        [DATA / "nya_chat" / "train.jsonl", DATA / "general" / "train.jsonl"]))

    # 1. Train: options are named as the `macft train` flags (--batch-size -> batch_size).
    run = macft.train(model=base, data=DATA / "nya_chat", output=out / "run", backend=args.backend,
                      iters=args.iters, batch_size=4, learning_rate=3e-3, eval_every=20, seed=0,
                      verbose=args.verbose)
    print(f"trained: {run.path} ({run.summary()['steps']} steps, backend {run.backend})")

    # 2. Reopen it later, from its directory alone.
    run = macft.open_run(out / "run")
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    print(f"reopened: {run.config.model.name}, train loss {losses[0]:.2f} -> {losses[-1]:.2f}")

    # 3. Chat with it (the base model + the adapter, by the backend that trained it).
    with macft.load_chat_model(run) as chat:
        answer = chat.generate("What is the capital of France?", max_new_tokens=24)
        print(f"chat: {answer.text!r} (ended by itself: {answer.stopped})")
        pieces = list(chat.stream([{"role": "user", "content": "レモンは何色？"}], max_new_tokens=16))
        print(f"stream: {len(pieces)} pieces: {''.join(pieces)!r}")

    # 4. Export a q8_0 GGUF, verified against the Hugging Face model, and read its report.
    result = macft.export(run, quant="q8_0", verify_prompts=2, eval_tokens=256, verbose=args.verbose)
    print(f"exported: {[f.name for f in result.files]} in {result.output}")
    for f in result.report.files:
        print(f"  {f.file}: {f.kind}, {f.size:,} bytes, agreement {f.agreement}, stop rate {f.stop_rate}")
    for w in result.report.warnings:
        print(f"  warning: {w}")
    # the same report, read back from disk
    report = ExportReport.read(result.output)
    assert [f.file for f in report.files] == [f.file for f in result.report.files]

    # 5. Estimate the peak memory of a bigger setting, before any weight is loaded.
    est = macft.estimate(model=base, backend=args.backend, batch_size=16, max_seq_len=512, calibrate_steps=0)
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in est.parts_bytes.items())
    print(f"estimate: {est.total_bytes / 2**20:.1f} MiB of {est.budget} ({'fits' if est.fits else 'does not fit'}): "
          f"{parts}")


if __name__ == "__main__":
    main()
