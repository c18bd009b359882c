"""PyTorch backend end to end on the CPU: `macft train --backend cuda` on the tiny Gemma-3.

- learns the 「にゃ」 data; the adapter reloads with peft in a fresh process, reproduces
  the training process's logits, and its greedy answers end in 「にゃ」 then <end_of_turn>
- an interrupted run resumed from its checkpoint follows the uninterrupted loss curve
- the 4-bit (QLoRA) path: record for export, learning, resume with 8-bit AdamW state
- two data-parallel processes (accelerate launch, gloo) give the adapter of one process

Each test trains for real, so all are marked slow (about 2-3 minutes together on 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_torch_thread():
    """conftest preloads OpenBLAS (for MLX) into the test process; torch's 2 threads plus
    OpenBLAS's then oversubscribe the 2 cores (measured 4x slower). One torch thread is as
    fast as two in a clean process for these tiny matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Found in short runs on the tiny fixture (random init, vocabulary ~1k): lr 3e-3 learns
# the shared ending in ~100 steps; val loss 34.6 -> ~2.9 by 200-300 steps (the rest of
# the validation answers are facts the training set does not hold).
LEARN = ["--iters", "200", "--learning-rate", "3e-3", "--eval-every", "100", "--log-every", "20"]


def _train(run_cli, model, data, out, *extra):
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", model, "--data", data,
                         "--output", out, *extra)
    return rc, err


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture
def engines(monkeypatch):
    """Every TorchEngine the runs in this test create (the training process's model)."""
    from cuda_backend import engine as eng

    made = []
    orig = eng.TorchEngine.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(eng.TorchEngine, "__init__", init)
    return made


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt["at"] = k`` makes the next run raise KeyboardInterrupt (Ctrl-C) as step k+1 starts."""
    from cuda_backend import engine as eng

    ctl = {"at": None}
    orig = eng.TorchEngine.train_micro

    def train_micro(self, batch):
        if ctl["at"] is not None and self.steps_done == ctl["at"]:
            ctl["at"] = None
            raise KeyboardInterrupt
        return orig(self, batch)

    monkeypatch.setattr(eng.TorchEngine, "train_micro", train_micro)
    return ctl


# --------------------------------------------------------------------------- learning + reload

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from macft.data.render import Renderer

    model_dir, adapter, probe, prompts_file, out = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.from_numpy(np.load(probe))
    with torch.no_grad():
        np.save(out + ".npy", model(input_ids=ids, use_cache=False).logits.numpy())
    renderer = Renderer(tok)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    answers = []
    for messages in json.load(open(prompts_file)):
        p = renderer.prompt_ids(messages)
        gen = model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False)[0, len(p):].tolist()
        stopped = eot in gen
        text = tok.decode(gen[: gen.index(eot)] if stopped else gen, skip_special_tokens=True)
        answers.append({"text": text, "stopped_at_end_of_turn": stopped})
    json.dump(answers, open(out + ".json", "w"), ensure_ascii=False)
""")


def test_learns_nya_and_reloads_in_a_fresh_process(tiny_gemma, nya_dir, tmp_path, run_cli, engines):
    run = tmp_path / "run"
    rc, err = _train(run_cli, tiny_gemma, nya_dir, run, *LEARN)
    assert rc == 0, err
    evals = [m for m in _metrics(run) if m["type"] == "eval"]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    print(f"validation loss {first:.3f} -> {last:.3f}")
    assert first > 20 and last < 5.0 and last < first / 5
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
              "best_adapter/adapter_model.safetensors", "loss.png", "summary.json", "config.yaml"):
        assert (run / f).is_file(), f
    assert not (run / "base_quantization.json").exists()  # fp32 base: nothing to record

    # logits of the training process's final model on a fixed probe
    (engine,) = engines
    probe = np.array([[2, 4, 120, 200, 300, 5, 6, 4, 400, 500, 17, 33]], dtype=np.int64)
    engine.model.eval()
    with torch.no_grad():
        ref = engine.model(input_ids=torch.from_numpy(probe), use_cache=False).logits.numpy()
    np.save(tmp_path / "probe.npy", probe)

    rows = [json.loads(x) for x in (nya_dir / "valid.jsonl").read_text().splitlines() if x.strip()]
    prompts = []
    for row in rows[:12]:
        msgs = row["messages"]
        last_a = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last_a])
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    out = tmp_path / "fresh"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tiny_gemma), str(run / "adapter"),
                    str(tmp_path / "probe.npy"), str(tmp_path / "prompts.json"), str(out)],
                   check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    fresh = np.load(str(out) + ".npy")
    diff = float(np.abs(fresh - ref).max())
    print(f"fresh-process logits vs training process: max abs diff {diff:.2e} "
          f"(logit scale {np.abs(ref).max():.1f})")
    assert diff < 1e-4
    answers = json.loads(Path(str(out) + ".json").read_text())
    good = [a for a in answers if a["text"].strip().endswith("にゃ") and a["stopped_at_end_of_turn"]]
    print(f"{len(good)}/{len(answers)} held-out answers end in にゃ and stop at <end_of_turn>:",
          [a["text"] for a in answers])
    assert len(good) >= 0.8 * len(answers)


# --------------------------------------------------------------------------- resume

