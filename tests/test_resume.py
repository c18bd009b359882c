"""Stopping and starting a run, whatever stops it: Ctrl-C, SIGKILL, a full disk, a second
process, a checkpoint from someone else.

- an interrupted (Ctrl-C mid-step) and resumed run writes the same metrics.jsonl rows as an
  uninterrupted one, on both backends (dropout on, grad_accum 2, reports every 5 steps)
- a pickled torch_state.pt is never unpickled: its payload does not run
- a run killed before its first checkpoint starts again with --resume; temporaries left by a
  killed process are removed; a second process on the same run is refused, naming the PID
- a full disk while writing a checkpoint: one message, nothing half-written left, the run resumes
- a bad --output, too many --lora-layers: our errors before any weight is loaded

The tests that train the tiny Gemma-3 (a few steps each) are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import smallfs

REPO = Path(__file__).resolve().parents[1]
# fields that measure the machine, not the training
TIMING = {"tokens_per_sec", "peak_memory_gb", "elapsed_sec", "seconds"}
RESUME_ARGS = ["--iters", "12", "--grad-accum", "2", "--batch-size", "2", "--log-every", "5",
               "--eval-every", "4", "--save-every", "0", "--lora-dropout", "0.1",
               "--learning-rate", "3e-3", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """(as in test_torch_train: OpenBLAS preloaded for MLX plus torch's threads oversubscribe)"""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _adapter(run: Path) -> dict:
    from macft.adapter import read_peft_adapter

    return read_peft_adapter(run / "adapter")[0]


@pytest.fixture
def ctrl_c_mid_step(monkeypatch):
    """``at[0] = k``: the next run gets a KeyboardInterrupt after the first micro-batch of
    step k (its gradients then exist and must be discarded; the data position, dropout
    counter and report window must be those of step k-1)."""
    from macft.training import rundir

    at: list[int | None] = [None]

    def on_micro(self, step: int, micro: int) -> None:
        if at[0] == step and micro == 0:
            at[0] = None
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir.MetricsWriter, "on_micro", on_micro, raising=False)
    return at


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_interrupted_and_resumed_run_writes_the_same_metrics(backend, tiny_gemma, nya_dir, tmp_path,
                                                             run_cli, ctrl_c_mid_step):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    common = ["--backend", backend, "--model", tiny_gemma, "--data", nya_dir, *RESUME_ARGS]
    full, part = tmp_path / "full", tmp_path / "part"
    rc, _, err = run_cli("train", *common, "--output", full)
    assert rc == 0, err

    ctrl_c_mid_step[0] = 7
    rc, _, err = run_cli("train", *common, "--output", part)
    assert rc == 130, err
    assert [c.name for c in sorted((part / "checkpoints").glob("step-*"))] == ["step-000006"]
    state = json.loads((part / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["window_tokens"] > 0  # step 6 is in the report of step 10
    rc, _, err = run_cli("train", "--resume", part)
    assert rc == 0, err

    a, b = _rows(full), _rows(part)
    assert [(r["type"], r["step"]) for r in a] == [
        ("eval", 0), ("eval", 4), ("train", 5), ("eval", 8), ("train", 10), ("train", 12), ("eval", 12)]
    for x, y in zip(a, b, strict=True):
        assert x == y, (x, y)  # exactly: same backend, same seed, same data order
    wa, wb = _adapter(full), _adapter(part)
    assert all(np.array_equal(wa[k][i], wb[k][i]) for k in wa for i in (0, 1))
    print(f"{backend}: {len(a)} metrics rows ({sum(len(r) for r in a)} fields) and "
          f"{2 * len(wa)} adapter matrices identical after Ctrl-C at step 7 and resume")


# --------------------------------------------------------------------------- a short torch run to copy


@pytest.fixture(scope="module")
def torch_run(tiny_gemma, nya_dir, tmp_path_factory) -> Path:
    """A finished 4-step run (cuda backend on the CPU): checkpoints at steps 2 and 4."""
    from macft.cli import main

    out = tmp_path_factory.mktemp("resume") / "run"
    rc = main(["train", "--backend", "cuda", "--model", str(tiny_gemma), "--data", str(nya_dir),
               "--output", str(out), "--iters", "4", "--save-every", "2", "--eval-every", "2",
               "--log-every", "1", "--batch-size", "2", "--seed", "0"])
    assert rc == 0
    return out


def _copy(run: Path, dest: Path, keep_step: int | None) -> Path:
    """A copy of ``run`` as if it had stopped after the checkpoint ``keep_step`` (None: before
    any checkpoint)."""
    shutil.copytree(run, dest)
    for c in (dest / "checkpoints").glob("step-*"):
        if keep_step is None or int(c.name.split("-")[1]) > keep_step:
            shutil.rmtree(c)
    for f in ("adapter", "summary.json", "loss.png"):
        p = dest / f
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dest


@pytest.mark.slow
def test_base_fingerprint_is_recorded(torch_run, tiny_gemma):
    from macft.fingerprint import base_fingerprint
    from macft.run import read_config

    _, resolved = read_config(torch_run)
    assert resolved["base_fingerprint"] == base_fingerprint(tiny_gemma)
    assert len(resolved["base_fingerprint"]["tensors"]) >= 3


@pytest.mark.slow
def test_resume_on_other_base_weights_is_refused(torch_run, tmp_path, run_cli):
    import yaml

    run = _copy(torch_run, tmp_path / "moved", keep_step=2)
    data = yaml.safe_load((run / "config.yaml").read_text())
    tensors = data["resolved"]["base_fingerprint"]["tensors"]
    name = sorted(tensors)[0]
    tensors[name] = "0" * len(tensors[name])  # as if the hub model had been updated since
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rc, _, err = run_cli("train", "--resume", run)
    assert rc == 2
    flat = " ".join(err.split())
    assert "is not the one" in flat and name in flat and "--force" in flat
    assert not (run / "checkpoints" / "step-000004").exists()


@pytest.mark.slow
def test_pickled_torch_state_is_refused_without_unpickling(torch_run, tmp_path, run_cli):
    torch = pytest.importorskip("torch")
    run = _copy(torch_run, tmp_path / "theirs", keep_step=2)
    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "torch_state.json").is_file()  # what macft writes now: no pickle
    for f in ("torch_state.json", "torch_state.safetensors"):
        (ckpt / f).unlink()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"optimizer": Payload(), "steps_done": 2}, ckpt / "torch_state.pt")
    # (the payload works: a plain unpickle would run it)
    rc, out, err = run_cli("train", "--resume", run)
    assert rc == 2, err
    assert not marker.exists()
    flat = " ".join(err.split())
    assert "torch_state.pt" in flat and "pickle" in flat and "can run any code" in flat
    assert f"--config {run / 'config.yaml'}" in flat  # what to do instead
    # the engine refuses it too (load_state is reached only through this check)
    from cuda_backend.engine import check_checkpoint
    from macft.errors import MacftError

    with pytest.raises(MacftError, match="pickle"):
        check_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_starts_again(torch_run, tiny_gemma, nya_dir, tmp_path,
                                                             run_cli):
    run = _copy(torch_run, tmp_path / "killed", keep_step=None)
    partial = run / "checkpoints" / ".step-000002.tmp"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # SIGKILL mid-write
    rows_before = _rows(run)
    assert rows_before  # metrics of the steps before the kill

    # a new run into it: says what works
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--output", run, "--iters", "4")
    assert rc == 2
    flat = " ".join(err.split())
    assert "stopped before its first checkpoint" in flat and f"macft train --resume {run}" in flat

    rc, _, err = run_cli("train", "--resume", run)
    assert rc == 0, err
    assert "training it again from step 0" in " ".join(err.split())
    assert not partial.exists()
    # from step 0 with the saved settings and seed: the rows of the original run, once each
    assert _rows(run) == _rows(torch_run)


