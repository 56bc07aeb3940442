"""Merging into a quantized base keeps the exact base: ``disable_adapter()`` / ``unmerge_adapter()`` on a merged
4-bit (or 8-bit) model give the base's exact logits, however many rounds (issue 17, item 9: base logits drifted
0.76-1.41 after five rounds, from requantizing on every unmerge and merge)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, quantize_model

from ..conftest import make_tiny_llama


def _quantized(kind: str) -> nn.Module:
    base = make_tiny_llama()
    if kind == "bnb-nf4":  # bitsandbytes' own Linear4bit layers (CPU)
        bnb = pytest.importorskip("bitsandbytes")
        for name, lin in list(base.named_modules()):
            if isinstance(lin, nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4")
                q.load_state_dict(lin.state_dict())
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, q.to("cpu"))
        return base
    if kind == "int8":
        return quantize_model(base, BitsAndBytesConfig(load_in_8bit=True))
    return quantize_model(base, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32))


@pytest.mark.parametrize("kind, lora_bias", [("nf4", False), ("nf4", True), ("int8", False), ("bnb-nf4", False)])
def test_disable_adapter_on_a_merged_quantized_model_gives_the_exact_base(kind, lora_bias, input_ids) -> None:
    base = _quantized(kind)
    if lora_bias:  # lora_B's bias merges into the base bias: give the layers one
        for module in base.modules():
            if hasattr(module, "bias") and module.bias is None and hasattr(module, "out_features"):
                module.bias = nn.Parameter(torch.randn(module.out_features) * 0.1, requires_grad=False)
    with torch.no_grad():
        expected_base = base(input_ids=input_ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, lora_bias=lora_bias))
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the requantization warning
            model.merge_adapter()
            merged = model(input_ids=input_ids).logits
            assert not torch.equal(merged, expected_base)
            for _ in range(5):
                with model.disable_adapter():
                    assert torch.equal(model(input_ids=input_ids).logits, expected_base)
                assert torch.equal(model(input_ids=input_ids).logits, merged)  # re-merged from the exact base
            model.unmerge_adapter()
        assert torch.equal(model(input_ids=input_ids).logits, unmerged)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=input_ids).logits, expected_base)


def test_partial_unmerge_keeps_the_exact_base_for_the_last(input_ids) -> None:
    model = get_peft_model(_quantized("nf4"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        with model.disable_adapter():
            expected_base = model(input_ids=input_ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter(["default", "b"])
            for _ in range(3):
                with model.disable_adapter():
                    assert torch.equal(model(input_ids=input_ids).logits, expected_base)


def test_merge_and_unload_into_4bit_drops_the_kept_copy(input_ids) -> None:
    model = get_peft_model(_quantized("nf4"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    merged_ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_ref.merge_adapter()
        plain = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, merged_ref(input_ids=input_ids).logits,
                                   atol=0, rtol=0)
    assert not any("exact_quantized_base" in vars(m) for m in plain.modules())
