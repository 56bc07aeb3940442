"""LoraConfig and PeftConfig: PEFT's defaults and keys, JSON round trip, forward compatibility, validation errors."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from lorakit import LoraConfig, PeftConfig, TaskType
from lorakit.config import CONFIG_NAME


def test_defaults_equal_peft() -> None:
    ours = LoraConfig().to_dict()
    theirs = peft.LoraConfig().to_dict()
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora", "init_lora_weights",
                "lora_bias", "use_dora", "inference_mode", "rank_pattern", "alpha_pattern", "target_modules",
                "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules", "task_type"):
        assert ours[key] == theirs[key], key


def test_written_keys_equal_peft(tmp_path) -> None:
    LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    peft_keys = set(peft.LoraConfig(target_modules=["q_proj"]).to_dict())
    assert set(data) == peft_keys
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == ["q_proj"]
    # PEFT reads it back
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).target_modules == {"q_proj"}


def test_round_trip(tmp_path) -> None:
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="lora_only",
                     use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 8},
                     layers_to_transform=[0], layers_pattern="layers", task_type=TaskType.SEQ_CLS,
                     modules_to_save=["score"])
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path) == cfg


def test_peft_written_config_loads(tmp_path) -> None:
    peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == 4 and cfg.target_modules == ["c_attn"] and cfg.task_type == TaskType.CAUSAL_LM


def test_unknown_keys_dropped_with_warning() -> None:
    data = LoraConfig(target_modules=["q"]).to_dict() | {"shiny_new_option": 3}
    with pytest.warns(UserWarning, match="shiny_new_option"):
        cfg = LoraConfig.from_dict(data)
    assert cfg.target_modules == ["q"]


def test_unsupported_peft_feature_switched_on_raises() -> None:
    data = LoraConfig().to_dict() | {"layer_replication": [[0, 2]]}
    with pytest.raises(NotImplementedError, match="layer_replication"):
        LoraConfig.from_dict(data)


def test_missing_folder() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraConfig.from_pretrained("/nonexistent/dir/for/sure")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r=0"),
        ({"r": -3}, "r=-3"),
        ({"r": 2.5}, "r=2.5"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"lora_dropout": -0.1}, "lora_dropout=-0.1"),
        ({"bias": "some"}, "bias='some'"),
        ({"target_modules": "q_proj(["}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"task_type": "CAUSAL"}, "task_type='CAUSAL'"),
        ({"init_lora_weights": "uniform"}, "init_lora_weights='uniform'"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias=True is not supported with use_dora=True"),
        ({"init_lora_weights": "pissa_niter_-1"}, "a whole number >= 0"),
        ({"init_lora_weights": "pissa_niter_x"}, "a whole number >= 0"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError) as err:
        LoraConfig(**kwargs)
    assert field in str(err.value)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_4", "olora", "eva", "corda"])
def test_lora_bias_with_a_non_default_init_is_refused_as_peft_does(init) -> None:
    """PEFT refuses the pair, so a folder saved with it would not load there."""
    with pytest.raises(ValueError, match="only supported with init_lora_weights=True or False"):
        peft.LoraConfig(init_lora_weights=init, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias=True is only supported with init_lora_weights=True or False"):
        LoraConfig(init_lora_weights=init, lora_bias=True)
    for default in (True, False):
        assert LoraConfig(init_lora_weights=default, lora_bias=True).lora_bias


def test_rslora_scaling() -> None:
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for(16, 8) == 2.0
    assert LoraConfig(r=16, lora_alpha=8).scaling_for(16, 8) == 0.5


def test_peft_only_fields_as_constructor_kwargs(tmp_path) -> None:
    """PEFT code builds configs from a folder's JSON, or passes PEFT-only fields switched off."""
    peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg = LoraConfig(**data)
    assert cfg.target_modules == ["q_proj"] and cfg.task_type == TaskType.CAUSAL_LM
    assert LoraConfig(r=4, use_qalora=False, trainable_token_indices=None, layer_replication=[]).use_qalora is False
    with pytest.raises(NotImplementedError, match="use_qalora=True"):
        LoraConfig(use_qalora=True)
    with pytest.raises(NotImplementedError, match="trainable_token_indices"):
        LoraConfig.from_dict({**data, "trainable_token_indices": [1, 2]})
    assert set(LoraConfig(**data).to_dict()) == set(data)


# ---- PeftConfig ---------------------------------------------------------------------------------------------------
def test_lora_config_is_a_peft_config_with_peft_field_order() -> None:
    assert isinstance(LoraConfig(), PeftConfig) and isinstance(peft.LoraConfig(), peft.PeftConfig)
    base = [f.name for f in dataclasses.fields(peft.PeftConfig)]
    assert [f.name for f in dataclasses.fields(PeftConfig)] == base
    assert [f.name for f in dataclasses.fields(LoraConfig)][: len(base)] == base  # LoraConfig's come after, as PEFT's


def test_positional_lora_config_is_refused_as_peft_does() -> None:
    """PEFT's first field is task_type, so ``LoraConfig(16)`` is an unknown task type there, not a rank."""
    with pytest.raises(ValueError):
        peft.LoraConfig(16)
    with pytest.raises(ValueError, match="task_type=16"):
        LoraConfig(16)


def test_peft_config_from_pretrained_reads_a_lora_folder_as_peft_does(tmp_path) -> None:
    peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", base_model_name_or_path="org/base",
                    revision="v1").save_pretrained(str(tmp_path))
    ours, theirs = PeftConfig.from_pretrained(tmp_path), peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(ours) is LoraConfig and type(theirs) is peft.LoraConfig
    for name in ("base_model_name_or_path", "revision", "task_type", "peft_type", "inference_mode", "r"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_peft_config_kwargs_fill_fields_the_file_lacks_as_peft_does(tmp_path) -> None:
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    del data["base_model_name_or_path"]
    data["r"] = 4
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    kwargs = {"base_model_name_or_path": "given", "r": 16}  # the file's r wins, in both
    ours = PeftConfig.from_pretrained(tmp_path, **kwargs)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path), **kwargs)
    assert (ours.base_model_name_or_path, ours.r) == (theirs.base_model_name_or_path, theirs.r) == ("given", 4)


def test_peft_config_of_another_method_names_it_and_says_lora_only(tmp_path) -> None:
    peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]).save_pretrained(str(tmp_path))
    assert type(peft.PeftConfig.from_pretrained(str(tmp_path))) is peft.IA3Config
    for reader in (PeftConfig, LoraConfig):
        with pytest.raises(ValueError, match=r"'IA3' adapter .*lorakit supports LoRA only"):
            reader.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lorakit implements 'LORA'"):
        PeftConfig(peft_type="IA3")


def test_every_init_in_the_registry_validates_and_runs_its_entry() -> None:
    """Config validation reads the INITS registry: every entry is accepted, and its ``function`` resolves."""
    import importlib

    from lorakit.config import INITS, init_method

    for key, entry in INITS.items():
        value = "pissa_niter_2" if key == "pissa_niter_" else key
        extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if key == "loftq" else {}
        config = LoraConfig(init_lora_weights=value, **extra)
        assert init_method(config.init_lora_weights) is entry
        if entry.function is not None:
            module, _, name = entry.function.partition(":")
            assert callable(getattr(importlib.import_module(module), name))
    assert [k for k, e in INITS.items() if e.changes_base] == ["pissa", "pissa_niter_", "olora", "loftq", "corda"]
