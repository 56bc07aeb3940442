"""PEFT's state-dict functions and the public names PEFT users import."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from ..conftest import make_tiny_llama

CFG = dict(r=4, target_modules="all-linear", init_lora_weights=False)


def test_state_dict_keys_and_values_equal_peft(input_ids) -> None:
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CFG))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**CFG))
    peft_state = peft.get_peft_model_state_dict(theirs)
    assert set(get_peft_model_state_dict(ours)) == set(peft_state)
    set_peft_model_state_dict(ours, peft_state)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits,
                                   atol=1e-5, rtol=0)
    for k, v in get_peft_model_state_dict(ours).items():
        assert torch.equal(v, peft_state[k]), k


def test_set_state_dict_rejects_wrong_shapes() -> None:
    ours = get_peft_model(make_tiny_llama(), LoraConfig(**CFG))
    state = {k: v.clone() for k, v in get_peft_model_state_dict(ours).items()}
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match="shape mismatch"):
        set_peft_model_state_dict(ours, state)


@pytest.mark.parametrize(
    "name",
    ["LoraConfig", "TaskType", "get_peft_model", "PeftModel", "PeftModelForCausalLM",
     "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM", "PeftModelForTokenClassification",
     "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "prepare_model_for_kbit_training",
     "get_peft_model_state_dict", "set_peft_model_state_dict", "LoftQConfig", "EvaConfig",
     "initialize_lora_eva_weights", "get_eva_state_dict", "PeftType"],
)
def test_peft_names_import_from_lorakit(name: str) -> None:
    assert hasattr(peft, name) and hasattr(lorakit, name)


def test_set_state_dict_returns_incompatible_keys_like_peft() -> None:
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CFG))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**CFG))
    state = peft.get_peft_model_state_dict(theirs)
    want = peft.set_peft_model_state_dict(theirs, state)
    got = set_peft_model_state_dict(ours, state)
    assert got.unexpected_keys == want.unexpected_keys == []
    assert got.missing_keys == want.missing_keys  # the base model's keys (load_state_dict(strict=False))
