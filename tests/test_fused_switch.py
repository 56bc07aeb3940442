"""The fused LoRA path equals the plain autograd path in fp32, values and grads: opted in
(``PeftModel.enable_fused_lora``) and where layers take it by default (``LoraLinear.use_fused = None``)."""

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
    plain.enable_fused_lora(enabled=False)  # the plain autograd path everywhere
    fused = copy.deepcopy(plain)
    fused.enable_fused_lora(mlp=False)
    return plain, fused


class _CountFused:
    """Counts the calls of the fused linear autograd function within the block."""

    def __enter__(self) -> list[int]:
        from lorakit.kernels import lora_fused

        self.calls: list[int] = []
        self.original = lora_fused._LoraLinear.apply
        lora_fused._LoraLinear.apply = lambda *a: self.calls.append(1) or self.original(*a)
        return self.calls

    def __exit__(self, *exc: object) -> None:
        from lorakit.kernels import lora_fused

        lora_fused._LoraLinear.apply = self.original


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_equals_plain(quantized: bool, input_ids) -> None:
    plain, fused = _pair(quantized)
    with _CountFused() as calls:
        out_f = fused(input_ids=input_ids, labels=input_ids)
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
    with _CountFused() as calls, torch.no_grad():
        out = fused(input_ids=input_ids).logits
    assert len(calls) == 12  # the two q_proj layers run both adapters on the default path
    with torch.no_grad():
        torch.testing.assert_close(out, plain(input_ids=input_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantized", [False, True])
def test_default_takes_the_fused_path_where_it_computes_the_same(quantized: bool, input_ids) -> None:
    plain, _ = _pair(quantized)
    default = copy.deepcopy(plain)
    for module in default.modules():
        if hasattr(module, "use_fused"):
            module.use_fused = None  # what get_peft_model leaves
    with _CountFused() as calls, torch.no_grad():
        default(input_ids=input_ids)
    assert not calls  # inference keeps the plain path (less per-call overhead)
    with _CountFused() as calls:
        out_d = default(input_ids=input_ids, labels=input_ids)
    assert len(calls) == 14
    with _CountFused() as calls:
        out_p = plain(input_ids=input_ids, labels=input_ids)
    assert not calls
    torch.testing.assert_close(out_d.logits, out_p.logits, atol=1e-5, rtol=0)
    out_d.loss.backward()
    out_p.loss.backward()
    grads = dict(plain.named_parameters())
    for n, p in default.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4)


def test_default_keeps_the_plain_path_for_other_dtypes_and_hooked_bases(input_ids) -> None:
    model = get_peft_model(
        make_tiny_llama(hidden=64), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    seen = []
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.base_layer.register_forward_pre_hook(lambda *_: seen.append(1))
    with _CountFused() as calls:
        model(input_ids=input_ids)
    assert len(calls) == 13 and seen == [1]  # the hooked base runs its own forward
    model.to(torch.bfloat16)
    for module in model.modules():  # adapters back to fp32 over the bf16 base: the plain path's fp32 copy of x
        if hasattr(module, "lora_A"):
            module.float()
    with _CountFused() as calls:
        model(input_ids=input_ids)
    assert not calls
    with _CountFused() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)
    assert len(calls) == 13  # under autocast both paths run the adapter in bf16


def test_default_keeps_the_plain_path_over_a_4bit_base_with_another_compute_dtype(input_ids) -> None:
    """lorakit's Linear4bit casts x to its compute dtype and the output back; the fused path computes in x's dtype,
    so it is not taken by default there."""
    base = quantize_model(make_tiny_llama(hidden=64), BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with _CountFused() as calls:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert not calls
