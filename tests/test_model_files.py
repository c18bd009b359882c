"""The base model's files as users have them: PyTorch pickles instead of safetensors, an
interrupted download, a damaged config.json. Every command resolves the base through
``macft.models.resolve_model_path``: pickles are converted once (no code from them runs),
damaged files are named at start with the fix, and nothing else is raised."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from macft.errors import MacftError
from macft.model_info import read_model_info
from macft.models import check_weights, resolve_model_path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Converted copies go to a fresh cache (the llama.cpp build stays where it is)."""
    import macft.models

    root = tmp_path / "cache"
    monkeypatch.setattr(macft.models, "cache_root", lambda: root)
    return root


def _side_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy2(p, dst / p.name)
    return dst


def _state_dict(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()


@pytest.fixture(scope="module")
def bin_gemma(tiny_gemma, tmp_path_factory) -> Path:
    """The tiny Gemma as older checkpoints ship: one pytorch_model.bin (torch.save of the state
    dict, so lm_head.weight shares the embedding's storage)."""
    import torch

    d = _side_files(tiny_gemma, tmp_path_factory.mktemp("bin") / "gemma-bin")
    sd = _state_dict(tiny_gemma)
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, d / "pytorch_model.bin")
    return d


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
    return out


def test_pickle_weights_are_converted_once(bin_gemma, tiny_gemma, cache, capsys):
    d = resolve_model_path(str(bin_gemma))
    assert d.parent == cache / "converted" and d != bin_gemma
    assert "converted once to safetensors" in capsys.readouterr().err
    want, got = _tensors(tiny_gemma), _tensors(d)
    assert sorted(got) == sorted(want)  # the tied head left out, as transformers saves it
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (d / name).read_bytes() == (bin_gemma / name).read_bytes()
    assert not list(d.glob("*.bin")) and not list(cache.glob("converted/.*"))  # no temporaries
    assert read_model_info(d).hidden_size == 256
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(bin_gemma)) == d  # reused
    assert "using their safetensors copy" in capsys.readouterr().err
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    # the tokenizer alone needs no conversion
    assert resolve_model_path(str(bin_gemma), tokenizer_only=True) == bin_gemma.resolve()


