"""`macft demo`, the README's main job: offline, end to end, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_offline_and_ends_with_the_ggufs_answers(tmp_path, llama_tools):
    out = tmp_path / "demo"
    # no network: the hub is off and no proxy leads anywhere
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", PYTHONUNBUFFERED="1",
               COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "macft", "demo", "--output", str(out)],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    answers = json.loads((out / "before_after.json").read_text(encoding="utf-8"))
    assert len(answers) == 3
    # the base answers plainly; the fine-tuned GGUF answers the 「にゃ」 way
    assert all(a["after"].endswith("にゃ") for a in answers), answers
    assert not all(a["before"].endswith("にゃ") for a in answers), answers
    text = r.stdout + r.stderr
    assert "Demo finished" in text and "q4_k_m.gguf" in text
    assert len(list((out / "export").glob("*-q4_k_m.gguf"))) == 1
    assert (out / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # a second run refuses to overwrite without being asked
    r2 = subprocess.run([sys.executable, "-m", "macft", "demo", "--output", str(out)],
                        capture_output=True, text=True, env=env)
    assert r2.returncode == 2 and "--overwrite" in r2.stderr


def test_demo_outside_a_clone_says_how_to_get_the_data(run_cli, tmp_path, monkeypatch):
    from macft.commands import demo

    monkeypatch.setattr(demo, "DATA", tmp_path / "no-data")
    rc, _, err = run_cli("demo", "--output", tmp_path / "d")
    assert rc == 2 and "clone" in err and "pip install -e" in err
    assert not (tmp_path / "d").exists()


def test_a_failed_demo_leaves_nothing_behind(run_cli, tmp_path, monkeypatch):
    import export.llama_cpp
    from macft.errors import MacftError

    def no_tools(log=None):
        raise MacftError("CMake was not found.", "Install cmake.")

    monkeypatch.setattr(export.llama_cpp, "ensure_built", no_tools)
    rc, _, err = run_cli("demo", "--output", tmp_path / "d")
    assert rc == 2 and "CMake was not found" in err
    assert not (tmp_path / "d").exists()
