"""Benchmark: what the importance matrix `macft export` computes from the run's own data buys,
against a generic-text matrix and no matrix; and which merge base `--merge-base auto` picks on
QLoRA runs, by how much.

    flock /tmp/macft-heavy.lock python bench/imatrix_gain.py [--quick] [--write-results]

Per model (random-init Gemma-3 built by :func:`macft.tiny.build_tiny_gemma3`, one with widths
that are multiples of 256 and one whose hidden width is not, so most of its k-quant tensors
fall back to 32-wide blocks):

1. a short full pretrain on examples/data/general (:func:`macft.tiny.pretrain`), so that the
   activations have some structure (an importance matrix weighs columns by them);
2. a LoRA fine-tune with ``macft train --backend mlx`` on the chat task examples/data/nya_chat
   (all 400 training rows); validation: a held-out set of the same generator
   (examples/data/make_data.py's held-out items: the 40 rows of nya_chat/valid.jsonl plus rows
   drawn with another seed), so the export's KL divergence is scored on a few thousand tokens;
3. three exports of the run, ``--quant q4_k_m,q3_k_m,iq4_xs``:
   - default: the matrix computed from the run's training conversations (``--keep-intermediate``
     keeps the 16-bit GGUF);
   - ``--imatrix generic.gguf``: a matrix computed here with ``llama-imatrix`` on that 16-bit
     GGUF over generic English prose that is not the user's data (the pinned llama.cpp's
     docs/*.md), with the same chunk count and context as the user's-data matrix;
   - ``--no-imatrix`` (K-quants only: iq4_xs is refused without a matrix). The "none" figures
     of every type are the exports' own ``without_imatrix`` measurements (the same type
     quantized without the matrix, scored on the same tokens); the --no-imatrix export checks
     them.
   KL divergence, same top and PPL ratio are the exports' figures (against the merged HF model
   on the held-out conversations, llama-perplexity).
4. measured here, per type and matrix, on the very files (re-made with llama-quantize from the
   16-bit GGUF where the export published the other variant):
   - the export's measurement on more tokens: other held-out conversations rendered with the
     chat template (special tokens included), the merged HF model's log-probs (16-bit weights)
     written in llama-perplexity's --kl-divergence-base format with their token ids
     (export/verify.py), then ``llama-perplexity --kl-divergence``: its final ``Mean KLD ± ...``
     (6 decimals and the uncertainty; the export reads the 5-decimal per-chunk line);
   - KL divergence to the 16-bit GGUF's own logits on held-out plain text (the same rows'
     messages, no chat markup: llama-perplexity does not parse special tokens from a text);
   - held-out exact match: greedy ``llama-completion`` answers to the held-out prompts (chat
     template, as training rendered them) equal to the data's reference answer.
5. merge base: QLoRA runs (``macft train --backend cuda --quantize 4bit`` and ``8bit``, on the
   CPU) of the first model, exported with the default ``--merge-base auto``; the report's
   ``merge.candidates`` give the KL divergence of each merge's 16-bit GGUF to the training-time
   model (quantized base + adapter, peft) and its greedy agreement.

``--quick``: the 256-wide test model, q4_k_m only, a few steps, the NF4 run only (a smoke run,
1.7 minutes on the 2-core CPU). Run it under the heavy-job lock: it trains and exports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "examples" / "data"
SECTION = "imatrix_gain"
VARIANTS = ("none", "generic", "user")

# hidden, layers, heads, kv heads, head_dim, MLP width; the tokenizer is the tiny one (~1k tokens)
MODELS = {
    "w1024": dict(hidden=1024, layers=6, heads=8, kv_heads=4, head_dim=128, intermediate=2816,
                  initializer_range=0.02),
    # Gemma-3 1B's hidden width and heads; 6 layers: macft's MLX mapping needs a full-attention layer
    "w1152": dict(hidden=1152, layers=6, heads=4, kv_heads=1, head_dim=256, intermediate=3072,
                  initializer_range=0.02),
    "tiny": dict(hidden=256, layers=6, heads=4, kv_heads=1, head_dim=64, intermediate=512),
}

FULL = dict(models="w1024,w1152", quant="q4_k_m,q3_k_m,iq4_xs", pretrain_steps=80, iters=120,
            qlora="4bit,8bit", qlora_iters=20, heldout_extra=160, exact_prompts=40, kl_rows=360, kl_tokens=8192)
QUICK = dict(models="tiny", quant="q4_k_m", pretrain_steps=20, iters=30, qlora="4bit", qlora_iters=4,
             heldout_extra=0, exact_prompts=16, kl_rows=120, kl_tokens=2048)

T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def sh(cmd: list, log: Path, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run a command, its output to ``log``; raise with the tail on failure."""
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", cwd=cwd,
                       env=env)
    out = r.stdout + "\n" + r.stderr
    log.write_text(" ".join(map(str, cmd)) + "\n\n" + out)
    if r.returncode != 0:
        raise SystemExit(f"FAILED ({r.returncode}) after {time.time() - t:.0f} s: {' '.join(map(str, cmd))}\n"
                         f"{out[-4000:]}")
    return out