def test_sharded_bf16_pickles_keep_their_dtype(tiny_gemma, tmp_path, cache):
    import torch

    d = _side_files(tiny_gemma, tmp_path / "sharded")
    sd = {k: v.to(torch.bfloat16) for k, v in _state_dict(tiny_gemma).items() if k != "lm_head.weight"}
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:40], "pytorch_model-00002-of-00002.bin": names[40:]}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, d / fname)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    out = resolve_model_path(str(d))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == names
    from safetensors import safe_open

    with safe_open(str(out / files[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    got = _tensors(out)
    for k in names:
        np.testing.assert_array_equal(got[k], sd[k].float().numpy(), err_msg=k)
    # a shard the index names is missing
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MacftError, match="names 1 shard"):
        resolve_model_path(str(d))


def test_without_torch_the_conversion_command_is_given(bin_gemma, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(MacftError) as e:
        resolve_model_path(str(bin_gemma))
    assert "pytorch_model.bin" in e.value.message and "torch (not installed here)" in e.value.message
    assert e.value.hint.startswith("Convert it once") and "pip install torch && python -c" in e.value.hint
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_a_pickle_that_runs_code_is_refused(tiny_gemma, tmp_path, cache):
    import torch

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = _side_files(tiny_gemma, tmp_path / "evil")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(MacftError, match="weights_only=True") as e:
        resolve_model_path(str(d))
    assert "refused on purpose" in e.value.hint
    assert not marker.exists()
    # a truncated pickle (an interrupted download)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(64, 64)}, good)
    (d / "pytorch_model.bin").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(MacftError, match="cannot be read as PyTorch weights"):
        resolve_model_path(str(d))


@pytest.mark.slow
def test_export_against_a_pickle_base(bin_gemma, tiny_gemma, run_cli, llama_tools, tmp_path, cache):
    from export.fixtures import random_adapter

    adapter = random_adapter(tiny_gemma, tmp_path / "adapter", rank=2)
    out = tmp_path / "out"
    rc, _, err = run_cli("export", "--adapter", adapter, "--model", bin_gemma, "--output", out,
                         "--quant", "f16", "--no-verify")
    assert rc == 0, err
    assert "converted once to safetensors" in err
    report = json.loads((out / "export-report.json").read_text())
    assert Path(report["inputs"]["base_dir"]).parent == cache / "converted"
    assert (out / "model-lora-f16.gguf").is_file() or any(out.glob("*.gguf"))


def test_estimate_reads_a_pickle_model(bin_gemma, run_cli, cache):
    rc, out, err = run_cli("estimate", "--model", bin_gemma, "--backend", "cuda", "--json")
    assert rc == 0, err
    assert json.loads(out)["model"] == str(bin_gemma)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def copy(tiny_gemma, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(tiny_gemma, d)
    return d


def test_truncated_safetensors_is_named_at_start(copy, run_cli):
    f = copy / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(MacftError) as e:
        resolve_model_path(str(copy))
    assert f"{f} is incomplete" in e.value.message
    assert f"describes {size} bytes, the file holds {size - 1000}" in e.value.message
    assert "Copy the model directory" in e.value.hint
    # every command says so before loading anything
    for argv in (["estimate", "--model", copy, "--backend", "cuda"],
                 ["generate", "--model", copy, "--prompt", "hi", "--backend", "cuda"],
                 ["train", "--model", copy, "--data", Path(__file__).parents[1] / "examples/data/nya_chat",
                  "--backend", "cuda", "--output", copy.parent / "run", "--iters", "1"]):
        rc, _, err = run_cli(*argv)
        assert rc == 2 and "is incomplete" in err and "Traceback" not in err, (argv, err)
    assert not (copy.parent / "run").exists()


def test_hub_cache_copy_gets_the_download_command(copy, tmp_path):
    snap = tmp_path / "hub" / "models--google--gemma-3-1b-it" / "snapshots" / ("a" * 40)
    shutil.copytree(copy, snap)
    with open(snap / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(MacftError) as e:
        resolve_model_path(str(snap))
    assert "huggingface-cli download google/gemma-3-1b-it --force-download" in e.value.hint


def test_index_naming_a_missing_shard(copy):
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(MacftError, match="model-00002-of-00002.safetensors") as e:
        resolve_model_path(str(copy))
    assert "names 1 shard(s) that are not in" in e.value.message


@pytest.mark.parametrize("text,match", [
    ('{"model_type": "gemma3_text", "hidden_size": ', "is not valid JSON"),
    ('["gemma3_text"]', "holds a list"),
    ('{"model_type": "gemma3_text", "hidden_size": "wide"}', "config.json"),
    ('{"model_type": "gemma3_text", "num_attention_heads": 0}', "config.json"),
    ('{"model_type": "gemma3_text", "vocab_size": null}', "vocab_size"),
    ('{"model_type": 7}', "config.json"),
])
def test_damaged_config_names_the_file(copy, text, match):
    (copy / "config.json").write_text(text)
    with pytest.raises(MacftError, match=match) as e:
        read_model_info(resolve_model_path(str(copy)))
    assert str(copy / "config.json") in e.value.message


# --------------------------------------------------------------------------- fuzzing


def _fuzz_model(root: Path, config: dict, shards: int) -> Path:
    """A small model directory (config.json + a few small tensors) to mutate quickly."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config, indent=1))
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight"]
    files = ["model.safetensors"] if shards == 1 else [f"model-0000{i + 1}-of-0000{shards}.safetensors"
                                                         for i in range(shards)]
    wm = {}
    for i, f in enumerate(files):
        part = names[i::shards]
        save_file({n: rng.standard_normal((8, 16)).astype(np.float32 if i == 0 else np.float16)
                   for n in part}, str(root / f))
        wm.update({n: f for n in part})
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return root


def _mutate(data: bytes, rng: np.random.Generator, header_end: int) -> bytes:
    kind = rng.integers(4)
    if kind == 0:  # truncation, mostly around the header
        cut = int(rng.integers(0, min(len(data), header_end + 64) if rng.random() < 0.7 else len(data)))
        return data[:cut]
    b = bytearray(data)
    if kind == 1:  # a few random bytes anywhere in the header (or the length field)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, header_end))] = int(rng.integers(0, 256))
    elif kind == 2:  # bytes of the data
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(header_end, len(b)))] = int(rng.integers(0, 256))
    else:  # bytes appended or removed in the middle
        at = int(rng.integers(0, len(b)))
        if rng.random() < 0.5:
            b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 16))).astype(np.uint8))
        else:
            del b[at:at + int(rng.integers(1, 16))]
    return bytes(b)


DIMENSION_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings", "model_type"]
BAD_VALUES = ["64", "wide", None, -4, 0, 2.5, [], {}, [64], True, 10 ** 30, {"a": 1}]


def _mutate_config(text: str, rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:
        return text[:int(rng.integers(0, len(text)))]
    if kind == 1:
        b = bytearray(text.encode())
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(32, 127))
        return b.decode("utf-8", errors="replace")
    cfg = json.loads(text)
    for _ in range(int(rng.integers(1, 3))):
        keys = DIMENSION_KEYS if rng.random() < 0.6 else sorted(cfg)
        key = keys[int(rng.integers(len(keys)))]
        cfg[key] = BAD_VALUES[int(rng.integers(len(BAD_VALUES)))]
    return json.dumps(cfg)


def test_fuzz_damaged_model_files_end_in_our_error(tiny_gemma, tmp_path):
    """Hundreds of random truncations and byte changes of the weights and config.json: every one
    is read cleanly or ends in a MacftError, never another exception."""
    from macft.sizing import shape_from_config

    config = json.loads((tiny_gemma / "config.json").read_text())
    rng = np.random.default_rng(12)
    outcomes = {"ok": 0, "refused": 0}
    unexpected = []
    for shards in (1, 2):
        pristine = _fuzz_model(tmp_path / f"pristine-{shards}", config, shards)
        weights = sorted(pristine.glob("*.safetensors"))
        for i in range(250):
            d = tmp_path / f"case-{shards}-{i}"
            shutil.copytree(pristine, d)
            target = ("config.json" if rng.random() < 0.4 else weights[int(rng.integers(len(weights)))].name)
            p = d / target
            if target == "config.json":
                p.write_text(_mutate_config(p.read_text(), rng))
            else:
                data = p.read_bytes()
                p.write_bytes(_mutate(data, rng, 8 + int.from_bytes(data[:8], "little")))
            try:
                path = resolve_model_path(str(d))
                check_weights(path)
                shape_from_config(read_model_info(path), path)
                outcomes["ok"] += 1
            except MacftError as e:
                assert e.message and e.hint is not None, (target, e.message)
                outcomes["refused"] += 1
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                unexpected.append(f"{target} case {i}: {type(e).__name__}: {e}")
            shutil.rmtree(d)
    print(outcomes)
    assert not unexpected, "\n".join(unexpected[:10])
    assert outcomes["refused"] > 200 and outcomes["ok"] > 20, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_training_on_a_pickle_base(backend, bin_gemma, run_cli, tmp_path, cache):
    """Both backends train on the converted copy, and the run records it as its base."""
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    out = tmp_path / "run"
    nya = Path(__file__).resolve().parents[1] / "examples" / "data" / "nya_chat"
    rc, _, err = run_cli("train", "--model", bin_gemma, "--data", nya, "--output", out, "--backend", backend,
                         "--iters", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "0")
    assert rc == 0, err
    assert "safetensors" in err and "pytorch_model" not in (out / "adapter" / "adapter_config.json").read_text()
    from macft.run import read_config

    _, resolved = read_config(out)
    assert Path(resolved["model_path"]).parent == cache / "converted"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