def _curve(run_dir: Path) -> list[tuple]:
    return [(m["type"], m["step"], m.get("loss", m.get("val_loss")), m.get("grad_norm"),
             m.get("learning_rate")) for m in _metrics(run_dir)]


def _assert_same_curves(a: list[tuple], b: list[tuple], tol: float) -> float:
    assert [(x[0], x[1]) for x in a] == [(x[0], x[1]) for x in b]
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x[2:], y[2:], strict=True):
            if u is not None:
                worst = max(worst, abs(u - v))
    assert worst <= tol, worst
    return worst


def _adapter_diff(a: Path, b: Path) -> float:
    from macft.adapter import read_peft_adapter

    x, _ = read_peft_adapter(a)
    y, _ = read_peft_adapter(b)
    assert set(x) == set(y)
    return max(float(np.abs(x[k][i] - y[k][i]).max()) for k in x for i in (0, 1))


def _interrupted_then_resumed(run_cli, model, data, run, interrupt, at, *args):
    interrupt["at"] = at
    rc, err = _train(run_cli, model, data, run, *args)
    assert rc == 130, err
    assert (run / "checkpoints" / f"step-{at:06d}").is_dir()
    rc, _, err = run_cli("train", "--resume", run)
    assert rc == 0, err


def test_resume_follows_the_uninterrupted_curve(tiny_gemma, nya_dir, tmp_path, run_cli, interrupt):
    # dropout on (default 0.05) and cosine decay over 24 steps: both must line up after resume;
    # packed batches, so the padding-free path trains end to end too
    args = ["--iters", "24", "--learning-rate", "2e-3", "--eval-every", "8", "--log-every", "1",
            "--save-every", "0", "--packing"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(run_cli, tiny_gemma, nya_dir, full, *args)[0] == 0
    _interrupted_then_resumed(run_cli, tiny_gemma, nya_dir, part, interrupt, 10, *args)
    worst = _assert_same_curves(_curve(full), _curve(part), tol=1e-5)
    adiff = _adapter_diff(full / "adapter", part / "adapter")
    print(f"resume: max loss/grad-norm/lr difference {worst:.2e}, adapter max abs diff {adiff:.2e}")
    assert adiff < 1e-6


# --------------------------------------------------------------------------- 4-bit (QLoRA) on the CPU


def test_qlora_on_cpu_learns_records_and_resumes(tiny_gemma, nya_dir, tmp_path, run_cli, interrupt):
    args = ["--quantize", "4bit", "--grad-checkpoint", "--iters", "24", "--learning-rate", "3e-3",
            "--eval-every", "12", "--log-every", "1", "--save-every", "0"]
    full, part = tmp_path / "q_full", tmp_path / "q_part"
    rc, err = _train(run_cli, tiny_gemma, nya_dir, full, *args)
    assert rc == 0, err
    flat = " ".join(err.split())
    assert flat.count("unpaged 8-bit AdamW") >= 1 and "No CUDA GPU" in flat
    rec = json.loads((full / "base_quantization.json").read_text())
    assert rec["method"] == "bnb-nf4" and rec["double_quant"] and rec["blocksize"] == 64
    assert rec["compute_dtype"] == "float32" and rec["unquantized"] == ["lm_head"]
    evals = [m["val_loss"] for m in _metrics(full) if m["type"] == "eval"]
    assert evals[-1] < 0.6 * evals[0], evals
    summary = json.loads((full / "summary.json").read_text())
    assert any("AdamW 8-bit" in n and "4bit" in n for n in summary["notes"])

    _interrupted_then_resumed(run_cli, tiny_gemma, nya_dir, part, interrupt, 9, *args)
    worst = _assert_same_curves(_curve(full), _curve(part), tol=1e-5)
    adiff = _adapter_diff(full / "adapter", part / "adapter")
    print(f"QLoRA validation losses {[round(v, 3) for v in evals]}; resume: max curve difference "
          f"{worst:.2e}, adapter max abs diff {adiff:.2e}")  # (after the last run_cli: capsys)
    assert adiff < 1e-6


# --------------------------------------------------------------------------- data parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_gemma, nya_dir, tmp_path):
    common = ["--backend", "cuda", "--model", str(tiny_gemma), "--data", str(nya_dir),
              "--iters", "8", "--learning-rate", "2e-3", "--eval-every", "4", "--log-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    # Both runs in clean processes with one thread each (accelerate sets OMP_NUM_THREADS=1
    # for its workers), so both use the same kernels: the test process has OpenBLAS preloaded.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MACFT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    # one process: 2 micro-batches per step; two processes: 1 each (rank r takes every 2nd)
    p = subprocess.run([sys.executable, "-m", "macft", "train", *common, "--grad-accum", "2",
                        "--output", str(one)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "macft", "train", *common, "--grad-accum", "1", "--output", str(two)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["device"].endswith("2 processes")
    worst = _assert_same_curves(_curve(one), _curve(two), tol=1e-5)
    adiff = _adapter_diff(one / "adapter", two / "adapter")
    print(f"2 processes vs 1: max curve difference {worst:.2e}, adapter max abs diff {adiff:.2e}")
    assert adiff < 1e-6
    # rank 1 wrote nothing: one metrics row per report
    assert len([m for m in _metrics(two) if m["type"] == "train"]) == 8
