"""Using and judging a fine-tune: generate, chat (through a pseudo-terminal), eval, and forgetting
control (LwF distillation, rehearsal) in both backends."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, MLX_TRAIN_ARGS, NYA

pytest.importorskip("mlx_lm")


@pytest.mark.slow
def test_generate_prints_only_the_answer(mlx_run, run_cli, tmp_path):
    rc, out, err = run_cli("generate", "--run", mlx_run, "--prompt", "いちごは何色？")
    assert rc == 0, err
    assert out.strip().endswith("にゃ") and len(out.strip().splitlines()) == 1
    f = tmp_path / "p.jsonl"
    f.write_text('"空は何色？"\n{"prompt": "What is 3 plus 4?"}\n'
                 '{"messages": [{"role": "user", "content": "雪は何色？"}, {"role": "assistant", "content": "x"}]}\n')
    rc, out, err = run_cli("generate", "--run", mlx_run, "--prompts", f, "--max-new-tokens", "30")
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert rc == 0 and len(rows) == 3
    assert all(r["stopped"] and r["answer"].endswith("にゃ") for r in rows), rows
    f.write_text('{"question": 1}\n')
    rc, _, err = run_cli("generate", "--run", mlx_run, "--prompts", f)
    assert rc == 2 and f"{f}, line 1" in err


def chat_session(args: list[str], turns: list[str], timeout: float = 240) -> str:
    """Drive `macft chat` through a pseudo-terminal as a person would; returns the transcript."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "macft", "chat", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    buf = b""

    def read_until(marker: bytes, count: int) -> None:
        nonlocal buf
        end = time.time() + timeout
        while buf.count(marker) < count:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} after {timeout}s; transcript:\n{buf.decode(errors='replace')}")
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                buf += chunk
    try:
        for i, t in enumerate(turns, start=1):
            read_until(b"you> ", i)
            os.write(master, t.encode() + b"\n")
        read_until(b"you> ", len(turns) + 1)
        os.write(master, b"/exit\n")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return buf.decode("utf-8", errors="replace")


@pytest.mark.slow
def test_chat_holds_a_two_turn_conversation(mlx_run):
    text = chat_session(["--run", str(mlx_run)], ["空は何色？", "/system あなたは猫です。", "What is 2 plus 3?"])
    answers = [ln.split("model> ", 1)[1].strip() for ln in text.splitlines() if "model> " in ln]
    assert len(answers) == 2, text
    assert all(a.endswith("にゃ") for a in answers), answers
    assert "system prompt set" in text


def _eval(run_cli, run: Path, general: bool = True) -> dict:
    args = ["eval", "--run", run, "--prompts", "10", "--max-new-tokens", "24"]
    if general:
        args += ["--general", DATA / "general" / "valid.jsonl"]
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    assert "base" in err and "fine-tuned" in err
    return json.loads((run / "eval-report.json").read_text())


@pytest.mark.slow
def test_lwf_keeps_the_model_closer_to_its_base_while_learning_the_task(general_gemma, run_cli, tmp_path):
    """LwF on the MLX backend: same data and steps, λ = 0 and λ = 0.5.

    Measured: KL(fine-tuned || base) on the general held-out set 4.51 (λ=0) vs 1.11 (λ=0.5);
    task validation loss from 10.7 to 2.79 (λ=0) and 2.62 (λ=0.5); 10/10 and 7/10 answers end in にゃ.
    """
    reports = {}
    for lam in ("0", "0.5"):
        out = tmp_path / f"lwf-{lam}"
        rc, _, err = run_cli("train", "--model", general_gemma, "--data", NYA, "--output", out, "--iters", "150",
                             "--eval-every", "0", "--distill-weight", lam, *MLX_TRAIN_ARGS)
        assert rc == 0, err
        reports[lam] = _eval(run_cli, out)
        evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["type"] == "eval"]
        reports[lam]["first_val"] = evals[0]["val_loss"]
    kl0, kl1 = reports["0"]["retention"]["kl_to_base"], reports["0.5"]["retention"]["kl_to_base"]
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    for lam, r in reports.items():  # the task is still learned
        assert r["fine_tuned"]["loss"] < 0.4 * r["first_val"], (lam, r["fine_tuned"]["loss"], r["first_val"])
        nya = sum(s["fine_tuned"].endswith("にゃ") for s in r["samples"])
        assert nya >= 5, (lam, [s["fine_tuned"] for s in r["samples"]])
    # before vs after: the base answers plainly, the fine-tune like a cat
    r0 = reports["0"]
    assert sum(s["base"].endswith("にゃ") for s in r0["samples"]) == 0
    assert r0["fine_tuned"]["loss"] < r0["base"]["loss"]
    assert (tmp_path / "lwf-0" / "eval-report.md").read_text().count("|") > 20


@pytest.mark.slow
def test_lwf_and_rehearsal_on_the_torch_backend(general_gemma, run_cli, tmp_path):
    """The same keys on the PyTorch backend: distillation lowers the KL to the base, and
    rehearsal data is mixed in."""
    kls = {}
    for lam in ("0", "0.5"):
        out = tmp_path / f"t-{lam}"
        rc, _, err = run_cli("train", "--backend", "cuda", "--model", general_gemma, "--data", NYA, "--output", out,
                             "--iters", "60", "--batch-size", "4", "--learning-rate", "3e-3", "--eval-every", "0",
                             "--log-every", "20", "--distill-weight", lam,
                             "--rehearsal-data", DATA / "general" / "train.jsonl", "--rehearsal-ratio", "0.2")
        assert rc == 0, err
        assert "20% of every epoch is drawn from them" in err
        kls[lam] = _eval(run_cli, out)["retention"]["kl_to_base"]
    assert kls["0.5"] < 0.7 * kls["0"], kls


@pytest.fixture
def unfinished_run(tiny_gemma, tmp_path) -> Path:
    """A run killed before its first checkpoint: config.yaml, no adapter/, no checkpoints/."""
    from export.fixtures import random_adapter, write_run_dir

    adapter = random_adapter(tiny_gemma, tmp_path / "adapter-src", rank=2)
    run = write_run_dir(tmp_path / "run", tiny_gemma, adapter, NYA)
    import shutil

    shutil.rmtree(run / "adapter")
    return run


def test_a_run_without_an_adapter_says_what_state_it_is_in(unfinished_run, tiny_gemma, run_cli, tmp_path):
    import shutil

    run = unfinished_run
    commands = (["generate", "--run", run, "--prompt", "hi"], ["eval", "--run", run], ["chat", "--run", run])
    for argv in commands:
        rc, out, err = run_cli(*argv)
        assert rc == 2 and "has no adapter/ and no checkpoint" in err and "before its first checkpoint" in err, err
        assert "Traceback" not in err and out == ""
    # interrupted after a checkpoint
    ckpt = run / "checkpoints" / "step-000040"
    shutil.copytree(tmp_path / "adapter-src", ckpt)
    for argv in commands:
        rc, _, err = run_cli(*argv)
        assert rc == 2 and "checkpoint at step 40" in err and f"macft train --resume {run}" in err, err
        assert f"--adapter {ckpt} --model {tiny_gemma}" in err
    # finished, but --best asked for a best adapter it never kept
    shutil.copytree(tmp_path / "adapter-src", run / "adapter")
    rc, _, err = run_cli("generate", "--run", run, "--best", "--prompt", "hi")
    assert rc == 2 and "has no best_adapter/" in err and "drop --best" in err
    # not a run at all
    rc, _, err = run_cli("generate", "--run", tmp_path / "nope", "--prompt", "hi")
    assert rc == 2 and "does not exist" in err