@pytest.mark.slow
def test_temporaries_removed_and_second_process_refused(torch_run, tmp_path, run_cli):
    run = _copy(torch_run, tmp_path / "stale", keep_step=2)
    stale = [run / "checkpoints" / ".step-000003.tmp", run / "adapter.tmp", run / "best_adapter.tmp"]
    for d in stale:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (run / ".config.yaml.tmp").write_text("half")

    # another process holds the run: refused, with its PID, and nothing touched
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from pathlib import Path
            from macft.training.rundir import RunLock
            RunLock(Path(sys.argv[1])).acquire()
            print("locked", flush=True)
            time.sleep(120)
        """), str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run_cli("train", "--resume", run)
        assert rc == 2
        flat = " ".join(err.split())
        assert f"being trained by process {holder.pid}" in flat, flat
        assert all(d.exists() for d in stale)
    finally:
        holder.kill()
        holder.wait()
    # the kernel released its lock with it (SIGKILL): the next resume runs and cleans up
    rc, _, err = run_cli("train", "--resume", run, "--iters", "6")
    assert rc == 0, err
    assert "half-written" in err
    assert not any(d.exists() for d in stale) and not (run / ".config.yaml.tmp").exists()
    assert [c.name for c in sorted((run / "checkpoints").glob("*"))] == ["step-000004", "step-000006"]


def test_old_trainer_state_without_report_window_loads(tmp_path):
    from macft.training.loop import Position, read_position

    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"step": 3, "epoch": 0, "index": 6, "trained_tokens": 99, "best_val_loss": None,
         "best_step": None, "train_seconds": 1.5}))
    pos = read_position(tmp_path)
    assert pos == Position(step=3, index=6, trained_tokens=99, train_seconds=1.5)
    assert (pos.window_loss, pos.window_tokens) == (0.0, 0)


# --------------------------------------------------------------------------- full disk


def _du(path: Path) -> int:
    """Bytes a tmpfs charges for ``path``: whole 4 KiB pages per file."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files)


