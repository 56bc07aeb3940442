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


def _assert_same_grads(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Every trainable parameter's gradient equals the reference model's (fp32, 1e-5)."""
    grads = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4, msg=n)


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
    _assert_same_grads(fused, plain)


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
    _assert_same_grads(default, plain)


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
    model.float()
    with _CountFused() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=input_ids)
    assert not calls  # half-precision compute: the fused additions would round differently
    k = model.base_model.model.model.layers[0].self_attn.k_proj
    k.base_layer.register_full_backward_hook(lambda *_: None)
    with _CountFused() as calls:
        model(input_ids=input_ids)
    assert len(calls) == 12  # q (forward pre-hook) and k (backward hook) run their bases' own forward


def test_default_keeps_the_plain_path_under_torch_func_and_forward_ad() -> None:
    """The fused autograd function has no vmap or jvp rule: per-sample gradients and forward-mode AD must still
    work on a default model, through the plain path."""
    from torch.func import functional_call, grad, vmap

    layer = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    ).base_model.model[0]
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(4, 6)

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    with _CountFused() as calls:
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    assert not calls
    for i in range(4):  # each row's gradient equals an ordinary backward on that row alone
        want = torch.autograd.grad(loss(dict(layer.named_parameters()), x[i]), [p for _, p in layer.named_parameters()
                                   if p.requires_grad])
        for got, w in zip(per_sample.values(), want, strict=True):
            torch.testing.assert_close(got[i], w)
    import torch.autograd.forward_ad as fwAD

    with _CountFused() as calls, fwAD.dual_level():
        tangent = torch.randn(4, 6)
        out = layer(fwAD.make_dual(x, tangent))
        jvp = fwAD.unpack_dual(out).tangent
    assert not calls
    torch.testing.assert_close(jvp, torch.func.jvp(layer, (x,), (tangent,))[1])


def test_enable_fused_lora_false_is_plain_and_unload_restores_the_default(input_ids) -> None:
    model = get_peft_model(
        make_tiny_llama(hidden=64), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    layers = [m for m in model.modules() if hasattr(m, "use_fused")]
    assert {m.use_fused for m in layers} == {None}
    model.enable_fused_lora(False)
    assert {m.use_fused for m in layers} == {False}
    model.enable_fused_lora()
    assert {m.use_fused for m in layers} == {True}
    model.merge_and_unload()
    assert {m.use_fused for m in layers} == {None}


def test_default_keeps_the_plain_path_over_a_4bit_base_with_another_compute_dtype(input_ids) -> None:
    """lorakit's Linear4bit casts x to its compute dtype and the output back; the fused path computes in x's dtype,
    so it is not taken by default there."""
    base = quantize_model(make_tiny_llama(hidden=64), BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with _CountFused() as calls:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert not calls


def test_fused_dropout_draws_what_nn_dropout_draws(input_ids) -> None:
    """From the same RNG state the fused path drops the same entries as nn.Dropout (reentrant checkpointing may
    run the forward on one path and recompute it on the other): equal logits and grads in training mode."""
    cfg = LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
    fused = get_peft_model(make_tiny_llama(hidden=64), cfg).train()
    fused.enable_fused_lora()
    plain = copy.deepcopy(fused)
    plain.enable_fused_lora(False)
    torch.manual_seed(5)
    with _CountFused() as calls:
        out_f = fused(input_ids=input_ids, labels=input_ids)
    assert len(calls) == 8  # the attention linears; the MLPs run as fused MLPs (same draws, same order)
    torch.manual_seed(5)
    out_p = plain(input_ids=input_ids, labels=input_ids)
    torch.manual_seed(6)
    other = plain(input_ids=input_ids).logits
    assert (other - out_p.logits).abs().max() > 1e-4  # dropout does act here
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-5, rtol=0)
    out_f.loss.backward()
    out_p.loss.backward()
    _assert_same_grads(fused, plain)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("arch", ["llama", "llama-4bit", "gpt2"])
def test_dora_takes_the_fused_path_by_default_and_equals_plain(arch: str, dropout: float, input_ids) -> None:
    """DoRA linears (Linear, NF4 with fp32 compute, GPT-2 Conv1D) train on the fused DoRA autograd by default:
    equal logits and gradients (A, B, magnitude) to the plain path, from the same RNG state when dropout is on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.kernels import lora_fused

    if arch.startswith("llama"):
        base, n_layers = make_tiny_llama(hidden=64), 14
        if arch == "llama-4bit":
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
            base = quantize_model(base, bnb)
    else:
        torch.manual_seed(0)
        base, n_layers = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4)), 8
    cfg = LoraConfig(r=4, target_modules="all-linear", use_dora=True, lora_dropout=dropout, init_lora_weights=False)
    default = get_peft_model(base, cfg).train()
    with torch.no_grad():
        for n, p in default.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))  # m != ||W + s B A||: the rescaling is visible
    plain = copy.deepcopy(default)
    plain.enable_fused_lora(False)
    calls = []
    original = lora_fused._DoraLinear.apply
    lora_fused._DoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        torch.manual_seed(5)
        out_d = default(input_ids=input_ids, labels=input_ids)
    finally:
        lora_fused._DoraLinear.apply = original
    assert len(calls) == n_layers
    torch.manual_seed(5)
    out_p = plain(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_d.logits, out_p.logits, atol=1e-5, rtol=0)
    out_d.loss.backward()
    out_p.loss.backward()
    _assert_same_grads(default, plain)
    assert any(p.grad.abs().max() > 0 for n, p in default.named_parameters() if "lora_magnitude_vector" in n)
