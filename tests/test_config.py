from __future__ import annotations

import pytest

from macft.config import (
    RunConfig,
    build_config,
    dump_yaml,
    field_specs,
    validate,
)
from macft.errors import ConfigError
from macft.run import read_config


def test_every_field_has_help_and_a_flag():
    specs = field_specs()
    assert specs, "no config fields"
    for s in specs:
        assert s.help and len(s.help) > 10, s.key
        assert s.flag.startswith("--"), s.key
    flags = [s.flag for s in specs]
    assert len(flags) == len(set(flags)), "two fields share a CLI flag"
    # spellings that scripts rely on
    for f in ("--model", "--backend", "--data", "--valid", "--output", "--iters", "--epochs",
              "--batch-size", "--grad-accum", "--learning-rate", "--lora-rank", "--lora-alpha",
              "--max-seq-len", "--quantize", "--seed"):
        assert f in flags, f


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  name: m1\nlora:\n  rank: 8\n  alpha: 16\ntrain:\n  learning_rate: 1.0e-4\n"
                 "  batch_size: 2\n")
    cfg = build_config(y, {"lora.rank": "32", "train.batch_size": "6"})
    assert cfg.model.name == "m1"
    assert cfg.lora.rank == 32  # CLI
    assert cfg.lora.alpha == 16.0  # YAML
    assert cfg.train.learning_rate == 1e-4  # YAML
    assert cfg.train.batch_size == 6  # CLI
    assert cfg.train.grad_accum == RunConfig().train.grad_accum  # default


def test_yaml_scientific_without_dot_is_a_number(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  learning_rate: 2e-4\n")  # YAML 1.1 reads this as a string
    assert build_config(y).train.learning_rate == 2e-4


def test_all_problems_reported_at_once_with_suggestions(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora:\n  rnak: 8\ntrain:\n  batch_size: four\n  learning_rat: 0.1\n"
                 "learning_rate: 1\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError) as e:
        build_config(y, {"lora.dropout": "lots"})
    msg = str(e.value)
    assert "6 configuration problems" in msg
    assert "lora.rnak" in msg and "did you mean 'rank'" in msg
    assert "train.batch_size: expected an integer, got 'four'" in msg
    assert "did you mean 'learning_rate'" in msg
    assert "'learning_rate' is not a section; put it under 'train:'" in msg
    assert "unknown section 'modle'" in msg and "did you mean 'model'" in msg
    assert str(y) in msg


def test_cli_wrong_type_and_choice():
    with pytest.raises(ConfigError) as e:
        build_config(None, {"train.iters": "ten", "model.quantize": "3bit", "data.packing": "maybe"})
    msg = str(e.value)
    assert "--iters: expected an integer, got 'ten'" in msg
    assert "--quantize: expected one of 'none', '4bit', '8bit'" in msg
    assert "--packing" in msg


def test_validate_collects_range_problems():
    cfg = build_config(None, {"lora.rank": "0", "train.learning_rate": "3", "data.valid_fraction": "0.9",
                              "export.quant": "q4_k_m,q3_xx"})
    with pytest.raises(ConfigError) as e:
        validate(cfg, require=("model.name", "data.train"))
    msg = str(e.value)
    for part in ("model.name is required (flag --model)", "data.train is required (flag --data)",
                 "lora.rank must be at least 1", "train.learning_rate", "data.valid_fraction",
                 "unknown type(s) q3_xx"):
        assert part in msg, part


def test_resolved_config_round_trip(tmp_path):
    cfg = build_config(None, {"model.name": "google/gemma-3-1b-it", "lora.targets": "q_proj,v_proj",
                              "train.epochs": "2"})
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg, {"backend": "mlx", "end_tokens": ["<end_of_turn>"]}))
    back, resolved = read_config(tmp_path)
    assert back == cfg
    assert resolved["backend"] == "mlx"
    assert back.lora.targets == ["q_proj", "v_proj"]


def _readme_block(name: str) -> str:
    """The generated block between <!-- NAME:start --> and <!-- NAME:end --> in the README."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return readme[readme.index(start) + len(start):readme.index(end)].strip()


def test_readme_config_reference_is_current():
    from macft.config import reference_markdown

    assert _readme_block("config-reference") == reference_markdown(), (
        "README's config reference is stale; regenerate it with "
        "`python -c 'from macft.config import reference_markdown; print(reference_markdown())'`")


def test_readme_models_table_is_current():
    """The README's Models table is the conformance table (macft/support.py) the suite proves."""
    from macft.support import models_markdown

    assert _readme_block("models-table") == models_markdown(), (
        "README's Models table is stale; regenerate it with "
        "`python -c 'from macft.support import models_markdown; print(models_markdown())'`")


@pytest.mark.parametrize("flag_key,raw", [("lora.alpha", "nan"), ("lora.alpha", "inf"),
                                          ("train.learning_rate", "-inf"), ("lora.dropout", "NaN"),
                                          ("train.weight_decay", "infinity")])
def test_non_finite_numbers_from_the_command_line(flag_key, raw):
    with pytest.raises(ConfigError) as e:
        build_config(None, {flag_key: raw, "train.iters": "ten"})
    msg = str(e.value)
    flag = {s.key: s.flag for s in field_specs()}[flag_key]
    assert f"{flag}: expected a finite number, got '{raw}'" in msg
    assert "2 configuration problems" in msg  # listed with the others


def test_non_finite_numbers_from_yaml_and_code(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora:\n  alpha: .nan\ntrain:\n  max_grad_norm: .inf\n")
    with pytest.raises(ConfigError) as e:
        build_config(y)
    msg = str(e.value)
    assert "lora.alpha: expected a finite number" in msg and "train.max_grad_norm: expected a finite number" in msg
    cfg = RunConfig()
    cfg.lora.alpha = float("nan")
    cfg.train.learning_rate = float("inf")
    cfg.data.valid_fraction = float("nan")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "3 configuration problems" in msg  # once each: no second range complaint about the same value
    for part in ("lora.alpha must be a finite number, got nan (flag --lora-alpha)",
                 "train.learning_rate must be a finite number, got inf",
                 "data.valid_fraction must be a finite number"):
        assert part in msg, part


def test_encoding_field():
    cfg = build_config(None, {"data.encoding": "cp932"})
    assert cfg.data.encoding == "cp932"
    validate(cfg)
    assert RunConfig().data.encoding == "auto"
    assert {s.key: s.flag for s in field_specs()}["data.encoding"] == "--encoding"
    with pytest.raises(ConfigError, match="data.encoding: unknown encoding 'sjis2'"):
        validate(build_config(None, {"data.encoding": "sjis2"}))
