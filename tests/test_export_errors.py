"""Bad input to `macft export` / `macft setup llama-cpp`: one clear message (exit 2, no
traceback) each, and nothing half-written left in the output directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from export.fixtures import random_adapter, write_run_dir

NYA = Path(__file__).resolve().parents[1] / "examples" / "data" / "nya_chat"


@pytest.fixture(scope="module")
def random_run(tiny_gemma, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("err-run")
    adapter = random_adapter(tiny_gemma, root / "adapter-src", rank=4)
    return write_run_dir(root / "run", tiny_gemma, adapter, NYA)


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "error:" in err


def test_run_without_adapter(run_cli, random_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(random_run, run)
    shutil.rmtree(run / "adapter")
    rc, _, err = run_cli("export", "--run", run)
    assert rc == 2 and "has no adapter to export" in err
    assert "before its first checkpoint" in err and "start the training again" in err
    _no_traceback(err)
    assert not (run / "export").exists()
    # interrupted after a checkpoint: resume it, or use the checkpoint's adapter
    ckpt = run / "checkpoints" / "step-000050"
    shutil.copytree(random_run / "adapter", ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    rc, _, err = run_cli("export", "--run", run)
    assert rc == 2 and "checkpoint at step 50" in err and f"macft train --resume {run}" in err
    assert f"--adapter {ckpt} --model " in err
    _no_traceback(err)
    assert not (run / "export").exists()


def test_output_is_a_file(run_cli, random_run, tmp_path):
    f = tmp_path / "out.gguf"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, _, err = run_cli("export", "--run", random_run, "--output", out)
        assert rc == 2 and f"{f} is a file, not a directory" in err, err
        _no_traceback(err)
    assert f.read_text() == "x"


def test_stale_work_dirs_of_killed_exports_are_removed(run_cli, random_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        for pid in (dead.pid, live.pid):
            (out / f".macft-export-{pid}" / "merged").mkdir(parents=True)
            (out / f".macft-export-{pid}" / "merged" / "model.safetensors").write_bytes(b"0" * 4096)
        # an export that fails after creating its own work directory (converter fails)
        fake = _fake_checkout(tmp_path / "llama.cpp", "import sys\nsys.exit(3)\n")
        rc, _, err = run_cli("export", "--run", random_run, "--llama-cpp", fake, "--output", out)
        assert rc == 2 and "This command failed" in err
        assert f"Removed .macft-export-{dead.pid}/ (4.0 KB), left by an export that was killed" in err
        assert not (out / f".macft-export-{dead.pid}").exists()
        assert (out / f".macft-export-{live.pid}" / "merged" / "model.safetensors").is_file()
        assert sorted(p.name for p in out.iterdir()) == [f".macft-export-{live.pid}"]
    finally:
        live.kill()
        live.wait()


def test_disk_full_during_export(random_run, llama_tools, tmp_path):
    """The output on a 6 MB file system: refused up front; and with the up-front estimate
    bypassed, the disk fills during the merge: the message says where, how much is needed and
    free, and nothing is left on the disk."""
    import sys

    import smallfs

    if not smallfs.available():
        pytest.skip("no unprivileged tmpfs mounts here (user namespaces)")
    repo = Path(__file__).resolve().parents[1]
    mnt, snap = tmp_path / "small", tmp_path / "snap"
    out = mnt / "out"
    r = smallfs.run([sys.executable, "-m", "macft", "export", "--run", str(random_run), "--output", str(out)],
                    mnt, "6m", snap, cwd=repo)
    assert r.returncode == 2 and "Not enough disk space" in r.stderr, r.stderr
    assert not any(snap.iterdir())
    code = ("import sys, export.pipeline as p; p._free_bytes = lambda _p: 1 << 40; "
            "from macft.cli import main; sys.exit(main(sys.argv[1:]))")
    snap2 = tmp_path / "snap2"
    r = smallfs.run([sys.executable, "-c", code, "export", "--run", str(random_run), "--output", str(out),
                     "--quant", "f16", "--no-verify"], mnt, "6m", snap2, cwd=repo)
    assert r.returncode == 2, r.stderr
    assert "The disk filled up during the export into" in r.stderr and str(out) in r.stderr
    assert re.search(r"the export needs about \d+\.\d MB, and [56]\.\d MB is free there now", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert not any(snap2.iterdir())  # no partial files, and the output directory it created is gone


def test_adapter_for_another_base_lists_every_mismatch(run_cli, tiny_gemma, tmp_path):
    import numpy as np

    from macft.adapter import AdapterSpec, write_peft_adapter

    rng = np.random.default_rng(0)
    mods = {  # shapes of a wider model, and a layer the tiny model does not have
        "model.layers.0.self_attn.q_proj": (rng.standard_normal((4, 512), dtype=np.float32),
                                            rng.standard_normal((256, 4), dtype=np.float32)),
        "model.layers.1.mlp.up_proj": (rng.standard_normal((4, 256), dtype=np.float32),
                                       rng.standard_normal((1024, 4), dtype=np.float32)),
        "model.layers.30.mlp.down_proj": (rng.standard_normal((4, 512), dtype=np.float32),
                                          rng.standard_normal((256, 4), dtype=np.float32)),
    }
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, mods, AdapterSpec("google/gemma-3-1b-it", 4, 8.0, 0.0, ["q_proj"]))
    out = tmp_path / "out"
    rc, _, err = run_cli("export", "--adapter", adapter, "--model", tiny_gemma, "--output", out)
    assert rc == 2 and "3 mismatches" in err
    for m in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj", "layers.30.mlp.down_proj"):
        assert m in err
    assert "google/gemma-3-1b-it" in err
    _no_traceback(err)
    assert not out.exists()


def test_unknown_quant_type_lists_the_valid_ones(run_cli, random_run):
    rc, _, err = run_cli("export", "--run", random_run, "--quant", "q4_k_m,q3_x")
    assert rc == 2 and "q3_x" in err
    for q in ("q4_k_m", "q4_0", "q4_k_s", "q5_k_m", "q6_k", "q8_0", "f16", "bf16"):
        assert q in err
    _no_traceback(err)
    assert not (random_run / "export").exists()


def test_run_and_adapter_are_alternatives(run_cli, random_run):
    rc, _, err = run_cli("export")
    assert rc == 2 and "Nothing to export" in err
    rc, _, err = run_cli("export", "--run", random_run, "--adapter", random_run / "adapter")
    assert rc == 2 and "alternatives" in err
    rc, _, err = run_cli("export", "--adapter", random_run / "adapter")
    assert rc == 2 and "--adapter needs --model" in err


def test_architecture_llama_cpp_cannot_convert(run_cli, tiny_gemma, llama_tools, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_gemma, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["Gemma9ForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    adapter = random_adapter(base, tmp_path / "adapter", rank=2)
    out = tmp_path / "out"
    rc, _, err = run_cli("export", "--adapter", adapter, "--model", base, "--output", out)
    assert rc == 2 and "cannot convert the architecture Gemma9ForCausalLM" in err
    assert "Gemma3ForCausalLM" in err  # related architectures it does support
    _no_traceback(err)
    assert not out.exists()


def test_not_enough_disk(run_cli, random_run, llama_tools, monkeypatch):
    import export.pipeline

    monkeypatch.setattr(export.pipeline, "_free_bytes", lambda path: 10 << 20)
    rc, _, err = run_cli("export", "--run", random_run, "--quant", "q4_k_m,q8_0")
    assert rc == 2 and "Not enough disk space" in err and "10.0 MB is free" in err
    _no_traceback(err)
    assert not (random_run / "export").exists()


def _empty_path(tmp_path: Path) -> str:
    # a PATH with python (for pip) but no cmake and no compiler
    d = tmp_path / "bin"
    d.mkdir()
    return str(d)


def test_no_compiler_or_cmake_says_what_to_install(run_cli, random_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MACFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", _empty_path(tmp_path))
    monkeypatch.delenv("MACFT_LLAMA_CPP", raising=False)
    rc, out, err = run_cli("setup", "llama-cpp")
    assert rc == 2 and "CMake" in err and "C++ compiler" in err
    assert "apt-get install build-essential cmake" in err or "xcode-select --install" in err or "pip install cmake" in err
    _no_traceback(err)
    assert out == ""
    # export finds the same before writing anything
    rc, _, err = run_cli("export", "--run", random_run)
    assert rc == 2 and "CMake" in err
    assert not (random_run / "export").exists()
    assert not (tmp_path / "cache" / "llama.cpp").exists() or not any(
        (tmp_path / "cache" / "llama.cpp").rglob("*.tar.gz"))


def _fake_checkout(root: Path, convert_body: str) -> Path:
    """A llama.cpp 'checkout' whose converter fails, with stand-in tools."""
    (root / "build" / "bin").mkdir(parents=True)
    for t in ("llama-quantize", "llama-completion", "llama-tokenize", "llama-perplexity"):
        p = root / "build" / "bin" / t
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    (root / "convert_hf_to_gguf.py").write_text(convert_body)
    (root / "convert_lora_to_gguf.py").write_text("")
    (root / "conversion").mkdir()
    (root / "conversion" / "gemma.py").write_text('@ModelBase.register("Gemma3ForCausalLM")\nclass X: pass\n')
    return root


def test_failed_step_names_the_command_and_its_output(run_cli, random_run, tmp_path):
    fake = _fake_checkout(tmp_path / "llama.cpp",
                          "import sys\nprint('loading the model')\nprint('RuntimeError: tensor blk.0 has a bad shape', file=sys.stderr)\nsys.exit(3)\n")
    out = tmp_path / "out"
    rc, _, err = run_cli("export", "--run", random_run, "--llama-cpp", fake, "--output", out)
    assert rc == 2
    assert "This command failed" in err and "convert_hf_to_gguf.py" in err
    assert "tensor blk.0 has a bad shape" in err  # its last output lines
    assert "fix:" in err
    _no_traceback(err)
    assert not out.exists()  # the merged copy and the work directory are gone


def test_llama_cpp_checkout_without_tools(run_cli, random_run, tmp_path):
    d = tmp_path / "checkout"
    d.mkdir()
    rc, _, err = run_cli("export", "--run", random_run, "--llama-cpp", d)
    assert rc == 2 and "not a llama.cpp checkout" in err
    (d / "convert_hf_to_gguf.py").write_text("")
    rc, _, err = run_cli("export", "--run", random_run, "--llama-cpp", d)
    assert rc == 2 and "has no build" in err and "cmake --build build --target" in err
    assert not (random_run / "export").exists()


@pytest.mark.slow
def test_tokenizer_llama_cpp_cannot_identify(run_cli, tiny_qwen2, llama_tools, tmp_path):
    # GPT-2's vocabulary under Qwen2Tokenizer's pre-tokenizer: the converter knows no such split.
    adapter = random_adapter(tiny_qwen2, tmp_path / "adapter", rank=2)
    out = tmp_path / "out"
    rc, _, err = run_cli("export", "--adapter", adapter, "--model", tiny_qwen2, "--output", out)
    assert rc == 2 and "does not recognise this model's tokenizer" in err
    _no_traceback(err)
    assert not out.exists()


def test_setup_is_idempotent_and_prints_the_tool_directory(run_cli, llama_tools):
    import time

    t0 = time.time()
    rc, out, _ = run_cli("setup", "llama-cpp")
    assert rc == 0 and time.time() - t0 < 5
    bin_dir = Path(out.strip().splitlines()[-1])
    assert bin_dir == llama_tools.bin_dir
    for t in ("llama-quantize", "llama-completion", "llama-tokenize", "llama-perplexity"):
        assert os.access(bin_dir / t, os.X_OK)


def test_best_adapter_missing(run_cli, random_run):
    rc, _, err = run_cli("export", "--run", random_run, "--best")
    assert rc == 2 and "best_adapter" in err and "drop --best" in err
    _no_traceback(err)


def test_prompts_file_missing(run_cli, random_run, tmp_path):
    rc, _, err = run_cli("export", "--run", random_run, "--prompts", tmp_path / "nope.jsonl")
    assert rc == 2 and "nope.jsonl does not exist" in err
    assert not (random_run / "export").exists()
