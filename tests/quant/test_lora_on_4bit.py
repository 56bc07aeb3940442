"""LoRA on quantized bases: equals LoRA on the dequantized fp32 base; QLoRA trains only adapters; merging.

Tolerance 1e-5 (fp32): the 4-bit layer dequantizes to exactly the weight that the reference uses, so the only
difference is summation order inside the matmuls.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit import (
    BitsAndBytesConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
    quant,
    quantize_model,
)
from lorakit.layers import LoraLinear

from ..conftest import make_tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _nf4(model: nn.Module, double: bool = True) -> nn.Module:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double,
                             bnb_4bit_compute_dtype=torch.float32)
    return quantize_model(model, cfg)


def _dequantized_copy(qmodel: nn.Module, like: nn.Module) -> nn.Module:
    """``like`` with every quantized linear replaced by an nn.Linear holding the dequantized fp32 weight."""
    ref = copy.deepcopy(like)
    qmods = dict(qmodel.named_modules())
    for name, module in list(ref.named_modules()):
        q = qmods.get(name)
        if q is not None and quant.is_quantized_linear(q):
            with torch.no_grad():
                module.weight.copy_(quant.dequantize_weight(q))
    return ref


def _copy_lora(src: nn.Module, dst: nn.Module) -> None:
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".adapters." in n:
                dst_params[n].copy_(p)


@pytest.mark.parametrize("double", [False, True])
def test_lora_on_our_4bit_equals_lora_on_dequantized(double: bool, input_ids) -> None:
    base = make_tiny_llama()
    qbase = _nf4(copy.deepcopy(base), double)
    assert sum(quant.is_quantized_linear(m) for m in qbase.modules()) == 14
    ref = _dequantized_copy(qbase, base)
    ours = get_peft_model(qbase, LoraConfig(**LORA))
    refp = get_peft_model(ref, LoraConfig(**LORA))
    _copy_lora(ours, refp)
    with torch.no_grad():
        a, b = ours(input_ids=input_ids).logits, refp(input_ids=input_ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # gradients agree too, and reach only the adapters
    ours.train()
    refp.train()
    ours(input_ids=input_ids, labels=input_ids).loss.backward()
    refp(input_ids=input_ids, labels=input_ids).loss.backward()
    ref_grads = dict(refp.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert ".adapters." in n
            torch.testing.assert_close(p.grad, ref_grads[n].grad, atol=1e-5, rtol=1e-4)
        else:
            assert p.grad is None


def test_lora_on_bitsandbytes_linear4bit_base(input_ids) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    # hidden 64: bitsandbytes' CPU kernel is wrong when shape[-1] % blocksize != 0 (nf4-format.md, pitfalls);
    # every layer here has in_features a multiple of 64, as LLM weights do.
    base = make_tiny_llama(hidden=64)
    qbase = copy.deepcopy(base)
    modules = dict(qbase.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, quant_type="nf4",
                                      compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            layer = layer.to("cpu")  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, layer)
    assert all(quant.is_quantized_linear(m) for m in qbase.modules() if type(m).__name__ == "Linear4bit")
    ref = _dequantized_copy(qbase, base)  # our dequantize reads bitsandbytes' state (bit-compatible)
    ours = get_peft_model(qbase, LoraConfig(**LORA))
    assert sum(isinstance(m, LoraLinear) for m in ours.modules()) == 14
    refp = get_peft_model(ref, LoraConfig(**LORA))
    _copy_lora(ours, refp)
    # Autograd on: bitsandbytes' CPU Linear4bit repacks its weight with bf16 absmax under eval + no_grad
    # (../shared/reference/nf4-format.md, pitfalls), which would compare its inference kernel, not the format.
    torch.testing.assert_close(ours(input_ids=input_ids).logits, refp(input_ids=input_ids).logits, atol=1e-5, rtol=0)


def test_qlora_training_lowers_loss_and_touches_only_adapters(input_ids) -> None:
    model = prepare_model_for_kbit_training(_nf4(make_tiny_llama()), use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (".adapters.default.lora_" in n), n


def test_merge_into_4bit_warns_and_full_precision_merge_is_exact(tmp_path, input_ids) -> None:
    base = make_tiny_llama()
    qmodel = get_peft_model(_nf4(copy.deepcopy(base)), LoraConfig(**LORA))
    with torch.no_grad():
        unmerged = qmodel(input_ids=input_ids).logits
    qmodel.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="full-precision base"):
        merged4 = qmodel.merge_and_unload()
    with torch.no_grad():
        drift = (merged4(input_ids=input_ids).logits - unmerged).abs().max().item()
    assert drift > 0  # requantizing loses information: the warning is not idle
    # the recommended path: the adapter trained on 4-bit, merged onto the full-precision base
    full = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    lora_params = dict(full.named_parameters())
    merged = full.merge_and_unload()
    for name, module in merged.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            a = lora_params[f"base_model.model.{name}.adapters.default.lora_A.weight"]
            b = lora_params[f"base_model.model.{name}.adapters.default.lora_B.weight"]
            expected = dict(base.named_modules())[name].weight + 2.0 * b @ a
            torch.testing.assert_close(module.weight, expected, atol=1e-6, rtol=0)