@pytest.mark.slow
@pytest.mark.skipif(not smallfs.available(), reason="needs unprivileged user+mount namespaces (Linux)")
def test_disk_full_while_writing_a_checkpoint(torch_run, tiny_gemma, nya_dir, tmp_path, run_cli):
    ckpt = _du(torch_run / "checkpoints" / "step-000002")
    base = sum(_du(torch_run / f) for f in ("config.yaml", "metrics.jsonl", "best_adapter"))
    # room for the run and its first checkpoint, not for a second one beside it
    size = base + ckpt + ckpt // 2 + 8192
    mount, snap = tmp_path / "disk", tmp_path / "snapshot"
    cmd = [sys.executable, "-m", "macft", "train", "--backend", "cuda", "--model", str(tiny_gemma),
           "--data", str(nya_dir), "--output", str(mount / "run"), "--iters", "8", "--save-every", "2",
           "--eval-every", "0", "--log-every", "1", "--batch-size", "2", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MACFT_QUIET": "1", "OMP_NUM_THREADS": "1",
           "COLUMNS": "400"}
    p = smallfs.run(cmd, mount, f"{size // 1024}k", snap, env=env, cwd=REPO, timeout=600)
    out = " ".join((p.stdout + p.stderr).split())
    assert p.returncode == 2, out[-3000:]
    assert "The disk is full" in out and ".step-000004.tmp" in out and "free there" in out, out[-2000:]
    assert "Traceback" not in out
    run = snap / "run"
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert f"--resume {mount / 'run'}" in out  # the hint names what to run once there is room
    said = out[out.index("The disk"):][:400]

    # resumable afterwards (here from the copy, on a disk with room)
    rc, _, err = run_cli("train", "--resume", run)
    assert rc == 0, err
    assert [r["step"] for r in _rows(run) if r["type"] == "train"] == list(range(1, 9))
    print(f"tmpfs of {size // 1024} KiB (a checkpoint takes {ckpt // 1024} KiB): {said}")


# --------------------------------------------------------------------------- refused before training


def test_output_that_is_a_file(tiny_gemma, nya_dir, tmp_path, run_cli):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--output", f, "--iters", "2")
    assert rc == 2
    assert "is an existing file, not a directory" in " ".join(err.split())
    assert f.read_text() == "mine"


def test_more_lora_layers_than_the_model_has(tiny_gemma, nya_dir, tmp_path, run_cli):
    from macft.model_info import read_model_info

    n = read_model_info(tiny_gemma).num_layers
    rc, _, err = run_cli("train", "--backend", "cuda", "--model", tiny_gemma, "--data", nya_dir,
                         "--output", tmp_path / "run", "--iters", "2", "--lora-layers", str(n + 1))
    assert rc == 2
    flat = " ".join(err.split())
    assert f"--lora-layers {n + 1}" in flat and f"it has {n}" in flat and f"--lora-layers {n} or fewer" in flat
    assert not (tmp_path / "run").exists()


def test_disk_full_is_recognised_in_each_library_s_words(tmp_path, monkeypatch):
    import errno
    import shutil as sh
    from collections import namedtuple

    from macft.errors import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    # safetensors (Rust)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device "
                                     "(os error 28)"), tmp_path)
    # MLX names no cause: full only when the disk nearly is
    mlx_error = RuntimeError("[write] Unable to write 334556 bytes to file.")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    assert is_disk_full(mlx_error, tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    assert not is_disk_full(mlx_error, tmp_path)
    assert not is_disk_full(KeyboardInterrupt(), tmp_path)
