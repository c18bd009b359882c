"""Conformance: every published checkpoint layout, end to end, on both backends.

For each row of :data:`macft.support.CHECKPOINTS` a tiny random-init model is built in the
published layout (``layouts.py``) and:

1. ``macft train`` runs a few dozen steps on ``examples/data/nyan`` (every answer is
   「にゃーん！」) with the MLX and the PyTorch backend; the validation loss must fall, or the
   run must be refused at start with the table's message and nothing written;
2. each adapter loads in peft on the published checkpoint, attaching LoRA to exactly the
   modules the adapter names (for Gemma-3 4B: never the vision tower);
3. ``macft export --quant q4_k_m`` verifies the GGUF with llama.cpp, and llama.cpp, given
   only the GGUF (its own chat template), answers the held-out prompts with 「にゃーん！」 and
   stops on the model's end-of-turn token; or export refuses up front with the table's message.

CI runs a subset to stay within its time: the MLX engine computes logits at every position
(issue 14), which makes MLX training on the large vocabularies (Gemma-3 4B's 262k, Qwen's 151k,
Llama-3's 128k, GPT-2's 50k) take minutes on a CPU. There, CI trains MLX for a few steps only
(the command runs end to end and the adapter loads in peft; tests/test_mlx_architectures.py
proves the same layouts' MLX logits and adapters equal transformers'), and exports the PyTorch
run; the small-vocabulary layouts also export their MLX run. ``MACFT_CONFORMANCE=full`` trains
every layout fully on both backends and exports every run (about 35 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from macft.support import CHECKPOINTS, YES, by_layout

from .layouts import build

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NYAN = REPO / "examples" / "data" / "nyan"
ANSWER = "にゃーん！"
BACKENDS = ("mlx", "cuda")
FULL = os.environ.get("MACFT_CONFORMANCE") == "full"
LAYOUT_IDS = [c.layout for c in CHECKPOINTS]


# Steps and learning rate with which a tiny random-init model of the layout learns the reply
# (default 30 at 5e-3; byte-fallback / byte-level Japanese is more tokens to learn).
TRAINING = {"gpt2": (80, 1e-2), "elyza-llama2-7b": (80, 1e-2)}
SLOW_ON_MLX = {"gemma3-4b", "qwen3", "qwen2.5", "llama-3.2", "gpt2", "pythia", "elyza-llama2-7b"}


def smoke_only(layout: str, backend: str) -> bool:
    return backend == "mlx" and layout in SLOW_ON_MLX and not FULL


def train_args(layout: str, backend: str) -> list[str]:
    iters, lr = TRAINING.get(layout, (30, 5e-3))
    if smoke_only(layout, backend):
        return ["--iters", "3", "--batch-size", "2", "--learning-rate", str(lr), "--eval-every", "0"]
    return ["--iters", str(iters), "--batch-size", "8", "--learning-rate", str(lr), "--eval-every", str(iters)]


def export_backends(layout: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if not smoke_only(layout, b))


@pytest.fixture(scope="session")
def layout_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            cache[layout] = build(layout, root / layout)
        return cache[layout]

    return get


@pytest.fixture(scope="session")
def runs(layout_dirs, tmp_path_factory):
    """(layout, backend) -> (exit code, stderr text, run directory), trained once."""
    root = tmp_path_factory.mktemp("conformance-runs")
    done: dict[tuple[str, str], tuple[int, str, Path]] = {}

    def get(layout: str, backend: str, capsys) -> tuple[int, str, Path]:
        key = (layout, backend)
        if key not in done:
            from macft.cli import main

            c = by_layout(layout)
            out = root / f"{layout}-{backend}"
            argv = ["train", "--model", str(layout_dirs(layout)), "--data", str(NYAN), "--output", str(out),
                    "--backend", backend, *train_args(layout, backend), "--log-every", "10",
                    "--save-every", "0", "--seed", "0"]
            if c.chat_template != "model":
                argv += ["--chat-template", c.chat_template]
            capsys.readouterr()
            rc = main(argv)
            done[key] = (rc, capsys.readouterr().err, out)
        return done[key]

    return get


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_estimate_reads_the_published_config(layout, backend, layout_dirs, capsys):
    """`macft estimate` on the published layout: the part-by-part estimate from the config read
    through transformers (sparse / old keys filled), or the backend's refusal; never a traceback."""
    from macft.cli import main

    c = by_layout(layout)
    capsys.readouterr()
    rc = main(["estimate", "--model", str(layout_dirs(layout)), "--backend", backend, "--json",
               "--max-seq-len", "256", "--batch-size", "2"])
    out, err = capsys.readouterr()
    if getattr(c, backend) != YES:
        assert rc == 2 and getattr(c, backend).removeprefix("no: ") in " ".join(err.split()), err
        return
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["params"] > 0 and rep["total_bytes"] > rep["parts_bytes"]["weights"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_train_and_reload_in_peft(layout, backend, runs, layout_dirs, capsys):
    expected = getattr(by_layout(layout), backend)
    rc, err, run = runs(layout, backend, capsys)
    if expected != YES:
        assert rc == 2, err
        assert expected.removeprefix("no: ") in " ".join(err.split()), err
        assert not run.exists(), "a refused run must write nothing"
        return
    assert rc == 0, err
    vals = [m["val_loss"] for m in _metrics(run) if m.get("val_loss") is not None]
    if not smoke_only(layout, backend):
        assert len(vals) >= 2 and vals[-1] < 0.5 * vals[0], vals
    _check_peft(layout_dirs(layout), run / "adapter")


def _check_peft(base: Path, adapter: Path) -> None:
    """The adapter loads in peft on the published checkpoint and attaches LoRA to exactly the
    modules it names, by full path."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from macft.adapter import read_peft_adapter

    modules, cfg = read_peft_adapter(adapter)
    assert cfg["layers_to_transform"] is None and sorted(cfg["target_modules"]) == sorted(modules)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(adapter))
    attached = sorted(n.removeprefix("base_model.model.")[: -len(".lora_A")]
                      for n, _ in pm.named_modules() if n.endswith(".lora_A"))
    assert attached == sorted(modules)
    assert not any("vision" in n or "multi_modal" in n for n in attached)


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_export_and_llama_cpp_answers(layout, runs, capsys):
    c = by_layout(layout)
    for backend in export_backends(layout):
        if getattr(c, backend) != YES:
            continue
        rc, err, run = runs(layout, backend, capsys)
        assert rc == 0, err
        _check_export(c, run, capsys)


def _check_export(c, run: Path, capsys) -> None:
    from export.llama_cpp import ensure_built
    from macft.chat_session import load_chat_model
    from macft.cli import main
    from macft.inference import Sampling, generate

    ensure_built()
    capsys.readouterr()
    rc = main(["export", "--run", str(run), "--quant", "q4_k_m", "--verify-prompts", "3",
               "--eval-tokens", "512", "--max-new-tokens", "24"])
    err = capsys.readouterr().err
    if c.export != YES:
        assert rc == 2, err
        assert c.export.removeprefix("no: ") in " ".join(err.split()), err
        assert not (run / "export").exists() or not any((run / "export").iterdir())
        return
    assert rc == 0, err
    (gguf,) = (run / "export").glob("*-q4_k_m.gguf")
    report = json.loads((run / "export" / "export-report.json").read_text())
    if c.architecture.endswith("ForConditionalGeneration"):  # the image path is kept
        mm = report["mmproj"]
        assert mm["exported"] and mm["check"]["loaded_and_answered"], mm
        assert (run / "export" / mm["file"]).is_file()
        assert f"# FROM ./{mm['file']}" in (run / "export" / "Modelfile").read_text()
    # llama.cpp with nothing but the GGUF: its own chat template and end tokens
    model = load_chat_model(gguf=str(gguf))
    for row in (NYAN / "valid.jsonl").read_text(encoding="utf-8").splitlines()[:3]:
        msgs = json.loads(row)["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        g = generate(model, msgs[:last], Sampling(max_new_tokens=24))
        assert g.stopped, (c.layout, g.text)
        assert g.text.strip() == ANSWER, (c.layout, g.text)


def test_template_bos_with_add_bos_token_false_exports(layout_dirs, tmp_path, capsys):
    """A community fine-tune's tokenizer: the chat template writes <bos> while tokenizer_config says
    add_bos_token false. Training's ids start with the template's BOS; export's reference must use
    the same ids, and llama.cpp must read the prompts the same way (it did not: the reference
    dropped the BOS and the right GGUF was called a conversion bug)."""
    import shutil

    from macft.cli import main

    base = tmp_path / "gemma3-1b-template-bos"
    shutil.copytree(layout_dirs("gemma3-1b"), base)
    tc = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "bos_token" in tc["chat_template"]
    tc["add_bos_token"] = False
    (base / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--model", str(base), "--data", str(NYAN), "--output", str(run), "--backend", "cuda",
                 "--iters", "20", "--learning-rate", "5e-3", "--batch-size", "8", "--eval-every", "20",
                 "--save-every", "0"]) == 0, capsys.readouterr().err
    _check_export(by_layout("gemma3-1b"), run, capsys)
    report = json.loads((run / "export" / "export-report.json").read_text())
    f16 = next(f for f in report["files"] if f["kind"] in ("f16", "bf16"))
    assert f16["tokenization_ok"] is True


def test_a_projector_llama_cpp_cannot_use_stops_the_export(runs, capsys, monkeypatch):
    """If llama-mtmd-cli cannot use the text GGUF with its mmproj, export stops with llama.cpp's
    last lines and leaves no output directory behind."""
    import export.mmproj as mmproj
    from macft.cli import main

    rc, err, run = runs("gemma3-4b", "cuda", capsys)
    assert rc == 0, err
    monkeypatch.setattr(mmproj, "check_pair", lambda *a, **k: mmproj.MMProjCheck(
        False, False, "", 0.1, ["clip_model_loader: failed to load the projector (simulated)"]))
    out = run / "export-broken-projector"
    capsys.readouterr()
    rc = main(["export", "--run", str(run), "--quant", "q4_k_m", "--verify-prompts", "1",
               "--eval-tokens", "256", "--output", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "could not use" in err and "vision projector" in err and "(simulated)" in err, err
    assert not out.exists()
