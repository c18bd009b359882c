"""The run directory has one owner, macft/run.py: its names are spelled nowhere else, and every
command reads a run through ``open_run``."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from macft import run as rundir_names
from macft.adapter import CONFIG_NAME, WEIGHTS_NAME
from macft.errors import MacftError
from macft.run import (
    ADAPTER,
    BEST_ADAPTER,
    CHECKPOINTS,
    EXPORT,
    Resolved,
    Run,
    open_run,
    read_quantization,
    write_quantization,
)

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("macft", "export", "cuda_backend")
OWNER = REPO / "macft" / "run.py"

# every name in the run directory (the module's str constants, except glob patterns made of them)
RUN_NAMES = {v for k, v in vars(rundir_names).items()
             if k.isupper() and isinstance(v, str) and k not in ("CHECKPOINT_GLOB",)}
# names that are also ordinary words ("export" the command, "adapter" a report key): only their
# use as a path component counts
WORDS = {ADAPTER, CHECKPOINTS, EXPORT}
# uses of those words as a path that are not the run directory's
NOT_THE_RUN = {
    ("macft/commands/demo.py", EXPORT),  # the demo's own output folder, beside its run/
}
PATH_CALLS = {"Path", "joinpath", "with_name", "open", "glob", "rglob"}


def _path_operands(tree: ast.AST) -> set[int]:
    """ids of the string constants used as a path component: ``x / "name"``, ``Path("name")``."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            out |= {id(n) for n in (node.left, node.right) if isinstance(n, ast.Constant)}
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in PATH_CALLS:
                out |= {id(a) for a in node.args if isinstance(a, ast.Constant)}
    return out


def spelled_run_names(source: str, rel: str) -> list[str]:
    """'file:line 'name'' for each string constant in ``source`` (the file ``rel``) that is a
    run directory's name."""
    tree = ast.parse(source, rel)
    as_path = _path_operands(tree)
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        v = node.value
        is_name = v in RUN_NAMES or v.lstrip(".").startswith(rundir_names.CHECKPOINT_PREFIX)
        if not is_name or (rel, v) in NOT_THE_RUN:
            continue
        if v in WORDS and id(node) not in as_path:
            continue
        hits.append(f"{rel}:{node.lineno} {v!r}")
    return hits


def test_names_cover_the_layout():
    assert {"config.yaml", "metrics.jsonl", "loss.png", "summary.json", "adapter", "best_adapter",
            "mlx_adapter", "base_quantization.json", "checkpoints", "trainer_state.json", ".macft.lock",
            "export"} <= RUN_NAMES


def test_no_module_but_macft_run_spells_a_run_file_name():
    files = [p for d in SOURCES for p in sorted((REPO / d).rglob("*.py")) if p != OWNER]
    assert len(files) > 50
    hits = [h for p in files
            for h in spelled_run_names(p.read_text(encoding="utf-8"), p.relative_to(REPO).as_posix())]
    assert not hits, "use the constants of macft/run.py:\n" + "\n".join(hits)


def test_the_check_finds_a_spelled_name():
    source = textwrap.dedent('''
        from pathlib import Path
        report = {"adapter": 1, "export": 2}   # ordinary words: fine
        def f(run: Path):
            return run / "adapter", run / "summary.json", f"step-{3:06d}", Path("checkpoints")
    ''')
    hits = spelled_run_names(source, "macft/x.py")
    assert [h.split(" ", 1)[1] for h in hits] == ["'adapter'", "'summary.json'", "'step-'", "'checkpoints'"]


# --------------------------------------------------------------------------- Resolved


def test_resolved_keeps_its_order_and_tolerates_older_runs():
    r = Resolved(backend="mlx", end_tokens=["<end_of_turn>"], preset="gemma")
    d = r.to_dict()
    assert list(d)[:4] == ["macft_version", "created", "host", "backend"]
    assert list(d)[-2:] == ["base_fingerprint", "preset"]
    assert Resolved.from_dict(d) == r
    # a run from before some fields existed, with a key this version does not know
    old = Resolved.from_dict({"backend": "cuda", "model_path": "/m", "future_key": 1})
    assert old.end_tokens == [] and old.base_fingerprint is None and old.preset is None
    assert old.extra == {"future_key": 1} and old.to_dict()["future_key"] == 1
    assert Resolved.from_dict(None) == Resolved()
    assert Resolved(chat_template="fallback", fallback_template="X").training_template() == "X"
    assert Resolved(chat_template="model").training_template() is None


# --------------------------------------------------------------------------- open_run


