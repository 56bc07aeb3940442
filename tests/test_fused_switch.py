"""The opt-in fused LoRA path (``PeftModel.enable_fused_lora``) equals the default path in fp32, values and grads."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, quantize_model

from .conftest import make_tiny_llama


def _pair(quantized: bool):
    base = make_tiny_llama(hidden=64)
    if quantized:
        base = quantize_model(base, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                                         bnb_4bit_quant_type="nf4"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    plain = get_peft_model(base, cfg)
    fused = copy.deepcopy(plain)
    fused.enable_fused_lora(mlp=False)
    return plain, fused


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_equals_plain(quantized: bool, input_ids) -> None:
    plain, fused = _pair(quantized)
    calls = []
    from lorakit.kernels import lora_fused

    original = lora_fused._LoraLinear.apply
    lora_fused._LoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        out_f = fused(input_ids=input_ids, labels=input_ids)
    finally:
        lora_fused._LoraLinear.apply = original
    assert len(calls) == 14  # every adapted linear took the fused path
    out_p = plain(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-5, rtol=0)
    out_f.loss.backward()
    out_p.loss.backward()
    grads = dict(plain.named_parameters())
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4)


def test_fused_falls_back_with_two_active_adapters(input_ids) -> None:
    plain, _ = _pair(False)
    plain.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    plain.set_adapter(["default", "b"])
    fused = copy.deepcopy(plain)
    fused.enable_fused_lora(mlp=False)
    from lorakit.kernels import lora_fused

    calls = []
    original = lora_fused._LoraLinear.apply
    lora_fused._LoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            out = fused(input_ids=input_ids).logits
    finally:
        lora_fused._LoraLinear.apply = original
    assert len(calls) == 12  # the two q_proj layers run both adapters on the default path
    with torch.no_grad():
        torch.testing.assert_close(out, plain(input_ids=input_ids).logits, atol=1e-5, rtol=0)
