"""chunked_lm_loss against full logits + F.cross_entropy (values and gradients), and the causal-LM helper."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.kernels.chunked_ce import (
    auto_chunk_size,
    causal_lm_hidden_states,
    causal_lm_loss,
    chunked_lm_loss,
    lm_loss_reference,
)


def _inputs(n=37, h=16, v=50, dtype=torch.float64, bias=True, ignore_frac=0.3):
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, dtype=dtype) / h**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    return hidden, weight, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_matches_reference_values_and_grads(reduction, softcap, chunk_size):
    hidden, weight, bias, labels = _inputs()
    kw = dict(lm_head_bias=bias, reduction=reduction, logit_softcap=softcap)
    ref = lm_loss_reference(hidden, weight, labels, **kw)
    out = chunked_lm_loss(hidden, weight, labels, chunk_size=chunk_size, **kw)
    # Both sides take the softmax in fp32 (the reference casts the float64 logits to fp32): fp32 rounding.
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    ref_g = _grads(ref * 1.7, (hidden, weight, bias))  # non-unit upstream gradient
    out_g = _grads(out * 1.7, (hidden, weight, bias))
    for a, b in zip(out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_only_hidden_grad_and_bf16():
    hidden, weight, _, labels = _inputs(n=40, h=32, v=64, dtype=torch.bfloat16, bias=False)
    weight.requires_grad_(False)
    ref = lm_loss_reference(hidden, weight, labels, reduction="mean")
    out = chunked_lm_loss(hidden, weight, labels, chunk_size=16, reduction="mean")
    assert out.dtype == torch.float32
    # bf16 logits, fp32 softmax on both sides: only the chunk-vs-full summation order differs.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    (g_out,) = torch.autograd.grad(out, hidden)
    assert g_out.dtype == torch.bfloat16
    # One bf16 rounding of dlogits (2**-8 relative) on each side.
    torch.testing.assert_close(g_out.float(), g_ref.float(), rtol=2e-2, atol=2e-3)


def test_all_ignored_mean_is_nan_like_cross_entropy_and_sum_is_zero():
    hidden, weight, _, labels = _inputs(bias=False)
    labels[:] = -100
    assert torch.isnan(chunked_lm_loss(hidden, weight, labels, reduction="mean"))
    assert chunked_lm_loss(hidden, weight, labels, reduction="sum").item() == 0.0


def test_no_grad_mode_skips_gradients():
    hidden, weight, bias, labels = _inputs()
    with torch.no_grad():
        out = chunked_lm_loss(hidden, weight, labels, lm_head_bias=bias)
    assert not out.requires_grad
    torch.testing.assert_close(out, lm_loss_reference(hidden, weight, labels, bias).detach().float())


def test_auto_chunk_size():
    assert auto_chunk_size(128256) == 256
    assert auto_chunk_size(2**30) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction="none"), "reduction"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    hidden, weight, _, labels = _inputs(bias=False)
    with pytest.raises(ValueError, match=match):
        chunked_lm_loss(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        chunked_lm_loss(hidden, weight, labels[:-1])


def _tiny_llama():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).double()


def test_causal_lm_loss_matches_transformers_loss_and_grads():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels[1, -2:] = -100
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_g = torch.autograd.grad(ref, list(model.parameters()))
    out = causal_lm_loss(model, ids, labels, chunk_size=5, attention_mask=mask)
    out_g = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    for a, b in zip(out_g, ref_g, strict=True):  # fp32 softmax on both sides
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    hidden, shifted = causal_lm_hidden_states(model, ids, labels, attention_mask=mask)
    assert hidden.shape == (18, 32) and shifted.shape == (18,)
    assert shifted[8] == -100 and shifted[0] == labels[0, 1]


def test_causal_lm_loss_rejects_scaled_logits():
    model = _tiny_llama()
    model.config.logit_scale = 0.5
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(NotImplementedError, match="logit_scale"):
        causal_lm_loss(model, ids, ids)
