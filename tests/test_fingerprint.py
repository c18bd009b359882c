"""An adapter used on another base than the one it was trained on: same shapes, other weights.
Nothing else fails in that case (the merge "works", the model answers nonsense), so the
fingerprint ``macft train`` records is compared by export, chat, generate and eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.fixtures import random_adapter, write_run_dir
from macft.errors import MacftError
from macft.fingerprint import base_fingerprint, check_base, compare

NYA = Path(__file__).resolve().parents[1] / "examples" / "data" / "nya_chat"


def _rewrite_weights(src: Path, dst: Path, how) -> Path:
    """A copy of ``src`` whose tensors are ``how(name, torch tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    save_file({k: how(k, v).contiguous() for k, v in w.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def other_init(tiny_gemma, tmp_path_factory) -> Path:
    """Another random init of the same architecture: every shape and dtype equal."""
    import torch

    g = torch.Generator().manual_seed(1)
    return _rewrite_weights(tiny_gemma, tmp_path_factory.mktemp("other") / "other",
                            lambda _k, v: torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) * 0.2)


@pytest.fixture(scope="module")
def bf16_copy(tiny_gemma, tmp_path_factory) -> Path:
    """The same weights stored in bf16 (as torch_dtype conversions publish them)."""
    import torch

    d = _rewrite_weights(tiny_gemma, tmp_path_factory.mktemp("bf16") / "bf16", lambda _k, v: v.to(torch.bfloat16))
    cfg = json.loads((d / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def test_fingerprint_ignores_the_dtype_and_catches_other_weights(tiny_gemma, other_init, bf16_copy, tmp_path):
    fp = base_fingerprint(tiny_gemma)
    assert len(fp["tensors"]) == 6 and fp["config"]
    same = compare(fp, bf16_copy)
    assert same.same and not same.config_differs and same.compared == 6
    other = compare(fp, other_init)
    assert not other.same and len(other.differing) == 6
    assert "6 of 6 sampled tensors hold different values" in other.describe()
    edited = tmp_path / "edited"
    shutil.copytree(tiny_gemma, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["sliding_window"] = 7
    (edited / "config.json").write_text(json.dumps(cfg))
    c = compare(fp, edited)
    assert c.same and c.config_differs
    assert compare(None, tiny_gemma) is None and compare({}, tiny_gemma) is None


def test_check_base_refuses_warns_or_stays_silent(tiny_gemma, other_init, bf16_copy, tmp_path, capsys):
    resolved = {"model_path": str(tiny_gemma), "base_fingerprint": base_fingerprint(tiny_gemma)}
    with pytest.raises(MacftError) as e:
        check_base(resolved, "runs/x", other_init, other_base_hint=" with --model BASE")
    assert str(other_init) in e.value.message and str(tiny_gemma) in e.value.message
    assert "sampled tensors hold different values" in e.value.message
    assert "--force" in e.value.hint and "--model BASE" in e.value.hint
    capsys.readouterr()
    assert check_base(resolved, "runs/x", other_init, force=True) is not None
    assert "Going ahead (--force)" in capsys.readouterr().err
    assert check_base(resolved, "runs/x", bf16_copy).same
    assert capsys.readouterr().err == ""
    edited = tmp_path / "edited"
    shutil.copytree(tiny_gemma, edited)
    (edited / "config.json").write_text((edited / "config.json").read_text().replace('"rms_norm_eps": 1e-06',
                                                                                      '"rms_norm_eps": 1e-05'))
    check_base(resolved, "runs/x", edited)
    assert "config.json differs" in capsys.readouterr().err
    assert check_base({"model_path": str(tiny_gemma)}, "runs/x", other_init) is None  # an older run


@pytest.fixture
def replaced_base_run(tiny_gemma, other_init, tmp_path) -> tuple[Path, Path]:
    """A run trained (fingerprint recorded) on ``base``, whose weights were then replaced by
    another random init of the same shapes."""
    base = tmp_path / "base"
    shutil.copytree(tiny_gemma, base)
    adapter = random_adapter(base, tmp_path / "adapter-src", rank=2)
    run = write_run_dir(tmp_path / "run", base, adapter, NYA, fingerprint=True)
    shutil.copy2(other_init / "model.safetensors", base / "model.safetensors")
    return run, base


def test_generate_and_eval_refuse_a_replaced_base(replaced_base_run, run_cli):
    run, base = replaced_base_run
    for argv in (["generate", "--run", run, "--prompt", "hi", "--backend", "cuda"],
                 ["eval", "--run", run, "--backend", "cuda"],
                 ["chat", "--run", run, "--backend", "cuda"]):
        rc, out, err = run_cli(*argv)
        assert rc == 2, (argv, err)
        assert "does not match this base model" in err and f"{base} (the directory it was trained on) has changed" in err
        assert "--force" in err and "Traceback" not in err
        assert out == ""


def test_generate_with_force_goes_ahead(replaced_base_run, run_cli):
    pytest.importorskip("peft")
    run, _ = replaced_base_run
    rc, out, err = run_cli("generate", "--run", run, "--prompt", "hi", "--backend", "cuda", "--force",
                           "--max-new-tokens", "4")
    assert rc == 0, err
    assert "Going ahead (--force)" in err


@pytest.mark.slow
def test_export_refuses_a_replaced_base_and_accepts_another_dtype(replaced_base_run, bf16_copy, run_cli,
                                                                  llama_tools):
    run, base = replaced_base_run
    rc, _, err = run_cli("export", "--run", run, "--quant", "f16", "--no-verify")
    assert rc == 2 and "does not match this base model" in err and str(base) in err
    assert "--force" in err and "--model BASE" in err and "Traceback" not in err
    assert not (run / "export").exists()
    rc, _, err = run_cli("export", "--run", run, "--quant", "f16", "--no-verify", "--force")
    assert rc == 0, err
    assert "Going ahead (--force)" in err
    # the base the run trained on, stored in bf16 now: the same weights, accepted without a word
    shutil.rmtree(run / "export")
    shutil.rmtree(base)
    shutil.copytree(bf16_copy, base)
    rc, _, err = run_cli("export", "--run", run, "--quant", "f16", "--no-verify")
    assert rc == 0, err
    assert "does not match" not in err and "--force" not in err and "config.json differs" not in err
