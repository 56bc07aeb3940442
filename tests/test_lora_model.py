"""LoraModel (lorakit.lora_model): where it lives, and that every old import path names the same class."""

from __future__ import annotations

import lorakit
import lorakit.lora_model
import lorakit.model
from lorakit import LoraConfig, get_peft_model

from .conftest import make_tiny_llama


def test_lora_model_has_its_own_module() -> None:
    from lorakit.lora_model import LoraModel

    assert LoraModel is lorakit.LoraModel
    assert LoraModel.__module__ == "lorakit.lora_model"
    assert "__all__" not in vars(lorakit.model)  # no re-export of LoraModel from lorakit.model


def test_peft_model_base_model_is_a_lora_model() -> None:
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(make_tiny_llama(), config)
    assert isinstance(model.base_model, lorakit.lora_model.LoraModel)
    expected = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert model.base_model.targeted_module_names == expected
