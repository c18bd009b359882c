"""`macft demo`: the whole product on this machine, offline, in a few minutes.

1. llama.cpp tools: the pinned build (built once and cached if missing).
2. A small random-init Gemma-3 with a SentencePiece tokenizer trained on the bundled
   data, given some "general knowledge" by a short full fine-tune on
   ``examples/data/general`` (plain answers): the stand-in for a downloaded base model.
3. LoRA training on the bundled 「にゃ」 chat data (every answer ends in にゃ) with the
   best backend here (`--backend auto`).
4. `macft export --quant q4_k_m`: merge, GGUF, quantize, verify.
5. Three held-out questions: the base model's answer before, the GGUF's answer after
   (through llama.cpp).

Nothing is downloaded. Everything goes to ``--output`` (default ``./macft-demo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..errors import MacftError
from ..ui import console

HELP = ("Run the whole product offline in minutes: tiny Gemma-3, LoRA on the bundled data, "
        "q4_k_m GGUF, before/after answers through llama.cpp.")
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
QUESTIONS = 3


def _data_dir() -> Path:
    if not (DATA / "nya_chat" / "train.jsonl").is_file():
        raise MacftError(f"The demo data are not at {DATA}: `macft demo` runs from a clone of the "
                         "macft repository (pip install -e .).",
                         "git clone the repository, pip install -e '.[dev]' in it, then run macft demo.")
    return DATA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="DIR", default="macft-demo", help="Where everything goes (default ./macft-demo).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument("--backend", choices=["auto", "mlx", "cuda"], default="auto",
                   help="Training backend (default auto: MLX on Apple silicon, else PyTorch).")
    p.add_argument("--iters", type=int, default=250, metavar="N", help="LoRA training steps (default 250).")
    p.add_argument("--base-steps", type=int, default=150, metavar="N",
                   help="Steps of the full fine-tune that gives the random base its general knowledge.")


def run(args: argparse.Namespace) -> int:
    data = _data_dir()
    out = Path(args.output).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise MacftError(f"{out} already exists and is not empty.",
                             "Pass --overwrite to replace it, or --output NEW_DIR.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        rc = _run_steps(args, data, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made demo left behind
        raise
    if rc != 0:
        shutil.rmtree(out, ignore_errors=True)
    return rc


def _run_steps(args: argparse.Namespace, data: Path, out: Path) -> int:
    from .. import api
    from ..tiny import build_tiny_gemma3, corpus_from_jsonl, pretrain

    t0 = time.time()
    steps = ["llama.cpp tools", "base model", "fine-tune", "export q4_k_m", "before / after"]

    def stage(i: int) -> None:
        console.rule(f"[bold]{i + 1}/{len(steps)} {steps[i]}[/]  ({time.time() - t0:.0f} s)")

    stage(0)
    from export.llama_cpp import ensure_built

    tools = ensure_built()
    console.print(f"llama.cpp: {tools.description}")

    stage(1)
    with console.status("Building a small random-init Gemma-3 and its tokenizer ..."):
        raw = build_tiny_gemma3(out / "random-init", corpus_from_jsonl(
            [data / "nya_chat" / "train.jsonl", data / "general" / "train.jsonl"]))
    with console.status("Teaching it some general knowledge (a short full fine-tune, PyTorch) ..."):
        base = pretrain(raw, data / "general" / "train.jsonl", out / "base-model", steps=args.base_steps)
    shutil.rmtree(raw)
    console.print(f"Base model: {base} (the stand-in for a downloaded model such as google/gemma-3-1b-it)")

    stage(2)
    run_dir = out / "run"
    run = api.train(backend=args.backend, model=str(base), data=str(data / "nya_chat"), output=str(run_dir),
                    iters=args.iters, batch_size=4, learning_rate=3e-3, eval_every=50, save_every=0,
                    log_every=10, verbose=True)
    if (run.summary() or {}).get("interrupted"):
        return 130

    stage(3)
    export_dir = out / "export"
    exported = api.export(run, quant="q4_k_m", output=export_dir, verify_prompts=4, eval_tokens=1024,
                          verbose=True)
    from ..ui import out as stdout

    stdout.print(str(exported.output))  # as `macft export` prints it
    gguf = next(f for f in exported.files if f.name.endswith("-q4_k_m.gguf"))

    stage(4)
    answers = before_after(run_dir, gguf, data / "nya_chat" / "valid.jsonl")
    show(answers, gguf)
    (out / "before_after.json").write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
    console.print(f"\n[bold green]Demo finished in {time.time() - t0:.0f} s.[/] Everything is in {out}:\n"
                  f"  base model   {base}\n  run          {run_dir}  (adapter/, metrics.jsonl, loss.png)\n"
                  f"  GGUF         {gguf}\n  Modelfile    {export_dir / 'Modelfile'}")
    console.print("\nThe same with a real model (downloads google/gemma-3-1b-it; accept its licence on "
                  "huggingface.co first):\n"
                  "  macft estimate --preset gemma3-1b --data examples/data/nya_chat\n"
                  "  macft train --preset gemma3-1b --data examples/data/nya_chat --output runs/nya\n"
                  "  macft export --run runs/nya --quant q4_k_m\n"
                  "  llama-cli -m runs/nya/export/*-q4_k_m.gguf   # or: ollama create nya -f runs/nya/export/Modelfile")
    return 0


def before_after(run_dir: Path, gguf: Path, valid: Path) -> list[dict[str, str]]:
    """The first held-out questions: the base model (adapter off, the training backend) and
    the exported GGUF (llama.cpp), greedy."""
    from ..chat_session import load_chat_model
    from ..inference import Sampling
    rows = [json.loads(x) for x in valid.read_text(encoding="utf-8").splitlines() if x.strip()]
    prompts = []
    for r in rows:  # conversations up to their first reply (system prompts kept), one per question
        msgs = r["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
        if first and msgs[first - 1]["role"] == "user" and len(prompts) < QUESTIONS:
            prompts.append(msgs[:first])
    s = Sampling(max_new_tokens=40, temperature=0.0)
    out = [{"question": p[-1]["content"]} for p in prompts]
    for key, kwargs, adapters in (("before", {"run": str(run_dir)}, False),
                                  ("after", {"run": str(run_dir), "gguf": str(gguf)}, True)):
        with console.status(f"Answering with the {'base model' if key == 'before' else 'GGUF'} ..."):
            model = load_chat_model(**kwargs)
            try:
                with model.adapters(adapters):
                    for row, p in zip(out, prompts):
                        for _ in model.stream(model.prompt(p), s):
                            pass
                        row[key] = model.last.text.strip()
            finally:
                model.close()
    return out


def show(answers: list[dict[str, str]], gguf: Path) -> None:
    from rich.table import Table

    t = Table(title=f"Before (base model) and after (fine-tuned, {gguf.name} through llama.cpp)",
              title_justify="left", show_lines=True)
    t.add_column("question")
    t.add_column("before")
    t.add_column("after")
    for a in answers:
        t.add_row(a["question"], a["before"], a["after"])
    console.print(t)
