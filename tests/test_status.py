"""get_layer_status / get_model_status: field by field against PEFT on the same models (two adapters, one of them
with an embedding and modules_to_save), through activation, merging, disabling and partial freezing."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit import LoraConfig, get_layer_status, get_model_status, get_peft_model
from lorakit.status import TunerLayerStatus, TunerModelStatus

from .conftest import make_tiny_llama

A = dict(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"], init_lora_weights=False)
B = dict(r=4, target_modules=["v_proj", "q_proj"], init_lora_weights=False)


def _pair():
    """The same two-adapter model in lorakit and in PEFT (same base weights, same adapter placement)."""
    models = []
    for lib in (lorakit, peft):
        model = lib.get_peft_model(make_tiny_llama(), lib.LoraConfig(**A), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(**B))
        models.append(model)
    _same_requires_grad(*models, trainable=["a"])
    return models


def _same_requires_grad(ours, theirs, trainable: list[str]) -> None:
    """PEFT flips requires_grad in set_adapter / add_adapter / disable (lorakit never does): set it on both."""
    for model in (ours, theirs):
        for name in model.peft_config:
            model.set_requires_grad(name, name in trainable)


def _as_dicts(statuses) -> list[dict]:
    return [dataclasses.asdict(s) for s in statuses]


def _assert_same(ours, theirs) -> None:
    assert _as_dicts(get_layer_status(ours)) == _as_dicts(peft.get_layer_status(theirs))
    assert dataclasses.asdict(get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))
    assert [f.name for f in dataclasses.fields(TunerLayerStatus)] == [
        f.name for f in dataclasses.fields(peft.peft_model.TunerLayerStatus)
    ]
    assert [f.name for f in dataclasses.fields(TunerModelStatus)] == [
        f.name for f in dataclasses.fields(peft.peft_model.TunerModelStatus)
    ]


def test_initial_state_matches_peft() -> None:
    ours, theirs = _pair()
    _assert_same(ours, theirs)
    status = ours.get_model_status()  # also a PeftModel method, as in PEFT
    assert status.active_adapters == ["a"] and status.available_adapters == ["a", "b"]
    assert status.num_adapter_layers == 1 + 2 * 2 + 1  # embed_tokens, q_proj/v_proj in each of 2 layers, lm_head
    assert {s.module_type for s in ours.get_layer_status()} == {"lora.Embedding", "lora.Linear", "ModulesToSaveWrapper"}


def test_two_active_adapters_one_merged_match_peft() -> None:
    ours, theirs = _pair()
    ours.base_model.set_adapter(["a", "b"])
    theirs.base_model.set_adapter(["a", "b"])
    _same_requires_grad(ours, theirs, trainable=["a", "b"])
    _assert_same(ours, theirs)  # lm_head holds only "a": active_adapters differ per layer -> "irregular"
    assert get_model_status(ours).active_adapters == "irregular"
    for model in (ours, theirs):
        model.merge_adapter(["b"])
    _assert_same(ours, theirs)
    assert get_model_status(ours).merged_adapters == ["b"]


def test_a_partial_merge_is_irregular_as_in_peft() -> None:
    ours, theirs = _pair()
    ours.get_base_model().model.layers[0].self_attn.q_proj.merge(["a"])
    theirs.get_base_model().model.layers[0].self_attn.q_proj.merge(["a"])
    _assert_same(ours, theirs)
    assert get_model_status(ours).merged_adapters == "irregular"


def test_disabled_adapters_match_peft() -> None:
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.base_model.disable_adapter_layers()
    _same_requires_grad(ours, theirs, trainable=["a"])
    _assert_same(ours, theirs)
    assert get_model_status(ours).enabled is False
    for model in (ours, theirs):
        model.base_model.enable_adapter_layers()
    with ours.disable_adapter(), theirs.disable_adapter():
        _same_requires_grad(ours, theirs, trainable=["a"])
        _assert_same(ours, theirs)
    ours.get_base_model().model.layers[1].self_attn.v_proj.disabled = True  # one layer off: "irregular"
    theirs.get_base_model().model.layers[1].self_attn.v_proj.enable_adapters(False)
    _same_requires_grad(ours, theirs, trainable=["a"])
    _assert_same(ours, theirs)
    assert get_model_status(ours).enabled == "irregular"


def test_other_active_adapter_and_partial_freeze_match_peft() -> None:
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.set_adapter("b")  # lm_head has no copy for "b": no active adapter there
    _same_requires_grad(ours, theirs, trainable=["b"])
    ours.set_requires_grad("b", True)
    ours.get_base_model().model.layers[0].self_attn.q_proj.adapters["b"].lora_A.weight.requires_grad_(False)
    theirs.set_requires_grad("b", True)
    theirs.get_base_model().model.layers[0].self_attn.q_proj.lora_A["b"].weight.requires_grad_(False)
    _assert_same(ours, theirs)
    status = get_model_status(ours)
    assert status.requires_grad == {"a": False, "b": "irregular"}
    assert status.trainable_params == peft.get_model_status(theirs).trainable_params > 0


def test_bare_transformers_model_and_errors_match_peft() -> None:
    ours = get_peft_model(make_tiny_llama(), LoraConfig(**B))
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**B))
    _assert_same(ours.get_base_model(), theirs.get_base_model())  # names without the LoraModel's "model." prefix
    assert get_model_status(ours.get_base_model()).adapter_model_type == "None"
    with pytest.raises(ValueError, match="No adapter layers found"):
        get_layer_status(make_tiny_llama())
    with pytest.raises(ValueError, match="No adapter layers found"):
        peft.get_layer_status(make_tiny_llama())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_are_named_as_peft_names_them(tmp_path, bits) -> None:
    make_tiny_llama(hidden=64).save_pretrained(tmp_path)
    kwargs = {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32} if bits == 4 else {"load_in_8bit": True}
    quantization = transformers.BitsAndBytesConfig(**kwargs)
    loaded = [
        transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
        for _ in range(2)
    ]
    ours = get_peft_model(loaded[0], LoraConfig(**B))
    theirs = peft.get_peft_model(loaded[1], peft.LoraConfig(**B))
    _assert_same(ours, theirs)
    own = get_peft_model(
        lorakit.quantize_model(make_tiny_llama(hidden=64), lorakit.BitsAndBytesConfig(**kwargs)), LoraConfig(**B)
    )  # lorakit's own quantized linears read as PEFT's bitsandbytes layers
    assert {s.module_type for s in own.get_layer_status()} == {s.module_type for s in theirs.get_layer_status()}
