"""`macft doctor` tells the truth about this machine, in tables and in JSON."""

from __future__ import annotations

import json

import pytest


def _checks(out: str) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(out)["checks"]}


def test_doctor_reports_this_machine_truthfully(run_cli):
    import importlib.metadata

    import torch

    rc, out, err = run_cli("doctor", "--json")
    rep = json.loads(out)
    checks = _checks(out)
    assert rc == (0 if rep["ok"] else 1)
    assert torch.__version__ in checks["torch"]["found"]
    if torch.version.cuda is None:
        assert "CPU-only build" in checks["torch"]["found"]
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in checks["gpu"]["found"]
    mlx_v = importlib.metadata.version("mlx")
    assert mlx_v in checks["mlx"]["found"]
    from export.llama_cpp import find_pinned_build

    built = find_pinned_build()
    assert (checks["llama.cpp"]["status"] == "ok") == (built is not None)
    if built is not None:
        assert str(built.bin_dir) in checks["llama.cpp"]["found"]
    for name in ("sentencepiece", "protobuf", "tokenizers", "bitsandbytes", "transformers"):
        assert checks[name]["status"] == "ok", name
    assert checks["backend auto"]["status"] in ("ok", "warn")
    # the human view shows the same checks
    rc2, _, err2 = run_cli("doctor")
    assert rc2 == rc
    for name in checks:
        assert name in err2


def test_cpu_torch_with_nvidia_gpu_is_the_classic_mistake(run_cli, monkeypatch):
    from cuda_backend import hardware

    fake = hardware.HardwareFacts(torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False,
                                  nvidia_driver="/proc/driver/nvidia", bitsandbytes=True, machine="x86_64")
    monkeypatch.setattr(hardware, "probe", lambda: fake)
    rc, out, _ = run_cli("doctor", "--json", "--backend", "cuda")
    checks = _checks(out)
    assert checks["torch"]["status"] == "fail"
    assert "NVIDIA" in checks["torch"]["found"]
    assert "--index-url https://download.pytorch.org/whl/cu" in checks["torch"]["fix"]
    assert rc == 1 and checks["backend cuda"]["status"] == "fail"


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_exit_code_follows_the_chosen_backend(run_cli, backend):
    rc, out, _ = run_cli("doctor", "--json", "--backend", backend)
    checks = _checks(out)
    assert (rc == 0) == (checks[f"backend {backend}"]["status"] != "fail")
