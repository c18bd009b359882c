"""Importance matrix from the run's data, the low-bit types, and the measured merge base
(`--merge-base auto`) of QLoRA runs, end to end with the pinned llama.cpp on the tiny Gemma-3.

The QLoRA run is the trained nya adapter with a bitsandbytes-NF4 base record: export then
rebuilds the training-time model (NF4 round trip + adapter, peft) and measures both merges
against it. Unit tests below cover the rules without llama.cpp.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.imatrix import MAX_CTX, MIN_CTX, context_for, plan_imatrix, render_rows
from export.pipeline import IMATRIX_MARGIN_SIGMA
from export.quantize import IMATRIX_TYPES, NEEDS_IMATRIX, parse_quant_types
from macft.errors import MacftError

REPO = Path(__file__).resolve().parents[1]
NYA = REPO / "examples" / "data" / "nya_chat"
NF4 = {"method": "bnb-nf4", "double_quant": True, "blocksize": 64, "unquantized": []}


def macft(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "macft", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


@pytest.fixture(scope="module")
def qlora_run(tiny_gemma, gemma_trained_adapter, tmp_path_factory) -> Path:
    from export.fixtures import write_run_dir

    return write_run_dir(tmp_path_factory.mktemp("qlora") / "nya-nf4", tiny_gemma, gemma_trained_adapter, NYA,
                         quantize="4bit", base_quantization=NF4)


@pytest.fixture(scope="module")
def auto_export(qlora_run, llama_tools):
    """As a new user would: `macft export --run RUN --quant q4_k_m,iq4_xs` on a QLoRA run."""
    r = macft("export", "--run", qlora_run, "--quant", "q4_k_m,iq4_xs", "--verify-prompts", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    out = qlora_run / "export"
    return out, json.loads((out / "export-report.json").read_text()), r.stderr


def _file(report: dict, kind: str) -> dict:
    return next(f for f in report["files"] if f["kind"] == kind)


@pytest.mark.slow
def test_imatrix_from_the_runs_data_for_both_files(auto_export, qlora_run):
    out, report, log = auto_export
    name = qlora_run.name
    imx = report["imatrix"]
    assert imx["used"] and imx["source"].startswith("training data") and imx["rows"] >= 100
    assert 1 <= imx["chunks"] <= 200 and imx["n_ctx"] <= MAX_CTX
    assert (out / f"{name}-imatrix.gguf").is_file()  # published, for re-quantizing later
    for q in ("q4_k_m", "iq4_xs"):
        f = _file(report, q)
        assert (out / f"{name}-{q}.gguf").is_file()
        w = f["without_imatrix"]  # the same type without the matrix, on the same tokens
        assert w["kl_divergence"] is not None and w["scored_tokens"] == f["scored_tokens"] > 0
        assert f["imatrix_kl_change"] == pytest.approx(
            (f.get("with_imatrix") or f)["kl_divergence"] / w["kl_divergence"] - 1, rel=1e-6)
        # the plain file replaces the imatrix one only when clearly closer to the 16-bit model
        with_ = f.get("with_imatrix") or f
        sigma = (with_["kl_divergence_err"] ** 2 + w["kl_divergence_err"] ** 2) ** 0.5
        assert sigma > 0 and f["imatrix_kl_change_sigma"] == pytest.approx(
            (with_["kl_divergence"] - w["kl_divergence"]) / sigma, abs=0.01)
        clearly_better_without = w["kl_divergence"] + IMATRIX_MARGIN_SIGMA * sigma < with_["kl_divergence"]
        assert f["imatrix"] is (not clearly_better_without)
        assert f["ppl_ratio"] > 0
    # the matrix really went into the file: llama-quantize records it in the GGUF
    from export.gguf_info import read_gguf

    meta = read_gguf(out / f"{name}-q4_k_m.gguf").metadata
    if _file(report, "q4_k_m")["imatrix"]:
        assert meta.get("quantize.imatrix.dataset") == "imatrix-data.txt"
        assert meta.get("quantize.imatrix.file") == f"{name}-imatrix.gguf"  # no local paths
    assert "importance matrix" in log and "imatrix" in log


@pytest.mark.slow
def test_both_merge_bases_measured_and_the_closer_kept(auto_export):
    out, report, log = auto_export
    m = report["merge"]
    assert set(m["candidates"]) == {"dequantized", "original"}
    for figures in m["candidates"].values():
        assert figures["kl_divergence"] is not None and figures["agreement"] is not None
    kl = {b: f["kl_divergence"] for b, f in m["candidates"].items()}
    err = {b: f["kl_divergence_err"] for b, f in m["candidates"].items()}
    clearly = kl["original"] + IMATRIX_MARGIN_SIGMA * (err["original"] ** 2 + err["dequantized"] ** 2) ** 0.5
    assert m["chosen"] == ("original" if clearly < kl["dequantized"] else "dequantized")
    # the dequantized merge is the training-time model up to rounding; the original is not
    assert kl["dequantized"] < 1e-3 < kl["original"]
    assert m["base"] == m["chosen"] and "NF4" in m["base_used"]
    assert len(m["made"]) == 2 and "Merge base measured against the training-time model" in log
    assert not list(out.glob("merged*")) and not list(out.glob("*original*"))


@pytest.mark.slow
def test_llama_cpp_answers_from_each_file_and_stops(auto_export, qlora_run):
    out, report, _ = auto_export
    assert report["validation"]["reference_stop_rate"] >= 0.5
    for q in ("q4_k_m", "iq4_xs"):
        f = _file(report, q)
        assert f["tokenization_ok"] and f["generations"] == 6 and f["stop_rate"] >= 0.5
        assert any(s["stopped"] and s["llama_cpp"].strip() for s in f["samples"])
    readme = (out / "README.md").read_text()
    assert "| KL divergence | importance matrix |" in readme
    from export.modelfile import pick_file

    assert report["recommended"] == pick_file(report["files"], report["outputs"])
    if report["recommended"]:
        assert report["recommended"] in report["outputs"] and "**Which file:**" in readme
    # the library API reads the new figures as typed fields
    from macft.api import ExportReport

    rep = ExportReport.read(out)
    assert rep.imatrix["used"] and rep.recommended == report["recommended"] and rep.merge["chosen"]
    q = next(f for f in rep.files if f.kind == "q4_k_m")
    assert q.without_imatrix["kl_divergence"] is not None and q.imatrix_kl_change is not None


@pytest.mark.slow
def test_no_imatrix_and_a_chosen_merge_base(qlora_run, llama_tools, tmp_path):
    out = tmp_path / "plain"
    r = macft("export", "--run", qlora_run, "--quant", "q4_k_m", "--no-imatrix", "--merge-base", "original",
              "--verify-prompts", "2", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "export-report.json").read_text())
    assert report["imatrix"] == {"used": False, "why": "turned off (--no-imatrix)"}
    f = _file(report, "q4_k_m")
    assert f["imatrix"] is False and "without_imatrix" not in f
    assert not list(out.glob("*imatrix*"))
    m = report["merge"]
    assert m["base"] == "original" and "candidates" not in m and len(m["made"]) == 1
    assert m["check"]["expected"].startswith("different by the base's quantization error")
    # the i-quants are refused without a matrix, before anything is written
    out2 = tmp_path / "refused"
    r = macft("export", "--run", qlora_run, "--quant", "iq4_xs", "--no-imatrix", "--output", out2)
    assert r.returncode != 0 and "iq4_xs is an i-quant" in r.stderr and "--no-imatrix" in r.stderr
    assert not out2.exists()


@pytest.mark.slow
def test_given_imatrix_file_and_dequantized_merge_base(auto_export, qlora_run, tmp_path):
    given = auto_export[0] / f"{qlora_run.name}-imatrix.gguf"
    out = tmp_path / "given"
    r = macft("export", "--run", qlora_run, "--quant", "q3_k_m", "--imatrix", given,
              "--merge-base", "dequantized", "--no-verify", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "export-report.json").read_text())
    assert report["imatrix"]["used"] and report["imatrix"]["source"] == f"--imatrix {given}"
    assert _file(report, "q3_k_m")["imatrix"] is True
    assert report["merge"]["base"] == "dequantized" and len(report["merge"]["made"]) == 1
    from export.gguf_info import read_gguf

    assert read_gguf(out / f"{qlora_run.name}-q3_k_m.gguf").metadata.get("quantize.imatrix.chunks_count")
    assert not list(out.glob("*imatrix.gguf"))  # the user's own file is not copied


@pytest.mark.slow
def test_adapter_without_its_run_falls_back_to_no_imatrix(gemma_trained_adapter, tiny_gemma, llama_tools, tmp_path):
    out = tmp_path / "adapter-only"
    r = macft("export", "--adapter", gemma_trained_adapter, "--model", tiny_gemma, "--quant", "q4_k_m",
              "--no-verify", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "export-report.json").read_text())
    assert report["imatrix"]["used"] is False
    lines = [ln for ln in r.stderr.splitlines() if "no importance matrix" in ln]
    assert len(lines) == 1 and "without its run directory" in lines[0]
    # iq4_xs cannot go on without one: refused up front, naming the fixes
    r = macft("export", "--adapter", gemma_trained_adapter, "--model", tiny_gemma, "--quant", "iq4_xs",
              "--output", tmp_path / "refused")
    assert r.returncode != 0 and "--imatrix FILE" in r.stderr and "--run RUN" in r.stderr
    assert not (tmp_path / "refused").exists()


# --------------------------------------------------------------------------- rules, no llama.cpp


def test_no_imatrix_and_imatrix_file_contradict(run_cli, tmp_path):
    given = tmp_path / "m.gguf"
    given.write_bytes(b"x")
    rc, _, err = run_cli("export", "--run", str(tmp_path / "run"), "--imatrix", str(given), "--no-imatrix")
    assert rc == 2 and "--no-imatrix and --imatrix" in err and "contradict" in err


def test_low_bit_types_are_offered_and_the_i_quants_need_a_matrix():
    assert parse_quant_types(["IQ4_XS", "q3_k_m", "q2_k", "iq3_m"]) == ["iq4_xs", "q3_k_m", "q2_k", "iq3_m"]
    assert set(NEEDS_IMATRIX) == {"iq4_xs", "iq3_m"} and set(NEEDS_IMATRIX) <= set(IMATRIX_TYPES)
    assert "q8_0" not in IMATRIX_TYPES and "bf16" not in IMATRIX_TYPES
    with pytest.raises(MacftError, match="i-quants"):
        plan_imatrix("off", ["iq4_xs", "iq3_m"], None, from_run=True)
    assert plan_imatrix("off", ["q4_k_m"], None, from_run=True).mode == "off"
    # nothing to weigh: q8_0 alone makes no matrix
    p = plan_imatrix("auto", ["q8_0"], None, from_run=False)
    assert p.mode == "off" and "uses an importance matrix" in p.why
    with pytest.raises(MacftError, match="does not exist"):
        plan_imatrix("/nonexistent/imatrix.gguf", ["q4_k_m"], None, from_run=True)


def test_quantize_passes_the_matrix_only_to_types_that_use_it(tmp_path, monkeypatch):
    import export.quantize as quantize_mod

    seen = []

    class Tools:
        def tool(self, name):
            return Path(name)

    def fake_run(cmd, **kw):
        seen.append(cmd)
        Path(cmd[-3]).write_bytes(b"x")  # the .tmp output
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(quantize_mod.subprocess, "run", fake_run)
    for q in ("q4_k_m", "q8_0", "iq4_xs"):
        quantize_mod.quantize(Tools(), tmp_path / "in.gguf", tmp_path / f"{q}.gguf", q, 1, imatrix=tmp_path / "m.gguf")
    uses = [("--imatrix" in c) for c in seen]
    assert uses == [True, False, True]


def test_chunk_length_fits_the_data():
    assert context_for(10 ** 6) == MAX_CTX
    assert context_for(2 * MAX_CTX - 1) == MAX_CTX // 2
    assert context_for(2 * MIN_CTX) == MIN_CTX
    assert context_for(2 * MIN_CTX - 1) is None


def test_rows_are_sampled_reproducibly_within_the_budget(tiny_gemma):
    from macft.data.dataset import load_samples
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    renderer = Renderer(load_tokenizer(str(tiny_gemma)))
    _, rows = load_samples(str(NYA / "train.jsonl"))
    a = render_rows(renderer, rows, 2000)
    b = render_rows(renderer, rows, 2000)
    assert a == b and 2000 <= a[1] < 2000 + 600 and a[2] < len(rows)
    assert a[0][0].startswith("<bos><start_of_turn>user")  # the chat template as in training
    # shuffled with a fixed seed, not the file's first rows
    assert a[0] != [renderer.render_text(r.messages) for r in rows[:a[2]]]


def test_report_cells_and_the_recommended_file():
    from export.modelfile import pick_file
    from export.report import _imatrix_cell, merge_choice_lines

    assert _imatrix_cell({"imatrix": True, "imatrix_kl_change": -0.23}) == "yes -23%"
    assert _imatrix_cell({"imatrix": False, "with_imatrix": {}, "imatrix_kl_change": 0.1}) == "no (+10% with)"
    assert _imatrix_cell({"kind": "bf16"}) == ""
    def f(name, size, kl, top=0.95, stop=1.0):
        return {"file": name, "kind": name.split("-")[1], "size": size, "kl_divergence": kl, "same_top": top,
                "stop_rate": stop, "ref_stop_rate": 1.0}

    files = [f("a-q8_0", 900, 0.001), f("a-q4_k_m", 500, 0.03), f("a-q2_k", 300, 0.2),
             f("a-iq3_m", 350, 0.04, top=0.85), f("a-q3_k_m", 400, 0.04, stop=0.5)]
    # q2_k drifts too far, iq3_m picks other tokens too often, q3_k_m stops too rarely
    assert pick_file(files, [x["file"] for x in files]) == "a-q4_k_m"
    assert pick_file(files, ["a-q8_0"]) == "a-q8_0"  # only published files
    assert pick_file(files[2:], [x["file"] for x in files]) is None
    lines = merge_choice_lines({"candidates": {"dequantized": {"kl_divergence": 1e-5, "agreement": 1.0},
                                               "original": {"kl_divergence": 0.02, "agreement": 0.7}},
                                "chosen": "dequantized"})
    assert "original: KL 0.02, greedy agreement 70%" in lines[0] and "kept [bold]dequantized" in lines[0]


@pytest.mark.slow
def test_time_budget_cuts_the_chunks(tiny_gemma, llama_tools, tmp_path, monkeypatch):
    """When llama-imatrix's first pass predicts more than the budget, it is stopped and run
    again over the chunks that fit (here: one pass)."""
    import export.imatrix as imatrix_mod
    from export.convert import convert_model
    from export.imatrix import ImatrixPlan, compute
    from macft.data.dataset import load_samples
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    gguf = tmp_path / "tiny-f16.gguf"
    convert_model(llama_tools, tiny_gemma, gguf, "f16")
    _, rows = load_samples(str(NYA / "train.jsonl"))
    renderer = Renderer(load_tokenizer(str(tiny_gemma)))
    said = []
    monkeypatch.setattr(imatrix_mod, "MAX_SECONDS", 1e-6)
    imx, why = compute(llama_tools, gguf, ImatrixPlan("data", samples=rows, source="nya"), renderer, tmp_path,
                       "tiny", say=said.append)
    assert why is None and imx.path.is_file() and not list(tmp_path.glob("*.tmp*"))
    n_seq = imatrix_mod.BATCH // imx.n_ctx
    assert imx.chunks == n_seq < imx.tokens // imx.n_ctx
    assert any("budget" in s and f"using {n_seq} chunks" in s for s in said)


@pytest.mark.slow
def test_failing_llama_imatrix_names_the_way_out_and_leaves_nothing(qlora_run, llama_tools, tmp_path, monkeypatch):
    import export.imatrix as imatrix_mod
    from export.job import ExportOptions, resolve_job
    from export.pipeline import run_export
    from macft.errors import ToolError

    monkeypatch.setattr(imatrix_mod, "IMATRIX_TOOL", "llama-tokenize")  # a tool that refuses imatrix's flags
    out = tmp_path / "out"
    job = resolve_job(run=str(qlora_run), adapter=None, model=None, output=str(out), name=None, best=False,
                      export_values={"export.quant": "q4_k_m", "export.merge_base": "dequantized"},
                      options=ExportOptions(verify=False))
    with pytest.raises(ToolError) as e:
        run_export(job)
    assert "llama-imatrix could not compute the importance matrix" in str(e.value.hint)
    assert "--no-imatrix" in str(e.value.hint)
    assert not out.exists()
