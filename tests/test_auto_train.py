"""`macft train --auto` and `macft tune` end to end on the tiny Gemma-3 (PyTorch on the CPU,
one search on MLX): the search is recorded, deterministic for a seed, keeps explicit flags,
and the run it chooses can be reproduced from its config.yaml without --auto."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from macft.config import read_yaml

REPO = Path(__file__).resolve().parents[1]
NYAN = REPO / "examples" / "data" / "nyan"

pytestmark = pytest.mark.slow

TORCH = ["--backend", "cuda", "--seed", "0", "--batch-size", "4", "--log-every", "4"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def tuned(tiny_gemma, tmp_path_factory):
    """`macft tune` twice with the same seed (torch on the CPU, learning rates and the run's
    length searched; rank fixed to keep it short)."""
    from macft.cli import main

    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    outs = []
    for k in range(2):
        out = tmp_path_factory.mktemp("tune") / f"t{k}"
        assert main(["tune", str(NYAN), "--model", str(tiny_gemma), "--output", str(out), "--lora-rank", "8",
                     *TORCH]) == 0
        outs.append(out)
    return outs


def test_tune_records_the_search_and_recommends_a_config(tuned):
    out = tuned[0]
    rows = _rows(out / "auto" / "search.jsonl")
    assert (out / "auto" / "search.png").stat().st_size > 1000
    assert len(rows) >= 4  # four learning rates at least
    lrs = sorted({r["learning_rate"] for r in rows})
    assert len(lrs) >= 4 and all(r["rank"] == 8 for r in rows)  # --lora-rank given: kept
    for r in rows:
        assert r["steps"] >= 8 and r["val_curve"] and r["train_curve"] and r["trained_tokens"] > 0
        assert r["val_curve"][-1][0] == r["steps"]
    chosen = [r for r in rows if r["outcome"] == "chosen"]
    assert len(chosen) == 1
    rung2 = [r for r in rows if r["outcome"] in ("chosen", "rung 2")]
    assert len(rung2) == 2 and all(r["answers"] is not None and len(r["answers"]) == 3 for r in rung2)
    assert all(r["steps"] == 2 * rows[0]["steps"] for r in rung2)
    # the recommendation is a config `macft train --config` takes as it is
    rec = read_yaml(out / "auto" / "recommended.yaml")
    # the rung-2 winner's rate, scaled for the whole run (160 steps: 10 epochs of 16)
    factor = (chosen[0]["steps"] / 160) ** (1 / 3)
    assert rec["train"]["learning_rate"] == pytest.approx(chosen[0]["learning_rate"] * factor, rel=1e-2)
    assert rec["lora"]["rank"] == 8 and rec["train"]["early_stop"] == 4 and rec["train"]["epochs"] >= 3
    assert rec["train"]["output"] is None
    summary = json.loads((out / "auto" / "summary.json").read_text())
    assert "lowest validation loss" in summary["reasons"]["learning_rate"]
    assert summary["reasons"]["rank"] == "given explicitly: kept"
    # the candidates' weights are gone, their records stay
    assert sorted(p.name for p in (out / "auto").iterdir()) == [
        "recommended.yaml", "search.jsonl", "search.png", "summary.json"]
    assert not (out / "adapter").exists() and not (out / "config.yaml").exists()


def test_the_search_is_deterministic_for_a_seed(tuned):
    a, b = (_rows(o / "auto" / "search.jsonl") for o in tuned)
    assert [(r["name"], r["learning_rate"], r["rank"], r["steps"], r["outcome"]) for r in a] == \
        [(r["name"], r["learning_rate"], r["rank"], r["steps"], r["outcome"]) for r in b]
    for ra, rb in zip(a, b):
        for (sa, va), (sb, vb) in zip(ra["val_curve"], rb["val_curve"]):
            assert sa == sb and math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6)


def test_train_auto_records_its_choice_and_reproduces_without_auto(tiny_gemma, tmp_path, run_cli):
    """Learning rate searched, --iters and rank given: config.yaml holds the choice (the rung-2
    winner's rate scaled for the whole run), and training that config again without --auto
    lands on the same validation loss."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    run = tmp_path / "auto"
    rc, out, err = run_cli("train", "--auto", "--model", tiny_gemma, "--data", NYAN, "--output", run,
                           "--iters", "48", "--lora-rank", "8", "--eval-every", "8", *TORCH)
    assert rc == 0, err
    s = _summary(run)
    auto = s["auto"]
    assert auto["reasons"]["epochs"] == "given explicitly: kept" and s["steps"] == 48
    assert auto["reasons"]["rank"] == "given explicitly: kept"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    chosen = auto["chosen"]
    assert cfg["train"]["learning_rate"] == pytest.approx(chosen["learning_rate"])
    rung2 = [r for r in _rows(run / "auto" / "search.jsonl") if r["outcome"] == "chosen"][0]
    factor = (rung2["steps"] / 48) ** (1 / 3)
    assert chosen["learning_rate"] == pytest.approx(rung2["learning_rate"] * factor, rel=1e-2)
    assert cfg["train"]["iters"] == 48 and cfg["lora"]["rank"] == 8 and cfg["train"]["early_stop"] == 0
    # the run's metrics start at step 0, the candidates' weights are gone
    evals = [r for r in _rows(run / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 48
    assert sorted(p.name for p in (run / "auto").iterdir()) == ["search.jsonl", "search.png"]
    for f in ("adapter/adapter_model.safetensors", "best_adapter/adapter_model.safetensors", "loss.png"):
        assert (run / f).is_file()
    assert "auto: learning rate" in out + err and "lowest validation loss" in out + err

    again = tmp_path / "again"
    rc, _, err = run_cli("train", "--config", run / "config.yaml", "--output", again)
    assert rc == 0, err
    assert _summary(again)["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)


def test_explicit_learning_rate_and_rank_leave_only_the_run_length(tiny_gemma, tmp_path, run_cli):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    run = tmp_path / "len"
    rc, out, err = run_cli("train", "--auto", "--model", tiny_gemma, "--data", NYAN, "--output", run,
                           "--learning-rate", "3e-3", "--lora-rank", "8", *TORCH)
    assert rc == 0, err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["learning_rate"] == 3e-3 and cfg["lora"]["rank"] == 8 and cfg["lora"]["alpha"] == 32
    assert cfg["train"]["early_stop"] == 4 and cfg["train"]["epochs"] == 10  # 16 steps per epoch: up to 10
    s = _summary(run)
    assert s["auto"]["cost"]["candidates"] == 0 and s["auto"]["chosen"]["learning_rate"] == 3e-3
    assert s["steps"] <= 160 and (s["stopped_early"] or s["steps"] == 160)
    assert not (run / "auto" / "search.jsonl").exists() or not _rows(run / "auto" / "search.jsonl")


def test_auto_refusals_say_what_to_do(tiny_gemma, tmp_path, run_cli):
    rc, _, err = run_cli("train", "--dry-run", "--model", tiny_gemma, "--data", NYAN)
    assert rc != 0 and "--auto" in err
    rc, _, err = run_cli("train", "--auto", "--auto-budget", "soon", "--model", tiny_gemma, "--data", NYAN)
    assert rc != 0 and "20m" in err
    rc, _, err = run_cli("train", "--auto", "--model", tiny_gemma, "--data", NYAN / "train.jsonl",
                         "--valid-fraction", "0", "--output", tmp_path / "nv", *TORCH)
    assert rc != 0 and "--valid" in err and not (tmp_path / "nv").exists()


def test_estimate_shows_what_the_search_costs(tiny_gemma, run_cli):
    rc, out, err = run_cli("estimate", "--model", tiny_gemma, "--data", NYAN, "--auto", "--calibrate-steps", "0",
                           "--json", "--backend", "cuda")
    assert rc == 0, err
    report = json.loads(out[out.index("{"):])
    auto = report["auto"]
    assert auto["run_steps"] == 160 and 0 < auto["search_steps"]
    assert auto["plan"]["lrs"] and auto["plan"]["rung1"] >= 8


def test_mlx_search_picks_and_trains(tiny_gemma, tmp_path, run_cli):
    pytest.importorskip("mlx")
    run = tmp_path / "mlx"
    rc, out, err = run_cli("train", "--auto", "--model", tiny_gemma, "--data", NYAN, "--output", run,
                           "--backend", "mlx", "--iters", "32", "--lora-rank", "8", "--eval-every", "8",
                           "--seed", "0", "--batch-size", "4")
    assert rc == 0, err
    s = _summary(run)
    rows = _rows(run / "auto" / "search.jsonl")
    assert len(rows) >= 4 and sum(r["outcome"] == "chosen" for r in rows) == 1
    chosen = s["auto"]["chosen"]
    assert s["steps"] == 32 and chosen["rung2_learning_rate"] in [r["learning_rate"] for r in rows]
    assert chosen["learning_rate"] < chosen["rung2_learning_rate"]
    assert (run / "mlx_adapter" / "adapters.safetensors").is_file()


def test_a_duration_budget_is_timed_into_steps(tiny_gemma, tmp_path, run_cli):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    out = tmp_path / "dur"
    rc, _, err = run_cli("tune", NYAN, "--model", tiny_gemma, "--output", out, "--auto-budget", "30s",
                         "--learning-rate", "3e-3", "--lora-rank", "8", *TORCH)
    assert rc == 0, err
    summary = json.loads((out / "auto" / "summary.json").read_text())
    assert summary["plan"]["budget_steps"] > 0  # 30 s over the timed seconds per step
    assert not (out / "auto" / "timing").exists()
