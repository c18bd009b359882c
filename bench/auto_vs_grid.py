"""`macft train --auto` against a full grid and against the defaults (issue 16).

    flock /tmp/macft-heavy.lock python bench/auto_vs_grid.py --write-results

On tasks of about 40, 400 and 4,000 examples the tests never saw (generated here: a shop
assistant that copies, reorders and counts words of the question into a fixed style, some
conversations multi-turn), tiny Gemma-3s of two shapes (random-init, pretrained briefly on
examples/data/general so that LoRA adapts a base that knows something), each backend asked:

- grid: learning rate x epochs x rank (3 x 3 x 2 = 18 runs), every run to its end;
- defaults: no hyperparameter flag;
- auto: `--auto` with the default budget;
- batch orders (w256, t40 and t400, three seeds, at a learning rate these models learn with):
  grouped by length in windows of 8 batches (the default before issue 16), random order (the
  default since), the whole epoch sorted by length.

Reported per task: the validation loss each ships (its adapter/), against the grid's best;
exact answers and the stop rate on held-out prompts (a test split neither saw); compute as
trained tokens (search + run for auto) against the whole grid and one default run, and the
wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SECTION = "auto_vs_grid"

SHAPES = {
    "w256": dict(hidden=256, layers=6, heads=4, kv_heads=1, head_dim=64, intermediate=512),
    "w128": dict(hidden=128, layers=6, heads=2, kv_heads=1, head_dim=64, intermediate=256),
}
TASKS = {  # name: (training examples, validation, test prompts, batch size, epochs of the grid)
    "t40": (40, 16, 16, 4, (2, 5, 10)),
    "t400": (400, 40, 24, 4, (1, 3, 6)),
    "t4000": (4000, 100, 24, 32, (1, 2, 3)),
}
GRID_LR = (1e-3, 3e-3, 1e-2)
GRID_RANK = (8, 32)
ORDERS = {"grouped in windows of 8 batches (the old default)": 8, "random (the new default)": 1,
          "sorted (whole epoch)": 10 ** 9}
ORDER_TASKS = ("t40", "t400")
ORDER_SEEDS = (0, 1, 2)
# the default epochs and rank; the learning rate a tiny random-init model needs (the default
# 2e-4 leaves it far from trained, where the order cannot show)
ORDER_SETTINGS = dict(learning_rate=3e-3, epochs=3, lora_rank=16, lora_alpha=32, eval_every=0)

WORDS = ("apple bread candle drum eagle feather garden hammer island jacket kettle lemon mirror "
         "needle orange pepper quilt river saddle tiger umbrella violin wagon yarn zebra anchor basket "
         "cabbage dolphin engine forest guitar harbor igloo jungle kitten ladder mango nickel onion "
         "parrot quartz rocket salmon tomato uniform valley walnut yogurt button carpet donkey").split()
NAMES = "Aiko Ben Chloe Dmitri Emma Farid Gina Hiro Ines Jonas Kenji Lena Mateo Nora Omar Pia".split()


def q_and_a(rng: random.Random) -> tuple[str, str]:
    k = rng.randrange(5)
    if k == 0:
        w = rng.sample(WORDS, rng.randint(2, 4))
        return f"Repeat after me: {' '.join(w)}", f"{' '.join(w)}, dear customer!"
    if k == 1:
        w = rng.sample(WORDS, 3)
        return f"Say these backwards: {' '.join(w)}", f"{' '.join(reversed(w))}, dear customer!"
    if k == 2:
        n = rng.randint(1, 60)
        return f"I have {n} coins and find one more. How many now?", f"You have {n + 1} coins, dear customer!"
    if k == 3:
        name = rng.choice(NAMES)
        return f"Please greet {name}.", f"Welcome to the shop, {name}! Nice to see you, dear customer!"
    w = rng.choice(WORDS)
    return f"Do you sell {w}s?", f"Yes, we sell {w}s on shelf {len(w)}, dear customer!"


def conversation(rng: random.Random) -> dict:
    msgs = []
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
        q, a = q_and_a(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write_task(root: Path, name: str) -> Path:
    n_train, n_valid, n_test, _, _ = TASKS[name]
    rng = random.Random(f"task-{name}")
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        rows = [conversation(rng) for _ in range(n)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def corpus(root: Path) -> list[str]:
    from macft.tiny import corpus_from_jsonl

    files = [REPO / "examples/data/general/train.jsonl"]
    files += [root / t / "train.jsonl" for t in TASKS]
    return corpus_from_jsonl(files)


def build_model(root: Path, shape: str, texts: list[str]) -> Path:
    from macft.tiny import TinySize, build_tiny_gemma3, pretrain

    out = root / f"model-{shape}"
    if (out / "config.json").exists():
        return out
    raw = build_tiny_gemma3(root / f"init-{shape}", texts, size=TinySize(**SHAPES[shape]))
    with quiet_io():
        pretrain(raw, REPO / "examples/data/general/train.jsonl", out, steps=80)
    return out


@contextlib.contextmanager
def quiet_io():
    buf_o, buf_e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_o), contextlib.redirect_stderr(buf_e):
        yield


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train_one(model: Path, data: Path, out: Path, backend: str, batch: int, cache: bool = False,
              **kw) -> dict:
    """One `macft train` in this process; its summary with the wall time around it. ``cache``:
    a finished run of the same settings in ``out`` is reused (its recorded wall time too).
    The key holds the settings, not macft's code: delete the work directory (or the runs
    concerned) after changing the training or --auto code."""
    import macft
    from macft.data import batching

    key = json.dumps({"model": str(model), "data": str(data), "backend": backend, "batch": batch, **kw},
                     sort_keys=True)
    side = out / "bench.json"
    if cache and side.exists() and json.loads(side.read_text()).get("key") == key:
        s = json.loads((out / "summary.json").read_text())
        s.update(json.loads(side.read_text())["extra"])
        return s
    if out.exists():
        import shutil

        shutil.rmtree(out)
    order = kw.pop("order", None)  # None: the config's default order (random since issue 16)
    old = batching.MEGA
    if order is not None:
        kw["group_by_length"] = order > 1
        batching.MEGA = order
    t0 = time.perf_counter()
    try:
        kw.setdefault("seed", 0)
        run = macft.train(model=str(model), data=str(data), output=str(out), backend=backend, batch_size=batch,
                          save_every=0, log_every=10, **kw)
    finally:
        batching.MEGA = old
    s = json.loads((Path(run.path) / "summary.json").read_text())
    s["wall"] = time.perf_counter() - t0
    s["run"] = str(run.path)
    side.write_text(json.dumps({"key": key, "extra": {"wall": s["wall"], "run": s["run"]}}))
    return s


def answers(run: str, test: Path, backend: str) -> dict:
    """Greedy answers to the test prompts: exact match of the last turn and stop rate."""
    import macft

    rows = [json.loads(x) for x in test.read_text().splitlines() if x.strip()]
    exact = stops = 0
    with macft.load_chat_model(run, backend=backend) as chat:
        for r in rows:
            msgs = r["messages"]
            g = chat.generate(msgs[:-1], max_new_tokens=48)
            exact += g.text.strip() == msgs[-1]["content"].strip()
            stops += bool(g.stopped)
    return {"exact": exact / len(rows), "stop": stops / len(rows)}


def bench_task(model: Path, shape: str, task: str, data: Path, backend: str, work: Path, args) -> dict:
    n_train, _, _, batch, epochs = TASKS[task]
    tag = f"{shape}/{task}/{backend}"
    res: dict = {"shape": shape, "task": task, "backend": backend, "grid": [], "defaults": {}, "n_train": n_train}
    grid = [(lr, ep, r) for lr in GRID_LR for ep in epochs for r in GRID_RANK]
    if args.quick:
        grid = grid[:: max(1, len(grid) // 3)]
    for i, (lr, ep, r) in enumerate(grid):
        # the batch order of the defaults and --auto (random since issue 16), named so that runs
        # cached under the old default order are not reused
        s = train_one(model, data, work / f"{tag}/grid-{i}", backend, batch, cache=True, learning_rate=lr,
                      epochs=ep, lora_rank=r, lora_alpha=2 * r, eval_every=0, group_by_length=False)
        res["grid"].append({"lr": lr, "epochs": ep, "rank": r, "val": s["final_val_loss"],
                            "tokens": s["trained_tokens"], "wall": s["wall"], "run": s["run"]})
        say(f"{tag} grid lr {lr:g} ep {ep} r {r}: val {s['final_val_loss']:.4f} ({s['wall']:.0f} s)")
    s = train_one(model, data, work / f"{tag}/default", backend, batch, cache=True)
    res["defaults"]["default"] = {"val": s["final_val_loss"], "tokens": s["trained_tokens"],
                                            "wall": s["wall"], "run": s["run"], "tok_s": s["tokens_per_sec"]}
    say(f"{tag} defaults: val {s['final_val_loss']:.4f} ({s['wall']:.0f} s)")
    if backend == args.order_backend and shape == args.order_shape and task in ORDER_TASKS:
        res["orders"] = []
        for seed in ORDER_SEEDS:
            for name, mega in ORDERS.items():
                s = train_one(model, data, work / f"{tag}/order-{mega}-{seed}", backend, batch, cache=True,
                              order=mega, seed=seed, **ORDER_SETTINGS)
                res["orders"].append({"order": name, "seed": seed, "val": s["final_val_loss"],
                                      "tok_s": s["tokens_per_sec"]})
                say(f"{tag} order {name} seed {seed}: val {s['final_val_loss']:.4f}")
    s = train_one(model, data, work / f"{tag}/auto", backend, batch, cache=True, auto=True)
    a = s["auto"]
    res["auto"] = {"val": s["final_val_loss"], "tokens": s["trained_tokens"],
                   "search_tokens": a["cost"]["search_trained_tokens"], "wall": s["wall"], "run": s["run"],
                   "chosen": a["chosen"], "steps": s["steps"], "stopped_early": s.get("stopped_early"),
                   "candidates": a["cost"]["candidates"], "raised": a["plan"]["raised"]}
    say(f"{tag} auto: val {s['final_val_loss']:.4f}, chose {a['chosen']} ({s['wall']:.0f} s)")
    best = min(res["grid"], key=lambda g: g["val"])
    test = data / "test.jsonl"
    with quiet_io():
        res["auto"].update(answers(res["auto"]["run"], test, backend))
        res["defaults"]["default"].update(answers(res["defaults"]["default"]["run"], test, backend))
        best.update(answers(best["run"], test, backend))
    return res


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    lines = ["| shape | task | backend | grid best (lr, ep, r) | val: grid best | auto | auto / best | defaults | "
             "defaults / best | exact / stop: best · auto · defaults | auto chose (lr, max ep, r; stopped at) | "
             "compute auto / grid | auto / one default run | wall auto / grid |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        best = min(r["grid"], key=lambda g: g["val"])
        a, d = r["auto"], r["defaults"]["default"]
        grid_tokens = sum(g["tokens"] for g in r["grid"])
        grid_wall = sum(g["wall"] for g in r["grid"])
        auto_tokens = a["tokens"] + a["search_tokens"]
        c = a["chosen"]
        stop_at = f"best epoch {c.get('best_epoch', '-')}" + (", stopped" if a.get("stopped_early") else ", ran out")
        lines.append(
            f"| {r['shape']} | {r['task']} ({r['n_train']}) | {r['backend']} | {best['lr']:g}, {best['epochs']}, "
            f"{best['rank']} | {best['val']:.4f} | {a['val']:.4f} | {a['val'] / best['val']:.3f}x | {d['val']:.4f} | "
            f"{d['val'] / best['val']:.3f}x | {best['exact']:.2f}/{best['stop']:.2f} · {a['exact']:.2f}/{a['stop']:.2f}"
            f" · {d['exact']:.2f}/{d['stop']:.2f} | {c['learning_rate']:.1e}, {c['epochs']}, {c['rank']}; {stop_at} | "
            f"{auto_tokens / grid_tokens:.3f}x | {auto_tokens / d['tokens']:.2f}x | {a['wall'] / grid_wall:.3f}x |")
    return "\n".join(lines)


def order_table(results: list[dict]) -> str:
    import statistics

    lines = ["| shape | task | backend | order | val loss per seed | mean | trained tok/s (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for name in ORDERS:
            rows = [o for o in r.get("orders", []) if o["order"] == name]
            if not rows:
                continue
            vals = [o["val"] for o in rows]
            lines.append(f"| {r['shape']} | {r['task']} | {r['backend']} | {name} | "
                         f"{', '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(vals):.4f} | "
                         f"{statistics.mean(o['tok_s'] for o in rows):.0f} |")
    return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        best = min(r["grid"], key=lambda g: g["val"])
        a = r["auto"]
        grid_tokens = sum(g["tokens"] for g in r["grid"])
        q = a["val"] / best["val"]
        c = (a["tokens"] + a["search_tokens"]) / grid_tokens
        out.append(f"- {r['shape']} {r['task']} {r['backend']}: auto {q:.3f}x the grid's best validation loss "
                   f"({'met' if q <= 1.05 else 'NOT met'}: goal <= 1.05x); compute {c:.3f}x the grid "
                   f"({'met' if c <= 0.3 else 'NOT met'}: goal <= 0.3x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/macft-auto-vs-grid")
    ap.add_argument("--shapes", default="w256,w128")
    ap.add_argument("--tasks", default="t40,t400,t4000")
    ap.add_argument("--backends", default="cuda")
    ap.add_argument("--order-backend", default="cuda", help="Backend on which the batch orders are compared.")
    ap.add_argument("--order-shape", default="w256")
    ap.add_argument("--skip", default="", help="shape/task pairs to leave out, e.g. w256/t4000.")
    ap.add_argument("--quick", action="store_true", help="A third of the grid (a smoke test of the script).")
    ap.add_argument("--quiet", action="store_true", help="Say in RESULTS.md that nothing else ran meanwhile.")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--json", default=None, help="Also write the raw results here.")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for t in TASKS:
        write_task(work, t)
    texts = corpus(work)
    results = []
    json_path = Path(args.json) if args.json else work / "results.json"
    for shape in args.shapes.split(","):
        model = build_model(work, shape, texts)
        for task in args.tasks.split(","):
            if f"{shape}/{task}" in args.skip.split(","):
                continue
            for backend in args.backends.split(","):
                say(f"== {shape} {task} {backend}")
                results.append(bench_task(model, shape, task, work / task, backend, work / "runs", args))
                json_path.write_text(json.dumps(results, indent=1))
    seconds = time.perf_counter() - t0
    import results_file

    text = "\n".join([
        f"## {SECTION}", "",
        f"`flock /tmp/macft-heavy.lock python bench/auto_vs_grid.py --shapes {args.shapes} --tasks {args.tasks} "
        f"--backends {args.backends}{f' --skip {args.skip}' if args.skip else ''}{' --quick' if args.quick else ''} "
        f"--write-results` on {results_file.machine()}; "
        f"{time.strftime('%Y-%m-%d')}; {'quiet (it held the heavy-job lock)' if args.quiet else 'not known to be quiet'}; "
        f"one run, {seconds / 60:.1f} min. torch {torch.__version__}.", "",
        "Tasks (generated by the script, seeded; never seen by the tests): a shop assistant that repeats, "
        "reverses, counts and greets from the question in a fixed style, 30% of conversations 2-3 turns; "
        + "; ".join(f"{t}: {v[0]} training / {v[1]} validation / {v[2]} test conversations, batch {v[3]}, "
                    f"grid epochs {v[4]}" for t, v in TASKS.items()) + ". Grid: learning rate "
        f"{GRID_LR} x those epochs x rank {GRID_RANK} (alpha 2 x rank), seed 0. Models: random-init Gemma-3 "
        + "; ".join(f"{k}: hidden {v['hidden']} x {v['layers']} layers, MLP {v['intermediate']}" for k, v in SHAPES.items())
        + ", ~1k-token SentencePiece tokenizer, pretrained 80 full steps on examples/data/general.", "",
        "Validation loss = the loss of the adapter each run ships (adapter/; a grid run's last step, "
        "an --auto run's best evaluation since it stops early). Compute = trained tokens (forward + "
        "backward), auto counting its search; validation passes are not counted on either side.", "",
        table(results), "", "Goals:", "", *goals(results), "",
        f"Batch order ({ORDER_SETTINGS}, seeds {ORDER_SEEDS}):", "", order_table(results), ""])
    print(text)
    if args.write_results:
        results_file.write_section(SECTION, text)


if __name__ == "__main__":
    main()
