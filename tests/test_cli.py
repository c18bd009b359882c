"""The CLI answers --help everywhere without torch, mlx or transformers installed."""

from __future__ import annotations

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
    from macft.cli import COMMANDS, DATA_COMMANDS, _load_extra_commands

    _load_extra_commands()
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