def _fake_run(tmp_path: Path, **kw) -> Path:
    """A run as export.fixtures writes it, on a stand-in base (config.json only) and adapter."""
    from export.fixtures import write_run_dir

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["X"]}))
    adapter = tmp_path / "adapter-src"
    adapter.mkdir()
    (adapter / CONFIG_NAME).write_text("{}")
    (adapter / WEIGHTS_NAME).write_bytes(b"\0" * 8)
    data = tmp_path / "data"
    return write_run_dir(tmp_path / "run", base, adapter, data, **kw)


def test_open_run_on_a_run_without_an_adapter(tmp_path):
    import shutil

    path = _fake_run(tmp_path)
    shutil.rmtree(path / ADAPTER)
    run = open_run(path)
    assert run.path == path and run.backend == "cuda" and run.resolved.model_type == "gemma3"
    assert run.base_model == str(tmp_path / "base") == run.config.model.name
    assert run.checkpoints == [] and run.latest_checkpoint is None
    assert run.summary() is None and run.quantization is None
    assert run.metrics() == [{"type": "eval", "step": 1, "val_loss": 1.0}]
    assert run.export_dir == path / EXPORT
    with pytest.raises(MacftError, match="has no adapter/ and no checkpoint"):
        run.adapter()
    with pytest.raises(MacftError, match="has no best_adapter/ and no checkpoint"):
        run.adapter(best=True)
    # stopped after a checkpoint: its adapter is offered, on the run's base
    ckpt = path / CHECKPOINTS / "step-000040"
    shutil.copytree(tmp_path / "adapter-src", ckpt)
    with pytest.raises(MacftError) as e:
        run.adapter()
    assert "checkpoint at step 40" in e.value.message
    assert f"--adapter {ckpt} --model {tmp_path / 'base'}" in e.value.hint
    # finished without a best adapter
    shutil.copytree(tmp_path / "adapter-src", path / ADAPTER)
    assert run.adapter() == run.adapter_dir == path / ADAPTER
    with pytest.raises(MacftError, match="has no best_adapter/: the run finished"):
        run.adapter(best=True)
    shutil.copytree(tmp_path / "adapter-src", path / BEST_ADAPTER)
    assert run.adapter(best=True) == run.best_adapter_dir


def test_base_model_falls_back_to_the_name_given_to_training(tmp_path):
    run = open_run(_fake_run(tmp_path))
    gone = Run(run.path, run.config, Resolved(model_path=str(tmp_path / "deleted")))
    assert gone.base_model == run.config.model.name
    run.config.model.name = None
    assert Run(run.path, run.config, gone.resolved).base_model is None


def test_open_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(MacftError, match="does not exist"):
        open_run(tmp_path / "nope")
    with pytest.raises(MacftError, match="is not a macft run directory: config.yaml is missing"):
        open_run(tmp_path)


def test_quantization_record(tmp_path):
    rec = {"method": "bnb-nf4", "double_quant": True, "blocksize": 64, "unquantized": ["lm_head"]}
    path = _fake_run(tmp_path, base_quantization=rec)
    assert open_run(path).quantization == rec
    write_quantization(path, {**rec, "blocksize": 128})
    assert read_quantization(path)["blocksize"] == 128
    assert not list(path.glob(".*.tmp"))
    (path / rundir_names.QUANTIZATION).write_text("{half")
    with pytest.raises(MacftError, match="is not valid JSON"):
        open_run(path).quantization  # noqa: B018


@pytest.mark.slow
def test_open_run_on_a_trained_run(mlx_run, tiny_gemma):
    run = open_run(mlx_run)
    assert run.backend == "mlx" and run.resolved.backend == "mlx"
    assert run.base_model == str(tiny_gemma)
    assert run.resolved.end_tokens[0] == "<end_of_turn>" and run.resolved.total_steps == 150
    assert run.resolved.base_fingerprint and run.resolved.macft_version
    assert run.adapter() == mlx_run / ADAPTER and run.adapter(best=True) == mlx_run / BEST_ADAPTER
    assert run.mlx_adapter_dir.is_dir()
    assert [c.name for c in run.checkpoints] == ["step-000100", "step-000150"]
    assert run.latest_checkpoint == run.checkpoints[-1]
    assert run.summary()["steps"] == 150
    rows = run.metrics()
    assert {r["type"] for r in rows} == {"train", "eval"} and max(r["step"] for r in rows) == 150
    assert run.quantization is None
    assert run.check_base(tiny_gemma) is not None  # the same base: compared, accepted


# --------------------------------------------------------------------------- the lock


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from macft.training.rundir import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_trainer_is_refused_with_the_holder_s_pid(tmp_path):
    from macft.training.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MacftError) as e:
            RunLock(tmp_path).acquire()
        assert f"is being trained by process {holder.pid}" in e.value.message
        assert f"kill {holder.pid}" in e.value.hint
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the process
    with RunLock(tmp_path) as lock:
        assert lock.pid_path.read_text().strip() == str(os.getpid())
    assert not lock.pid_path.exists()
