"""The Python API (macft.api): options named as the flags, unknown ones refused with the close
ones, nothing printed unless asked, and examples/python_api.py run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO

import macft
from macft.api import TRAIN_SECTIONS, Chat, ExportReport, config_values, option_name
from macft.config import field_specs
from macft.errors import ConfigError


def test_options_map_to_config_keys_by_their_flags():
    values = config_values("t", {"model": "m", "data": Path("d"), "lora_rank": 8, "batch_size": 2,
                                 "learning_rate": 1e-3, "lora_targets": ("q_proj", "v_proj")}, TRAIN_SECTIONS)
    assert values == {"model.name": "m", "data.train": "d", "lora.rank": 8, "train.batch_size": 2,
                      "train.learning_rate": 1e-3, "lora.targets": ["q_proj", "v_proj"]}
    # every flag of `macft train` has exactly one Python name
    names = [option_name(s.flag) for s in field_specs(TRAIN_SECTIONS)]
    assert len(names) == len(set(names)) and {"iters", "backend", "seed", "output"} <= set(names)


def test_unknown_options_are_refused_all_at_once_with_close_matches(tmp_path):
    with pytest.raises(ConfigError) as e:
        macft.train(model="m", data="d", iter=3, batchsize=2, frobnicate=1)
    assert len(e.value.problems) == 3
    assert "'iter' (did you mean 'iters'?)" in e.value.problems[0]
    assert "'batch_size'" in e.value.problems[1] and "did you mean" not in e.value.problems[2]
    assert "macft.train()" in e.value.message
    with pytest.raises(ConfigError, match="verify_prompts"):
        macft.export(tmp_path, verfiy_prompts=2)
    with pytest.raises(ConfigError, match="'max_seq_len'"):
        macft.estimate(model="m", max_seq_length=64)
    with pytest.raises(ConfigError, match="'backend'"):
        macft.load_chat_model(tmp_path, backnd="mlx")
    # a wrong value names the flag, as on the command line
    with pytest.raises(ConfigError, match="--iters: expected an integer"):
        macft.estimate(model="m", iters="many")


def test_import_macft_is_light():
    code = ("import sys, macft; heavy = {'torch', 'mlx', 'transformers', 'numpy'} & set(sys.modules); "
            "assert not heavy, heavy; f = macft.estimate; import macft.sizing; "
            "from macft.sizing import Setting; assert macft.estimate is f and callable(f); "
            "assert macft.RunConfig().train.iters == 0; print(macft.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == macft.__version__


def test_silenced_prints_nothing_and_turns_warnings_into_python_warnings(capfd):
    from macft.ui import console, out, quiet, silenced, warn

    with silenced():
        assert quiet()
        console.print("progress")
        out.print("result")
        with pytest.warns(UserWarning, match="^careful$"):
            warn("[bold]careful[/]")
    with silenced(False):
        console.print("shown")
    assert not quiet()
    captured = capfd.readouterr()
    assert "progress" not in captured.err + captured.out and "result" not in captured.out
    assert "shown" in captured.err


def test_estimate_returns_the_parts_quietly(tiny_gemma, capfd):
    capfd.readouterr()
    est = macft.estimate(model=tiny_gemma, backend="cuda", batch_size=2, max_seq_len=64, calibrate_steps=0)
    captured = capfd.readouterr()
    assert captured.out == "" and "Peak memory" not in captured.err
    assert est.fits and est.total_bytes == sum(est.parts_bytes.values()) > 0
    assert (est.batch_rows, est.batch_tokens) == (2, 64) and est.calibration is None
    assert est.to_dict()["largest_batch"] == {"rows": 2, "tokens": 64}
    macft.estimate(model=tiny_gemma, backend="cuda", batch_size=2, max_seq_len=64, calibrate_steps=0,
                   verbose=True)
    assert "Peak memory" in capfd.readouterr().err


class FakeModel:
    kind, description, tokenizer = "fake", "a fake model", None

    def __init__(self):
        self.prompts = []
        self.closed = False

    def prompt(self, messages):
        self.prompts.append(messages)
        return messages

    def stream(self, prompt, sampling):
        from macft.inference import Generation

        pieces = ["It is ", "9 ", "にゃ"][:sampling.max_new_tokens]
        yield from pieces
        self.last = Generation("".join(pieces), [], stopped=True)

    def close(self):
        self.closed = True


def test_chat_takes_text_or_messages_and_streams():
    fake = FakeModel()
    with Chat(fake, system="You are a cat.") as chat:
        g = chat.generate("What is 7 plus 2?")
        assert g.text == "It is 9 にゃ" and g.stopped
        assert fake.prompts[-1] == [{"role": "system", "content": "You are a cat."},
                                    {"role": "user", "content": "What is 7 plus 2?"}]
        msgs = [{"role": "user", "content": "hi"}]
        assert list(chat.stream(msgs, max_new_tokens=2)) == ["It is ", "9 "]
        assert fake.prompts[-1][0]["role"] == "system" and msgs == [{"role": "user", "content": "hi"}]
        assert chat.last.text == "It is 9 "
    assert fake.closed


def test_export_report_keeps_every_key():
    data = {"macft_version": "0.1.0", "inputs": {"quant": ["q8_0"]}, "outputs": ["m-q8_0.gguf"],
            "files": [{"file": "m-f16.gguf", "kind": "f16", "size": 10, "agreement": 1.0, "types": {"F16": 3}},
                      {"file": "m-q8_0.gguf", "kind": "q8_0", "size": 5, "agreement": 0.9}],
            "warnings": [], "tolerance": {"kl": 0.1}}
    report = ExportReport.from_dict(data)
    assert report.verified and report.files[0].extra == {"types": {"F16": 3}}
    assert report.extra == {"tolerance": {"kl": 0.1}}
    back = report.to_dict()
    assert {k: back[k] for k in data} == {**data, "files": [report.files[0].to_dict(), report.files[1].to_dict()]}
    assert back["files"][0]["types"] == {"F16": 3} and back["files"][1]["agreement"] == 0.9


@pytest.mark.slow
def test_the_python_api_example_trains_chats_and_exports(tmp_path, llama_tools):
    out = tmp_path / "example"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), "--output", str(out),
                        "--backend", "cuda", "--iters", "30"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"trained: {out / 'run'}") and "30 steps" in lines[0]
    assert any(x.startswith("chat: ") for x in lines) and any(x.startswith("stream: ") for x in lines)
    assert "exported: ['run-q8_0.gguf']" in r.stdout
    assert (out / "run" / "export" / "run-q8_0.gguf").is_file()
    report = ExportReport.read(out / "run" / "export")
    assert report.verified and report.files[-1].kind == "q8_0" and report.files[-1].stop_rate is not None
    assert any(x.startswith("estimate: ") for x in lines)
    # the API printed nothing of its own while training (no progress, no summary table)
    assert "Training with the" not in r.stderr and "Outputs in" not in r.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = macft.open_run(out / "run")
    assert run.summary()["steps"] == 30 and run.adapter_dir.is_dir()