# --------------------------------------------------------------------------- data


def heldout_rows(extra: int, seed: int = 4242) -> list[dict]:
    """nya_chat/valid.jsonl and ``extra`` rows more from the same held-out items
    (make_data.py: numbers 40-51 for arithmetic; colours, animals, capitals shared with train)."""
    import random

    sys.path.insert(0, str(DATA))
    import make_data

    rng = random.Random(1234)  # make_data.main's order: train items, then held-out items
    make_data.qa_items(rng, range(1, 40))
    valid_items = make_data.qa_items(rng, range(40, 52))
    rows = [json.loads(x) for x in (DATA / "nya_chat" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()]
    if extra:
        rows += make_data.build(valid_items, random.Random(seed), extra, cat=True)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prepare_data(root: Path, p: dict) -> tuple[Path, Path]:
    """(data dir for training: train.jsonl = nya_chat's 400 rows, valid.jsonl = the held-out
    rows; plain held-out text for llama-perplexity). Also writes heldout-kl.jsonl: other held-out
    rows, for the KL divergence measured here."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "nya_chat" / "train.jsonl", d / "train.jsonl")
    write_jsonl(d / "valid.jsonl", heldout_rows(p["heldout_extra"]))
    # for the KL measured here: more held-out rows (another seed), as conversations and as plain text
    kl_rows = heldout_rows(p["kl_rows"], seed=777)[40:]
    write_jsonl(root / "heldout-kl.jsonl", kl_rows)
    text = root / "heldout-plain.txt"
    text.write_text("\n".join(m["content"] for r in kl_rows for m in r["messages"]) + "\n", encoding="utf-8")
    return d, text


def generic_text(tools, dest: Path, min_chars: int) -> Path:
    """Generic English prose that is not the user's data: the pinned llama.cpp's docs."""
    parts, n = [], 0
    for f in sorted((tools.root / "docs").rglob("*.md")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(t)
        if n >= min_chars:
            break
    dest.write_text("\n\n".join(parts), encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- models, runs


def build_model(name: str, root: Path, p: dict, logs: Path) -> Path:
    from macft.tiny import TinySize, build_tiny_gemma3, corpus_from_jsonl, pretrain

    texts = corpus_from_jsonl([DATA / "nya_chat" / "train.jsonl", DATA / "general" / "train.jsonl"])
    raw = build_tiny_gemma3(root / f"{name}-init", texts, size=TinySize(**MODELS[name]))
    t = time.time()
    base = pretrain(raw, DATA / "general" / "train.jsonl", root / f"{name}-base", steps=p["pretrain_steps"],
                    lr=1e-3)
    shutil.rmtree(raw)
    say(f"{name}: pretrained {p['pretrain_steps']} steps on examples/data/general ({time.time() - t:.0f} s)")
    return base


def train(base: Path, data: Path, out: Path, iters: int, logs: Path, quantize: str = "none") -> dict:
    backend = "mlx" if quantize == "none" else "cuda"  # bitsandbytes QLoRA: the torch backend
    t = time.time()
    sh([sys.executable, "-m", "macft", "train", "--model", base, "--data", data, "--backend", backend,
        "--quantize", quantize, "--iters", iters, "--learning-rate", "3e-3", "--batch-size", 4,
        "--eval-every", 0, "--save-every", 0, "--log-every", 10, "--seed", 0, "--output", out],
       logs / f"train-{out.name}.log")
    s = json.loads((out / "summary.json").read_text())
    say(f"trained {out.name} ({backend}, --quantize {quantize}, {iters} steps): validation loss "
        f"{s['final_val_loss']:.3f} ({time.time() - t:.0f} s)")
    return {"steps": iters, "backend": backend, "quantize": quantize, "val_loss": s["final_val_loss"],
            "seconds": round(time.time() - t, 1)}


def export(run: Path, out: Path, quant: str, logs: Path, *extra) -> dict:
    t = time.time()
    sh([sys.executable, "-m", "macft", "export", "--run", run, "--quant", quant, "--output", out, *extra],
       logs / f"export-{out.name}.log")
    rep = json.loads((out / "export-report.json").read_text())
    say(f"exported {out.name} ({' '.join(map(str, extra)) or 'defaults'}): {time.time() - t:.0f} s")
    rep["_seconds"] = round(time.time() - t, 1)
    return rep


def file_entry(rep: dict, q: str) -> dict:
    return next(f for f in rep["files"] if f["kind"] == q)


def with_figures(entry: dict) -> dict:
    """The figures of the file quantized with the matrix (published or not)."""
    if entry.get("imatrix"):
        return {k: entry.get(k) for k in ("kl_divergence", "same_top", "ppl_ratio", "perplexity")}
    w = dict(entry.get("with_imatrix") or {})
    if w.get("ln_ppl_ratio") is not None:
        import math

        w["ppl_ratio"] = math.exp(w["ln_ppl_ratio"])
    return w


def generic_imatrix(tools, gguf16: Path, user: dict, work: Path, logs: Path) -> dict:
    """llama-imatrix over the generic text, as many chunks of the same length as the user's matrix."""
    n_ctx, chunks = user["n_ctx"], user["chunks"]
    text = generic_text(tools, work / "generic.txt", min_chars=n_ctx * chunks * 5)
    out = work / "generic-imatrix.gguf"
    t = time.time()
    log = sh([tools.tool("llama-imatrix"), "-m", gguf16, "-f", text.name, "-o", out.name, "-c", n_ctx,
              "--chunks", chunks, "--output-frequency", 10 ** 6], logs / f"imatrix-{gguf16.stem}.log", cwd=work)
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", log)
    got = int(m.group(1)) if m else None
    if got != chunks:
        raise SystemExit(f"the generic text gave {got} chunks of {n_ctx}, not {chunks}: make it longer")
    say(f"generic importance matrix: {chunks} chunks of {n_ctx} tokens of llama.cpp docs ({time.time() - t:.0f} s)")
    return {"file": out, "chunks": chunks, "n_ctx": n_ctx, "chars": len(text.read_text()),
            "seconds": round(time.time() - t, 1)}


# --------------------------------------------------------------------------- measured here


_MEAN_KLD = re.compile(r"Mean\s+KLD:\s+(-?[\d.]+)\s+±\s+([\d.]+)")
_SAME_TOP = re.compile(r"Same top p:\s+([\d.]+)\s+±\s+([\d.]+)\s*%")


def llama_kld(tools, gguf: Path, base_kld: Path, n_ctx: int, log: Path) -> dict:
    """llama-perplexity --kl-divergence against the 16-bit GGUF's logits; the final statistics
    (its log thread sometimes loses the last lines: retried)."""
    cmd = [tools.tool("llama-perplexity"), "-m", gguf, "--kl-divergence-base", base_kld, "--kl-divergence",
           "-c", n_ctx]
    for _ in range(5):
        out = sh(cmd, log)
        k, s = _MEAN_KLD.search(out), _SAME_TOP.search(out)
        if k and s:
            return {"kld": float(k.group(1)), "kld_err": float(k.group(2)), "same_top": float(s.group(1)) / 100,
                    "same_top_err": float(s.group(2)) / 100}
    raise SystemExit(f"llama-perplexity printed no KL statistics for {gguf}; see {log}")


def chat_kld_base(merged: Path, gguf16: Path, rows: Path, out: Path, max_tokens: int):
    """Reference log-probs of the merged HF model (weights rounded as in the 16-bit GGUF) on the
    held-out conversations rendered as training rendered them, in llama-perplexity's
    --kl-divergence-base format with the token ids (special tokens included): the export's own
    measurement (export/verify.py), on more tokens."""
    from export.gguf_info import read_gguf
    from export.reference import HFModel
    from export.verify import plan_kld, write_kld_file
    from macft.data.dataset import load_samples
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(merged))
    r = Renderer(tok, "assistant")
    _, samples = load_samples(str(rows), "auto", "validation")
    stream = [i for s in samples for i in r.render(s).ids]
    info = read_gguf(gguf16)
    n_vocab = len(info.tokens)
    kld = plan_kld(stream, add_bos=info.add_bos, bos_id=tok.bos_token_id, n_vocab=n_vocab, max_scored=max_tokens,
                   max_ctx=2048)
    m = HFModel(merged)
    m.round_weights("bf16" if gguf16.name.endswith("-bf16.gguf") else "f16")
    write_kld_file(out, kld, n_vocab, lambda c, k: m.logits(c, keep_last=k))
    m.close()
    return kld


