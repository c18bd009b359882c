"""The CLI answers --help everywhere without torch, mlx or transformers installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        BLOCKED = ("torch", "mlx", "mlx_lm", "transformers", "peft", "bitsandbytes", "accelerate")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    return subprocess.run([sys.executable, "-m", "macft", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def _commands() -> list[list[str]]:
    from macft.cli import COMMANDS, DATA_COMMANDS

    return [[c] for c in COMMANDS] + [["data", c] for c in DATA_COMMANDS]


def test_help_lists_commands_without_heavy_packages(tmp_path):
    r = _run(tmp_path, "--help")
    assert r.returncode == 0, r.stderr
    for cmd in _commands():
        assert cmd[0] in r.stdout


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c))
def test_every_command_help_works_without_heavy_packages(tmp_path, cmd):
    r = _run(tmp_path, *cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: macft" in r.stdout


def test_each_command_module_owns_its_help_arguments_and_run():
    import importlib

    from macft.cli import COMMANDS, DATA_COMMANDS

    for help_text, module in [*COMMANDS.values(), *DATA_COMMANDS.values()]:
        mod = importlib.import_module(module)
        assert mod.HELP == help_text, module  # the line `macft --help` lists without importing it
        assert callable(mod.add_arguments) and callable(mod.run), module


def test_help_imports_no_command_module():
    code = textwrap.dedent("""
        import json, sys
        from macft.cli import build_parser
        def commands():
            return sorted(m for m in sys.modules if m.startswith(("macft.commands.", "export.")))
        build_parser(["--help"])
        before = commands()
        build_parser(["--debug", "chat", "--help"])
        print(json.dumps([before, commands()]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout)
    assert before == []
    assert "macft.commands.chat" in after and "macft.commands.train" not in after


def test_blocker_really_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    r = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_train_without_backend_packages_says_how_to_install(tmp_path, nya_dir):
    r = _run(tmp_path, "train", "--model", str(tmp_path), "--data", str(nya_dir), "--backend", "mlx")
    assert r.returncode == 2
    assert "pip install" in r.stderr and "Traceback" not in r.stderr


def test_console_script_and_module_entry_points():
    exe = Path(sys.executable).parent / "macft"
    if exe.exists():
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and "macft" in r.stdout
    r = subprocess.run([sys.executable, "-m", "macft", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "macft" in r.stdout


def test_models_lists_presets_and_backends(run_cli):
    import json

    rc, out, err = run_cli("models", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["presets"]["gemma3-1b"]["hub_id"] == "google/gemma-3-1b-it"
    assert rep["presets"]["gemma3-4b"]["end_tokens"][0] == "<end_of_turn>"
    assert "gemma3_text" in rep["backends"]["mlx"] and "qwen2" in rep["backends"]["cuda"]
    assert {c["layout"] for c in rep["checkpoints"]} >= {"gemma3-4b", "rinna-neox-3.6b", "elyza-llama2-7b"}
    rc, out, err = run_cli("models")
    assert rc == 0 and "gemma3-1b" in err and "conformance suite" in err


def test_preset_is_a_layer_under_yaml_and_flags(tmp_path):
    from macft.config import build_config
    from macft.presets import get_preset

    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 1\n")
    cfg = build_config(y, {"lora.rank": "8"}, base=get_preset("gemma3-4b").config)
    assert cfg.model.name == "google/gemma-3-4b-it" and cfg.model.quantize == "4bit"  # preset
    assert cfg.train.epochs == 1.0  # YAML over preset
    assert cfg.lora.rank == 8  # flag over all
    assert cfg.train.grad_checkpoint is True


# --------------------------------------------------------------------------- unexpected errors


def _command_raising(monkeypatch, tmp_path: Path, body: str) -> None:
    """Register a `macft boom` command whose handler runs ``body``."""
    import hashlib

    from macft import cli

    name = "macft_test_boom_" + hashlib.sha1(body.encode()).hexdigest()[:10]  # a fresh module each
    (tmp_path / f"{name}.py").write_text(
        "import errno\n\nHELP = 'raise'\n\ndef add_arguments(p):\n    pass\n\n"
        "def run(args):\n" + textwrap.indent(body, "    ") + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "boom", ("raise", name))


def test_an_unexpected_error_is_one_paragraph_and_a_log_file(monkeypatch, tmp_path, capsys):
    import tempfile

    from macft.cli import main

    _command_raising(monkeypatch, tmp_path, "raise ValueError('the secret detail')")
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    assert main(["boom"]) == 1
    out = capsys.readouterr().err
    assert "unexpected ValueError: the secret detail" in out
    assert "Traceback" not in out and "--debug" in out and "report it" in out
    (log,) = logs.glob("macft-error-*.log")
    text = log.read_text()
    assert "command: macft boom" in text and "Traceback" in text and "the secret detail" in text
    assert str(log) in out.replace("\n", "")
    with pytest.raises(ValueError):
        main(["--debug", "boom"])


def test_an_os_error_names_the_file_and_the_free_space(monkeypatch, tmp_path, capsys):
    import tempfile

    from macft.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "runs" / "adapter_model.safetensors"
    _command_raising(monkeypatch, tmp_path,
                     f"raise OSError(errno.ENOSPC, 'No space left on device', {str(target)!r})")
    assert main(["boom"]) == 1
    out = capsys.readouterr().err.replace("\n", " ")
    assert "The disk is full" in out and "adapter_model.safetensors" in out and "GB free" in out
    assert "Traceback" not in out
    _command_raising(monkeypatch, tmp_path, f"raise PermissionError(errno.EACCES, 'denied', {str(target)!r})")
    assert main(["boom"]) == 1
    assert "Permission denied" in capsys.readouterr().err
