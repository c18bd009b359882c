"""No file or flag a user hands macft can make it run code.

Run directories, model directories and data sets travel between people (shared drives,
zips, notebook downloads). macft reads them as data only: no pickle (``torch.load``
without ``weights_only=True``, ``pickle``, ``np.load(allow_pickle=True)``), no
``eval``/``exec``, no shell, no unsafe YAML, no remote code from model repositories.
This test reads macft's own source and fails on any such call.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("macft", "export", "cuda_backend", "bench")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(tree: ast.AST) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"):
                    out.append((node.lineno, f"imports {n}"))
        if not isinstance(node, ast.Call):
            continue
        fn = _dotted(node.func)
        last = fn.rsplit(".", 1)[-1]
        if fn in ("eval", "exec", "compile", "__import__"):
            out.append((node.lineno, f"calls {fn}()"))
        if fn.endswith("torch.load"):
            if not _is_true(_kw(node, "weights_only")):
                out.append((node.lineno, "torch.load without weights_only=True"))
        if last == "load" and fn.split(".")[0] in ("np", "numpy") and _is_true(_kw(node, "allow_pickle")):
            out.append((node.lineno, "np.load(allow_pickle=True)"))
        if _is_true(_kw(node, "shell")):
            out.append((node.lineno, f"{fn}(shell=True)"))
        if fn in ("os.system", "os.popen", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            out.append((node.lineno, f"calls {fn}"))
        if _is_true(_kw(node, "trust_remote_code")):
            out.append((node.lineno, f"{fn}(trust_remote_code=True)"))
    return out


def test_the_checker_finds_what_it_looks_for():
    bad = ("import pickle\nimport torch\nimport yaml, os, subprocess\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\neval('1')\nexec('1')\n"
           "subprocess.run('ls', shell=True)\nos.system('ls')\nyaml.load('a')\n"
           "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
           "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n")
    found = findings(ast.parse(bad))
    assert len(found) == 10, found
    good = ("import torch, yaml, subprocess\ntorch.load('x', weights_only=True)\nmx.eval(a)\n"
            "model.eval()\nsubprocess.run(['ls'])\nyaml.safe_load('a')\n")
    assert findings(ast.parse(good)) == []


def test_no_code_runs_from_files_or_flags():
    problems = []
    for path in _sources():
        for line, what in findings(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "\n".join(problems)
