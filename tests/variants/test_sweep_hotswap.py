"""``hotswap_adapter`` edge cases found by a sweep against PEFT 0.21.2."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit

from .common import tiny_llama


def test_hotswap_into_an_unknown_adapter_names_the_available_ones(tmp_path):
    """PEFT raises (unexpected keys); lorakit raised a bare KeyError: 'nope'."""
    base = tiny_llama(seed=0)
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    lorakit.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no adapter 'nope'; available: \['default'\]"):
        lorakit.hotswap_adapter(model, tmp_path, "nope")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
