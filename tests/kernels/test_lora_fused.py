"""Fused LoRA linear / DoRA linear / MLP against the plain autograd formulas: values, gradients, dropout, saved
memory."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels.lora_fused import (
    LoraProjection,
    dora_linear,
    dora_linear_reference,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
)

DT = torch.float64  # float64 end to end: fused and plain agree to rounding (1e-10)
TOL = dict(rtol=1e-10, atol=1e-10)


def _adapter(d_in, d_out, r=4, dtype=DT, bias=False):
    # B != 0 so the adapter branch is live (PEFT's init sets B = 0).
    a = (torch.randn(r, d_in, dtype=dtype) / d_in**0.5).requires_grad_()
    b = torch.randn(d_out, r, dtype=dtype).requires_grad_()
    bb = torch.randn(d_out, dtype=dtype).requires_grad_() if bias else None
    return a, b, bb


def _check_grads(out, ref, tensors, tol=TOL):
    dy = torch.randn_like(out)
    tensors = [t for t in tensors if t is not None]
    g_out = torch.autograd.grad(out, tensors, dy)
    g_ref = torch.autograd.grad(ref, tensors, dy)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("callable_weight", [False, True])
def test_lora_linear_matches_reference(lora_bias, callable_weight):
    x = torch.randn(2, 5, 24, dtype=DT, requires_grad=True)
    w, bias = torch.randn(16, 24, dtype=DT), torch.randn(16, dtype=DT)
    a, b, bb = _adapter(24, 16, bias=lora_bias)
    calls = []

    def weight_fn():
        calls.append(1)
        return w

    weight = weight_fn if callable_weight else w
    out = lora_linear(x, weight, bias, a, b, 0.5, lora_B_bias=bb)
    ref = lora_linear_reference(x, w, bias, a, b, 0.5, lora_B_bias=bb)
    torch.testing.assert_close(out, ref, **TOL)
    _check_grads(out, ref, [x, a, b, bb])
    if callable_weight:
        assert len(calls) == 2  # forward once, backward once (the reference used w directly)


@pytest.mark.parametrize("biases", [False, True])  # base bias and lora_B bias with the dropout path
def test_lora_linear_dropout_uses_one_mask_for_forward_and_backward(biases):
    x = torch.randn(6, 24, dtype=DT, requires_grad=True)
    w = torch.randn(16, 24, dtype=DT)
    bias = torch.randn(16, dtype=DT) if biases else None
    a, b, bb = _adapter(24, 16, bias=biases)
    p = 0.3
    torch.manual_seed(7)
    out = lora_linear(x, w, bias, a, b, 2.0, dropout_p=p, training=True, lora_B_bias=bb)
    torch.manual_seed(7)  # the fused forward draws its mask first: replay it
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    ref = F.linear(x, w, bias) + F.linear((x * mask / (1 - p)) @ a.t(), b, bb) * 2.0
    torch.testing.assert_close(out, ref, **TOL)
    _check_grads(out, ref, [x, a, b] + ([bb] if biases else []))
    # Not training: no dropout at all.
    torch.testing.assert_close(
        lora_linear(x, w, None, a, b, 2.0, dropout_p=p, training=False),
        lora_linear_reference(x, w, None, a, b, 2.0),
        **TOL,
    )


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("callable_weight", [False, True])
def test_dora_linear_matches_reference(biases, callable_weight):
    """Values and the gradients of x, A, B, b_B and g = m / ||W + s B A|| (the norm a constant)."""
    x = torch.randn(2, 5, 24, dtype=DT, requires_grad=True)
    w = torch.randn(16, 24, dtype=DT)
    bias = torch.randn(16, dtype=DT) if biases else None
    a, b, bb = _adapter(24, 16, bias=biases)
    g = (1 + torch.rand(16, dtype=DT)).requires_grad_()
    weight = (lambda: w) if callable_weight else w
    out = dora_linear(x, weight, bias, a, b, 0.5, g, lora_B_bias=bb)
    ref = dora_linear_reference(x, w, bias, a, b, 0.5, g, lora_B_bias=bb)
    torch.testing.assert_close(out, ref, **TOL)
    _check_grads(out, ref, [x, a, b, bb, g])


def test_dora_linear_dropout_drops_the_adapter_input_only():
    """y = g * (x W^T + s B A d(x)) + b: the base term sees x, the adapter d(x), one mask for both passes."""
    x = torch.randn(6, 24, dtype=DT, requires_grad=True)
    w, bias = torch.randn(16, 24, dtype=DT), torch.randn(16, dtype=DT)
    a, b, _ = _adapter(24, 16)
    g = (1 + torch.rand(16, dtype=DT)).requires_grad_()
    p = 0.3
    torch.manual_seed(7)
    out = dora_linear(x, w, bias, a, b, 2.0, g, dropout_p=p, training=True)
    torch.manual_seed(7)
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    ref = g * (F.linear(x, w) + F.linear((x * mask / (1 - p)) @ a.t(), b) * 2.0) + bias
    torch.testing.assert_close(out, ref, **TOL)
    _check_grads(out, ref, [x, a, b, g])
    with pytest.raises(ValueError, match="base bias requires grad"):
        dora_linear(x, w, bias.clone().requires_grad_(), a, b, 2.0, g)


def test_lora_linear_without_input_grad_and_frozen_checks():
    x = torch.randn(4, 8, dtype=DT)  # e.g. the first layer over frozen embeddings
    w = torch.randn(6, 8, dtype=DT)
    a, b, _ = _adapter(8, 6)
    out = lora_linear(x, w, None, a, b, 1.0)
    _check_grads(out, lora_linear_reference(x, w, None, a, b, 1.0), [a, b])
    with pytest.raises(ValueError, match="base weight requires grad"):
        lora_linear(x, w.clone().requires_grad_(), None, a, b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, None, a, b, 1.0, dropout_p=1.0)


def test_lora_linear_bf16_autocast_returns_param_dtype_grads():
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32)
    a, b, _ = _adapter(32, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, w, None, a, b, 0.5)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    ref = lora_linear_reference(x.detach(), w, None, a.detach(), b.detach(), 0.5)
    # bf16 inputs and output: 2**-8 relative rounding, a few roundings deep.
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_lora_linear_saves_less_than_plain_autograd_with_dropout():
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, 128, dtype=torch.bfloat16)
    base = torch.nn.Linear(128, 128, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    a, b, _ = _adapter(128, 128, r=8, dtype=torch.float32)
    drop = torch.nn.Dropout(0.1)

    def plain():  # lorakit's LoraLinear forward over a bf16 base: fp32 adapter on an fp32 copy of x
        xf = x.float()
        return base(x) + (F.linear(F.linear(drop(xf), a), b) * 0.5).to(x.dtype)

    fused = _saved_bytes(lambda: lora_linear(x, w, None, a, b, 0.5, dropout_p=0.1, training=True))
    # x (bf16, 2 B) + mask (1 B) + h (M, r) ~ 3 B per input element; the plain path saves x plus fp32 x_d.
    assert fused < 0.5 * _saved_bytes(plain)


def _mlp(h=16, i=24, with_up_adapter=True, bias=True, p=0.0):
    wg, wu, wd = (torch.randn(i, h, dtype=DT) / 4, torch.randn(i, h, dtype=DT) / 4, torch.randn(h, i, dtype=DT) / 4)
    ag, bg, bbg = _adapter(h, i, bias=bias)
    au, bu, _ = _adapter(h, i) if with_up_adapter else (None, None, None)
    ad, bd, _ = _adapter(i, h)
    gate = LoraProjection(wg, None, ag, bg, 0.5, p, bbg)
    up = LoraProjection(lambda: wu, None, au, bu, 2.0, p)
    down = LoraProjection(wd, torch.randn(h, dtype=DT), ad, bd, 1.5, p)
    return gate, up, down


@pytest.mark.parametrize("with_up_adapter", [True, False])
def test_lora_mlp_matches_reference(with_up_adapter):
    gate, up, down = _mlp(with_up_adapter=with_up_adapter)
    x = torch.randn(3, 4, 16, dtype=DT, requires_grad=True)
    out = lora_mlp(x, gate, up, down, backend="torch")
    ref = lora_mlp_reference(x, gate, up, down)
    torch.testing.assert_close(out, ref, **TOL)
    params = [x] + [t for p in (gate, up, down) for t in (p.lora_A, p.lora_B, p.lora_B_bias)]
    _check_grads(out, ref, params)


def test_lora_mlp_dropout_masks_replayed():
    p = 0.25
    gate, up, down = _mlp(bias=False, p=p)
    x = torch.randn(5, 16, dtype=DT, requires_grad=True)
    torch.manual_seed(3)
    out = lora_mlp(x, gate, up, down, training=True)
    torch.manual_seed(3)  # masks are drawn gate, up, then down (on the activation)
    m_g = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    m_u = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    m_d = torch.empty(5, 24, dtype=torch.bool).bernoulli_(1 - p)

    def proj(t, pr, m):
        return F.linear(t, pr.base_weight(DT), pr.bias) + (t * m / (1 - p)) @ pr.lora_A.t() @ pr.lora_B.t() * pr.scaling

    ref = proj(F.silu(proj(x, gate, m_g)) * proj(x, up, m_u), down, m_d)
    torch.testing.assert_close(out, ref, **TOL)
    _check_grads(out, ref, [x, gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B])


# ---- wiring into lorakit's wrappers: the exact calls LoraLinear / an MLP wrapper make --------------------------


def _fused_projection(layer, compute_dtype):
    """LoraProjection for a lorakit LoraLinear (or a plain nn.Linear without adapter) - the wrapper's call."""
    from functools import partial

    from lorakit.layers import LoraLinear

    base = layer.base_layer if isinstance(layer, LoraLinear) else layer
    # A 4-bit base (lorakit's Linear4bit) is dequantized on demand into the compute dtype, never saved.
    weight = partial(base.dequantize, compute_dtype) if hasattr(base, "dequantize") else base.weight
    if not isinstance(layer, LoraLinear):
        return LoraProjection(weight, base.bias)
    (adapter,) = [layer.adapters[n] for n in layer.active_adapters]
    p = adapter.dropout.p if isinstance(adapter.dropout, torch.nn.Dropout) else 0.0
    return LoraProjection(
        weight, base.bias, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling, p, adapter.lora_B.bias
    )


def _tiny_peft_llama(quantize):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if quantize:
        from lorakit.quant.config import BitsAndBytesConfig
        from lorakit.quant.load import quantize_model

        quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj", "q_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_paths_match_lorakit_wrappers(quantize):
    model = _tiny_peft_llama(quantize)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(2, 5, 64, requires_grad=True)
    # LoRA linear: LoraLinear(x) == lora_linear(x, ...) with the wrapper's tensors.
    q = layer.self_attn.q_proj
    p = _fused_projection(q, torch.float32)
    ref = q(x)
    out = lora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, p.dropout_p, False, p.lora_B_bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32: matmul order only
    _check_grads(out, ref, [x, p.lora_A, p.lora_B], tol=dict(rtol=1e-4, atol=1e-5))
    # LoRA MLP: LlamaMLP with gate/down wrapped (up left plain) == lora_mlp over its projections.
    mlp = layer.mlp
    ref = mlp(x)
    gate, up, down = (_fused_projection(m, torch.float32) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    out = lora_mlp(x, gate, up, down, training=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, gate.lora_A, gate.lora_B, down.lora_A, down.lora_B]
    _check_grads(out, ref, params, tol=dict(rtol=1e-4, atol=1e-5))