def heldout_prompts(model_dir: Path, valid: Path, n: int) -> list[dict]:
    """The held-out conversations up to their last answer, rendered as training rendered them."""
    from macft.data.dataset import load_samples
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    r = Renderer(tok, "assistant")
    _, samples = load_samples(str(valid), "auto", "validation")
    out = []
    for s in samples[:n]:
        last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
        text = r.render_text(s.messages[:last], add_generation_prompt=True)
        ids = r.encode(text)
        if tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]  # the GGUF adds BOS itself
        out.append({"text": text, "ids": ids, "answer": s.messages[last]["content"].strip()})
    return out


def exact_match(tools, gguf: Path, prompts: list[dict], tok, end_ids: list[int], work: Path,
                max_new: int = 32) -> dict:
    from export.verify import LlamaRunner

    runner = LlamaRunner(tools)
    hits = stops = bad_prompt = 0
    answers = []
    for p in prompts:
        n_ctx = max(256, -(-(len(p["ids"]) + max_new + 16) // 256) * 256)
        ids = runner.generate(gguf, p["text"], max_new, n_ctx, work)
        if ids[:len(p["ids"])] != p["ids"]:
            bad_prompt += 1
        gen = ids[len(p["ids"]):]
        cut = next((i for i, t in enumerate(gen) if t in end_ids), None)
        stops += cut is not None
        ans = tok.decode(gen[:cut] if cut is not None else gen, skip_special_tokens=True).strip()
        hits += ans == p["answer"]
        answers.append(ans)
    n = len(prompts)
    return {"exact": hits / n, "hits": hits, "n": n, "stop_rate": stops / n, "prompt_mismatch": bad_prompt,
            "answers": answers[:5]}


def variant_file(tools, ex: dict, q: str, v: str, gguf16: Path, work: Path, logs: Path) -> Path:
    """The GGUF of type ``q`` made with matrix ``v``: the file an export published when it is
    that variant, else made here from the same 16-bit GGUF (llama-quantize is deterministic)."""
    from export.quantize import FTYPES

    reports, dirs = ex["reports"], ex["dirs"]
    if v == "none" and "none" in reports and any(f["kind"] == q for f in reports["none"]["files"]):
        return dirs["none"] / file_entry(reports["none"], q)["file"]
    src = "generic" if v == "generic" else "user"
    entry = file_entry(reports[src], q)
    if bool(entry.get("imatrix")) == (v != "none"):
        return dirs[src] / entry["file"]
    dst = work / f"{q}-{v}.gguf"
    imx = None if v == "none" else (ex["imatrix_files"][v])
    cmd = [tools.tool("llama-quantize")]
    if imx is not None:
        cmd += ["--imatrix", imx]
    sh(cmd + [gguf16, dst, FTYPES[q]], logs / f"quantize-{dst.stem}.log")
    return dst


def measure_model(name: str, root: Path, p: dict, data: Path, plain: Path, tools, logs: Path) -> dict:
    from macft.data.tokenizer import load_tokenizer

    t_model = time.time()
    res: dict = {"model": name, "shape": MODELS[name]}
    base = build_model(name, root, p, logs)
    res["base_bytes"] = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    res["params"] = res["base_bytes"] // 4  # fp32
    run = root / f"{name}-run"
    res["train"] = train(base, data, run, p["iters"], logs)
    quants = p["quant"]
    dirs = {v: root / f"{name}-export-{v}" for v in VARIANTS}
    reports = {"user": export(run, dirs["user"], quants, logs, "--keep-intermediate")}
    user_imx = reports["user"]["imatrix"]
    gguf16 = next(dirs["user"] / f for f in reports["user"]["outputs"] if f.endswith(("-f16.gguf", "-bf16.gguf")))
    work = root / f"{name}-work"
    work.mkdir()
    gen = generic_imatrix(tools, gguf16, user_imx, work, logs)
    reports["generic"] = export(run, dirs["generic"], quants, logs, "--imatrix", gen["file"])
    k_quants = ",".join(q for q in quants.split(",") if not q.startswith("iq"))
    if k_quants:
        reports["none"] = export(run, dirs["none"], k_quants, logs, "--no-imatrix")
    ex = {"reports": reports, "dirs": dirs,
          "imatrix_files": {"user": dirs["user"] / user_imx["file"], "generic": gen["file"]}}
    # -- measured here: KL to the 16-bit GGUF with its uncertainty, exact match -----------------
    t = time.time()
    base_kld = work / "f16.kld"  # plain text: the 16-bit GGUF's own logits
    n_ctx = 256
    sh([tools.tool("llama-perplexity"), "-m", gguf16, "-f", plain, "-c", n_ctx, "--kl-divergence-base", base_kld],
       logs / f"ppl-base-{name}.log")
    merged = dirs["user"] / "merged"
    chat_kld = work / "chat.kld"  # conversations: the merged HF model's logits
    ck = chat_kld_base(merged, gguf16, root / "heldout-kl.jsonl", chat_kld, p["kl_tokens"])
    chat16 = llama_kld(tools, gguf16, chat_kld, ck.n_ctx, logs / f"kld-chat-{name}-16bit.log")
    tok = load_tokenizer(str(base))
    end_ids = [tok.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<eos>")]
    prompts = heldout_prompts(base, data / "valid.jsonl", p["exact_prompts"])
    rows = []
    em16 = exact_match(tools, gguf16, prompts, tok, end_ids, work)
    for q in quants.split(","):
        row: dict = {"type": q, "export": {}, "here": {}}
        ue, ge = file_entry(reports["user"], q), file_entry(reports["generic"], q)
        row["export"]["user"] = with_figures(ue)
        row["export"]["generic"] = with_figures(ge)
        row["export"]["none"] = dict(ue.get("without_imatrix") or {})
        row["export"]["none_in_generic_export"] = dict(ge.get("without_imatrix") or {})
        if "none" in reports and any(f["kind"] == q for f in reports["none"]["files"]):
            ne = file_entry(reports["none"], q)
            row["export"]["none_export"] = {k: ne.get(k) for k in ("kl_divergence", "same_top", "ppl_ratio")}
        row["published"] = {"user": "with matrix" if ue.get("imatrix") else "without (export's choice)",
                            "generic": "with matrix" if ge.get("imatrix") else "without (export's choice)"}
        row["fallbacks"] = len(ue.get("fallbacks") or [])
        row["types"] = ue.get("types")
        for v in VARIANTS:
            f = variant_file(tools, ex, q, v, gguf16, work, logs)
            chat = llama_kld(tools, f, chat_kld, ck.n_ctx, logs / f"kld-chat-{name}-{q}-{v}.log")
            row["here"][v] = {**llama_kld(tools, f, base_kld, n_ctx, logs / f"kld-{name}-{q}-{v}.log"),
                              **{f"chat_{k}": x for k, x in chat.items()},
                              **exact_match(tools, f, prompts, tok, end_ids, work), "bytes": f.stat().st_size}
        rows.append(row)
        say(f"{name} {q}: KL none/generic/user (export) {row['export']['none'].get('kl_divergence')} / "
            f"{row['export']['generic'].get('kl_divergence')} / {row['export']['user'].get('kl_divergence')}; "
            f"here {' / '.join(format(row['here'][v]['chat_kld'], '.6f') for v in VARIANTS)} (chat), "
            f"{' / '.join(format(row['here'][v]['kld'], '.6f') for v in VARIANTS)} (plain); exact "
            f"{' / '.join(str(row['here'][v]['hits']) for v in VARIANTS)} of {len(prompts)}")
    res.update(rows=rows, exact_f16=em16, chat_kl_16bit=chat16, chat_kl_tokens=ck.scored, imatrix_user=user_imx,
               imatrix_generic={k: v for k, v in gen.items() if k != "file"},
               validation=reports["user"]["validation"], measured_seconds=round(time.time() - t, 1),
               export_seconds={v: r["_seconds"] for v, r in reports.items()},
               merge_check=reports["user"]["merge"].get("check"), seconds=round(time.time() - t_model, 1),
               base_dir=str(base), run_dir=str(run))
    # keep the disk small: the exports are not needed any more
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def merge_base_runs(base: Path, data: Path, root: Path, p: dict, logs: Path) -> list[dict]:
    out = []
    for qz in [q for q in p["qlora"].split(",") if q]:
        run = root / f"qlora-{qz}"
        tr = train(base, data, run, p["qlora_iters"], logs, quantize=qz)
        rep = export(run, root / f"qlora-{qz}-export", "q4_k_m", logs)
        m = rep["merge"]
        out.append({"quantize": qz, "train": tr, "base_quantization": rep["inputs"]["base_quantization"],
                    "candidates": m.get("candidates"), "chosen": m.get("chosen"), "why": m.get("why"),
                    "measured_on": m.get("measured_on"), "check": m.get("check"), "seconds": rep["_seconds"]})
        shutil.rmtree(root / f"qlora-{qz}-export", ignore_errors=True)
    return out


# --------------------------------------------------------------------------- tables


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


KL_RESOLUTION = 0.000005  # the export reads llama-perplexity's per-chunk line: 5 decimals


def merge_ratio(other, chosen) -> str:
    if other is None or chosen is None:
        return "-"
    if chosen == 0:  # below the export's resolution
        return f"> {other / KL_RESOLUTION:.0f}x (dequantized < {KL_RESOLUTION})" if other else "-"
    return f"{other / chosen:.2f}x"


def tables(results: list[dict], merges: list[dict]) -> str:
    lines = ["Export figures (KL divergence and same top against the merged HF model on the held-out "
             "conversations, llama-perplexity; none = the export's `without_imatrix`):", "",
             "| model | type | KL none | KL generic | KL user | user / none | user / generic | "
             "same top none / generic / user | PPL ratio none / generic / user | published by the default export |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            e = row["export"]
            kn, kg, ku = (e[v].get("kl_divergence") for v in VARIANTS)
            st = " / ".join(fmt(e[v].get("same_top"), ".1%") for v in VARIANTS)
            pr = " / ".join(fmt(e[v].get("ppl_ratio"), ".4f") for v in VARIANTS)
            lines.append(f"| {r['model']} | {row['type']} | {fmt(kn)} | {fmt(kg)} | {fmt(ku)} | {ratio(ku, kn)} | "
                         f"{ratio(ku, kg)} | {st} | {pr} | {row['published']['user']} |")
    def pm(h: dict, key: str) -> str:
        return f"{h[key]:.6f} ± {h[key + '_err']:.6f}"

    chat = ["", "Measured here on the same files, the export's method on more tokens: KL divergence on other "
            "held-out conversations (rendered with the chat template, special tokens included) against the "
            "merged HF model with the GGUF's 16-bit weights, llama-perplexity's `Mean KLD ± uncertainty` "
            "(6 decimals):", "",
            "| model | type | scored tokens | KL none | KL generic | KL user | user / none | user / generic | "
            "same top none / generic / user | 16-bit GGUF's own KL |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    plain = ["", "KL divergence to the 16-bit GGUF's own logits on held-out plain text (the same rows' "
             "messages joined by newlines, no chat markup), llama-perplexity:", "",
             "| model | type | KL none | KL generic | KL user | user / none | user / generic |",
             "|---|---|---|---|---|---|---|"]
    exact = ["", "Held-out exact match: greedy llama.cpp answer (up to 32 tokens) equal to the data's answer; "
             "stop: the answer ended its turn:", "",
             "| model | type | exact none / generic / user | 16-bit GGUF | stop none / generic / user |",
             "|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            h = row["here"]
            chat.append(f"| {r['model']} | {row['type']} | {r['chat_kl_tokens']} | "
                        f"{' | '.join(pm(h[v], 'chat_kld') for v in VARIANTS)} | "
                        f"{ratio(h['user']['chat_kld'], h['none']['chat_kld'])} | "
                        f"{ratio(h['user']['chat_kld'], h['generic']['chat_kld'])} | "
                        f"{' / '.join(fmt(h[v]['chat_same_top'], '.1%') for v in VARIANTS)} | "
                        f"{pm(r['chat_kl_16bit'], 'kld')} |")
            plain.append(f"| {r['model']} | {row['type']} | {' | '.join(pm(h[v], 'kld') for v in VARIANTS)} | "
                         f"{ratio(h['user']['kld'], h['none']['kld'])} | {ratio(h['user']['kld'], h['generic']['kld'])} |")
            exact.append(f"| {r['model']} | {row['type']} | "
                         f"{' / '.join(str(h[v]['hits']) for v in VARIANTS)} of {h['user']['n']} | "
                         f"{r['exact_f16']['hits']} | {' / '.join(fmt(h[v]['stop_rate'], '.0%') for v in VARIANTS)} |")
    lines += chat + plain + exact
    if merges:
        lines += ["", "Merge base (`--merge-base auto`): each merge's 16-bit GGUF against the training-time "
                  "model (quantized base + adapter, peft), KL divergence on the held-out conversations and "
                  "greedy agreement:", "",
                  "| QLoRA run | KL dequantized | KL original | original / dequantized | same top dequantized / original | "
                  "agreement dequantized / original | identical generations d / o | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in merges:
            c = m["candidates"] or {}
            d, o = c.get("dequantized", {}), c.get("original", {})
            lines.append(f"| {m['base_quantization']} ({m['train']['steps']} steps) | {fmt(d.get('kl_divergence'))} | "
                         f"{fmt(o.get('kl_divergence'))} | {merge_ratio(o.get('kl_divergence'), d.get('kl_divergence'))} | "
                         f"{fmt(d.get('same_top'), '.1%')} / {fmt(o.get('same_top'), '.1%')} | "
                         f"{fmt(d.get('agreement'), '.0%')} / {fmt(o.get('agreement'), '.0%')} | "
                         f"{d.get('identical')} / {o.get('identical')} | {m['chosen']} |")
    return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for row in r["rows"]:
            e, h = row["export"], row["here"]
            nones = [e[k].get("kl_divergence") for k in ("none", "none_in_generic_export", "none_export") if e.get(k)]
            row["none_consistent"] = len(set(nones)) == 1
            kn, kg, ku = (e[v].get("kl_divergence") for v in VARIANTS)
            parts = []
            if row["type"] == "q4_k_m" and kn:
                parts.append(f"user / none {ku / kn:.2f}x (goal <= 0.90x: {'met' if ku <= 0.9 * kn else 'not met'})")
            if kg is not None and ku is not None:
                parts.append(f"user / generic {ratio(ku, kg)} (goal <= 1.00x: {'met' if ku <= kg else 'not met'})")
            parts.append(f"measured here on conversations: user / none {ratio(h['user']['chat_kld'], h['none']['chat_kld'])}, "
                         f"user / generic {ratio(h['user']['chat_kld'], h['generic']['chat_kld'])}; on plain text: "
                         f"{ratio(h['user']['kld'], h['none']['kld'])}, {ratio(h['user']['kld'], h['generic']['kld'])}")
            if not row["none_consistent"]:
                parts.append(f"the exports' no-matrix KL figures differ: {nones}")
            out.append(f"- {r['model']} {row['type']}: " + "; ".join(parts))
    return out


def write_results(text: str) -> None:
    from results_file import write_section

    write_section(SECTION, text)


def section(args, p: dict, results: list[dict], merges: list[dict], seconds: float) -> str:
    import results_file
    import torch
    import transformers

    from export.llama_cpp import ensure_built

    tools = ensure_built()
    models = []
    for r in results:
        s = r["shape"]
        models.append(f"{r['model']}: hidden {s['hidden']} x {s['layers']} layers, MLP {s['intermediate']}, "
                      f"{s['heads']}/{s['kv_heads']} heads of {s['head_dim']}, {r['params'] / 1e6:.0f}M parameters "
                      f"({r['base_bytes'] / 1e6:.0f} MB fp32); LoRA validation loss {r['train']['val_loss']:.2f}; "
                      f"user matrix {r['imatrix_user']['chunks']} chunks x {r['imatrix_user']['n_ctx']} tokens "
                      f"({r['imatrix_user']['rows']} training rows); export scored "
                      f"{r['validation']['scored_tokens']} held-out tokens, reference perplexity "
                      f"{r['validation']['reference_perplexity']:.4g}")
    cmd = ("python bench/imatrix_gain.py" + (" --quick" if args.quick else "") + (" --quiet" if args.quiet else "")
           + " --write-results")
    return "\n".join([
        f"## {SECTION}", "",
        f"`flock /tmp/macft-heavy.lock {cmd}` on {results_file.machine()}; {time.strftime('%Y-%m-%d')}; "
        f"{'quiet (the run held the heavy-job lock; nothing heavy ran meanwhile)' if args.quiet else 'not known to be quiet'}; "
        f"one run, {seconds / 60:.1f} min in all. torch {torch.__version__}, transformers {transformers.__version__}, "
        f"llama.cpp {tools.description}.", "",
        f"Models (random-init Gemma-3, the tiny SentencePiece tokenizer of ~1k tokens, pretrained "
        f"{p['pretrain_steps']} full steps on examples/data/general, then LoRA r16 on all projections with "
        f"`macft train --backend mlx`, {p['iters']} steps, lr 3e-3, on nya_chat's 400 training rows):", "",
        *[f"- {m}" for m in models], "",
        f"Quantization types {p['quant']}; every figure from one export run per matrix. The generic matrix: "
        "llama-imatrix on the same 16-bit GGUF over the pinned llama.cpp's docs/*.md (English prose and "
        "code, not the user's data), the same chunk count and context as the user's matrix. Held-out data: "
        f"nya_chat/valid.jsonl plus {p['heldout_extra']} rows drawn from make_data.py's held-out items "
        "(arithmetic on unseen numbers; colours, animals, capitals as in training); the exact-match "
        f"prompts are its first {p['exact_prompts']} rows.", "",
        tables(results, merges), "", "Goals:", "", *goals(results), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Smoke run: tiny model, q4_k_m, few steps (~2 min).")
    ap.add_argument("--models", help=f"Comma separated, of {', '.join(MODELS)} (default {FULL['models']}).")
    ap.add_argument("--quant", help=f"Types (default {FULL['quant']}).")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--iters", type=int, help="LoRA steps.")
    ap.add_argument("--qlora", help="QLoRA runs for the merge base: 4bit,8bit (empty: none).")
    ap.add_argument("--qlora-iters", type=int)
    ap.add_argument("--exact-prompts", type=int)
    ap.add_argument("--work", metavar="DIR", help="Keep the work in DIR (default: a temporary directory).")
    ap.add_argument("--json", metavar="FILE", help="Also write the raw measurements to FILE.")
    ap.add_argument("--quiet", action="store_true",
                    help="State in the results that nothing else heavy ran meanwhile (run under the lock).")
    ap.add_argument("--write-results", action="store_true", help=f"Replace the '{SECTION}' section of bench/RESULTS.md.")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    for k in ("models", "quant", "pretrain_steps", "iters", "qlora", "qlora_iters", "exact_prompts"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from export.llama_cpp import ensure_built

    tools = ensure_built()
    tmp = None
    if args.work:
        root = Path(args.work)
        root.mkdir(parents=True, exist_ok=False)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="macft-bench-imatrix-")
        root = Path(tmp.name)
    logs = root / "logs"
    logs.mkdir()
    results, merges = [], []
    try:
        data, plain = prepare_data(root, p)
        for name in p["models"].split(","):
            results.append(measure_model(name, root, p, data, plain, tools, logs))
            if args.json:
                Path(args.json).write_text(json.dumps({"params": p, "models": results}, indent=1, default=str))
            if name != p["models"].split(",")[0]:
                shutil.rmtree(root / f"{name}-base", ignore_errors=True)
        if p["qlora"]:
            first = p["models"].split(",")[0]
            merges = merge_base_runs(root / f"{first}-base", data, root, p, logs)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps({"params": p, "models": results, "merge_base": merges}, indent=1,
                                                  default=str))
        if tmp is not None:
            tmp.cleanup()
    seconds = time.time() - T0
    print(tables(results, merges))
    print("\n".join(goals(results)))
    say(f"done: {seconds / 60:.1f} min")
    if args.write_results:
        write_results(section(args, p, results, merges, seconds))


if __name__ == "__main__":
    main()
