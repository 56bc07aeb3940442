"""The YAML schema: unknown keys, bad values, overrides, the resolved config, the shipped example configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.train.config import (
    CONFIG_FILENAME,
    ConfigError,
    apply_overrides,
    build_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": "m", "data": {"path": "d.jsonl"}}


def build(**sections):
    return build_config({**BASE, **sections})


def test_defaults_and_shorthands():
    cfg = build(quantization="nf4")
    assert cfg.model.name_or_path == "m"
    assert cfg.quantization.method == "nf4"
    assert cfg.training.lr_scheduler_type == "linear" and cfg.training.optim == "adamw_torch"
    assert cfg.lora_config().task_type in ("CAUSAL_LM", cfg.lora_config().task_type.CAUSAL_LM)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"training": {"learnig_rate": 1e-4}}, "unknown key 'training.learnig_rate'; did you mean 'learning_rate'"),
    ({"trainng": {}}, "unknown section 'trainng'; did you mean 'training'"),
    ({"lora": {"lora_alhpa": 8}}, "unknown key 'lora.lora_alhpa'; did you mean 'lora_alpha'"),
    ({"data": {"path": "x", "val_set_sise": 0.1}}, "did you mean 'val_set_size'"),
    ({"model": {"name_or_path": "m", "torch_dtyp": "bfloat16"}}, "did you mean 'torch_dtype'"),
])
def test_unknown_key_names_the_closest(raw, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        build_config({**BASE, **raw})


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("training", {"lr_scheduler_type": "cosin"}, "training.lr_scheduler_type: 'cosin' is not allowed; "
                                                 "allowed: cosine, linear, constant"),
    ("training", {"optim": "adam"}, "allowed: adamw_torch, adamw_torch_fused, adamw_8bit"),
    ("quantization", {"method": "nf3"}, "quantization.method: 'nf3' is not allowed; allowed: none, nf4"),
    ("training", {"per_device_train_batch_size": "four"}, "per_device_train_batch_size: 'four' has the wrong "
                                                          "type; expected int"),
    ("training", {"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
    ("training", {"bf16": "yes"}, "training.bf16: 'yes' has the wrong type; expected bool"),
    ("training", {"warmup_ratio": 1.5}, "warmup_ratio must be in"),
    ("lora", {"r": "eight"}, "lora.r: 'eight' has the wrong type; expected int"),
    ("lora", {"target_modules": 3}, "lora.target_modules"),
])
def test_bad_value_names_key_and_allowed(section, values, expected):
    raw = {**BASE, section: values}
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert expected in str(info.value)


def test_lora_values_checked_by_lora_config_when_loading():
    """Bad LoRA values fail when the config is built, before any model or data is loaded."""
    with pytest.raises(ConfigError, match="bias='everything'"):
        build(lora={"bias": "everything"})


def test_overrides():
    assert parse_override("training.learning_rate=3e-4") == (["training", "learning_rate"], "3e-4")
    raw = apply_overrides(BASE, ["training.learning_rate=3e-4", "lora.target_modules=[q_proj, v_proj]",
                                 "model.torch_dtype=bfloat16", "quantization.method=nf4"])
    cfg = build_config(raw)
    assert cfg.training.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.lora["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.model.name_or_path == "m" and cfg.model.torch_dtype == "bfloat16"
    assert BASE == {"model": "m", "data": {"path": "d.jsonl"}}  # not modified
    assert build_config(apply_overrides(BASE, ["quantization=nf4"])).quantization.method == "nf4"
    raw = apply_overrides({**BASE, "quantization": {"method": "nf4", "bnb_4bit_use_double_quant": True}},
                          ["quantization=fp4"])
    assert raw["quantization"] == {"method": "fp4", "bnb_4bit_use_double_quant": True}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("learning_rate")


def test_resolved_config_round_trip(tmp_path):
    cfg = build(training={"output_dir": str(tmp_path), "max_steps": 7}, lora={"r": 4})
    path = cfg.save(tmp_path)
    assert path.name == CONFIG_FILENAME
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(path.read_text())["training"]["max_steps"] == 7


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_configs_validate(path):
    cfg = load_config(path)
    cfg.lora_config()
    assert Path(cfg.model.name_or_path).exists() or "/" in cfg.model.name_or_path


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("training", {"weight_decay": -1}, "training.weight_decay must be >= 0, got -1"),
    ("training", {"max_grad_norm": -1}, "training.max_grad_norm must be >= 0, got -1.0 \\(0 disables clipping\\)"),
    ("training", {"warmup_steps": -5}, "training.warmup_steps must be >= 0, got -5"),
    ("training", {"learning_rate": float("nan")}, "training.learning_rate must be a finite number, got nan"),
    ("training", {"learning_rate": "inf"}, "training.learning_rate must be a finite number"),
    ("training", {"adam_beta1": 1.5}, "training.adam_beta1 must be in \\[0, 1\\), got 1.5"),
    ("training", {"adam_epsilon": -1}, "training.adam_epsilon must be > 0"),
    ("training", {"num_train_epochs": -1}, "training.num_train_epochs must be >= 0"),
    ("training", {"seed": -1}, "training.seed must be >= 0"),
    ("evaluation", {"batch_size": 0}, "evaluation.batch_size must be >= 1, got 0"),
    ("evaluation", {"max_examples": -1}, "evaluation.max_examples must be >= 1, got -1"),
    ("evaluation", {"max_new_tokens": 0}, "evaluation.max_new_tokens must be >= 1"),
    ("evaluation", {"prompt_field": "a", "answer_field": "a"}, "name two different columns"),
    ("quantization", {"method": "nf4", "bnb_4bit_quant_storage": "banana"},
     "quantization.bnb_4bit_quant_storage: 'banana' is not allowed; allowed: uint8, int8"),
])
def test_range_checks_name_field_value_and_range(section, values, expected):
    with pytest.raises(ConfigError, match=expected):
        build(**{section: values})


def test_yaml_syntax_errors_name_the_file_or_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\n data: [x\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML: .* at line"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="override 'lora.target_modules=\\[q_proj': the value is not valid YAML"):
        load_config(good, ["lora.target_modules=[q_proj"])


def test_override_into_an_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "evaluation:\ntraining:\n")
    cfg = load_config(path, ["evaluation.max_examples=5", "training.max_steps=2"])
    assert cfg.evaluation.max_examples == 5 and cfg.training.max_steps == 2
