"""Linear4bit / Linear8bitLt against bitsandbytes' modules (oracle), and the duck-typed helpers.

Tolerances: state dicts are compared bit for bit. Forward outputs of a 4-bit layer against the fp32 layer
built from its dequantized weight: 1e-6 (same weight, same fp32 matmul; only the matmul order may differ).
Against bitsandbytes' modules: 1e-5 absolute (its CPU kernels accumulate in another order).
"""

import copy
import io

import pytest
import torch
from torch import nn

from lorakit.quant import (
    Linear4bit,
    Linear8bitLt,
    Params4bit,
    dequantize_weight,
    is_quantized_linear,
    requantize_weight_,
)

bnb = pytest.importorskip("bitsandbytes")


def _bnb_linear4bit(linear: nn.Linear, **kwargs) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, **kwargs)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def _bnb_linear8bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_state_dict_matches_bitsandbytes(quant_type, compress_statistics):
    linear = nn.Linear(64, 48)
    ours = Linear4bit.from_linear(linear, quant_type=quant_type, compress_statistics=compress_statistics)
    theirs = _bnb_linear4bit(linear, quant_type=quant_type, compress_statistics=compress_statistics)
    ref = theirs.state_dict()  # before any eval forward (it would repack the weight: reference file)
    mine = ours.state_dict()
    assert list(mine) == list(ref)
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    # and back: bitsandbytes' state dict loads into ours
    fresh = Linear4bit(64, 48)
    fresh.load_state_dict(ref)
    assert fresh.quant_type == quant_type and fresh.compress_statistics == compress_statistics
    assert torch.equal(fresh.dequantize(), ours.dequantize())


def test_linear4bit_forward_and_gradients():
    linear = nn.Linear(64, 48)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32, compress_statistics=True)
    dense = nn.Linear(64, 48)
    dense.weight.data, dense.bias.data = layer.dequantize(), linear.bias.detach().clone()
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    (y * torch.arange(48.0)).sum().backward()
    (y_ref * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    assert not layer.weight.requires_grad and layer.weight.grad is None
    assert layer.bias.grad is None  # frozen: gradients reach the input only
    theirs = _bnb_linear4bit(linear, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(layer(x).detach(), theirs(x).detach(), atol=1e-5, rtol=0)


def test_linear4bit_compute_dtype_bf16():
    linear = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # cast back to the input dtype, as bitsandbytes does
    w = layer.dequantize(torch.bfloat16)
    expected = nn.functional.linear(x.bfloat16(), w, linear.bias.detach().bfloat16()).float()
    assert torch.equal(y, expected)


def test_params4bit_survives_module_conversions():
    layer = Linear4bit.from_linear(nn.Linear(64, 32), quant_storage=torch.bfloat16)
    before = layer.dequantize()
    assert isinstance(layer.weight, Params4bit) and type(layer.weight).__name__ == "Params4bit"
    assert layer.weight.quant_storage == torch.bfloat16 and layer.weight.numel() * 2 * 2 == 64 * 32
    layer.to(torch.float16)  # must not convert the bf16-stored packed bytes
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.dequantize(), before)
    assert layer.bias.dtype == torch.float16
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, Params4bit) and torch.equal(clone.dequantize(), before)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.dequantize(), before)
    with pytest.raises(ValueError, match="frozen"):
        Params4bit(torch.zeros(4, 1, dtype=torch.uint8), requires_grad=True)


def test_linear4bit_load_errors():
    layer = Linear4bit(64, 32)
    with pytest.raises(ValueError, match="no quant state"):
        layer.load_state_dict({"weight": torch.zeros(1024, 1, dtype=torch.uint8), "bias": torch.zeros(32)})
    other = Linear4bit.from_linear(nn.Linear(64, 16)).state_dict()
    with pytest.raises(ValueError, match="expected \\(32, 64\\)"):
        layer.load_state_dict(other, strict=False)


def test_linear8bit_matches_bitsandbytes():
    linear = nn.Linear(64, 48)
    ours = Linear8bitLt.from_linear(linear)
    theirs = _bnb_linear8bit(linear)
    ref, mine = theirs.state_dict(), ours.state_dict()
    assert list(mine) == list(ref) == ["weight", "bias", "SCB", "weight_format"]
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    fresh = Linear8bitLt(64, 48)
    fresh.load_state_dict(ref)
    assert torch.equal(fresh.dequantize(), ours.dequantize())
    x = torch.randn(4, 64, requires_grad=True)
    y = ours(x)
    dense = nn.functional.linear(x.detach(), ours.dequantize(), linear.bias.detach())
    torch.testing.assert_close(y.detach(), dense, atol=1e-6, rtol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, ours.dequantize().sum(0).expand(4, 64), atol=1e-5, rtol=0)
    assert ours.weight.grad is None
    ours.to(torch.bfloat16)
    assert ours.SCB.dtype == torch.float32 and ours.weight.dtype == torch.int8


def test_linear8bit_threshold_is_kept_and_changes_nothing():
    """Activations are never quantized (dequantize-then-matmul), so LLM.int8()'s outlier threshold has nothing to
    select: any threshold gives the dequantized weight's output, outlier columns included."""
    linear = torch.nn.Linear(64, 32)
    layers = [Linear8bitLt.from_linear(linear) for _ in range(2)]
    layers[1].threshold = 6.0
    assert Linear8bitLt(64, 32, threshold=6.0).threshold == 6.0
    x = torch.randn(4, 64)
    x[:, 3] *= 100  # an outlier column (|x| > 6)
    want = x @ layers[0].dequantize().T + linear.bias
    for layer in layers:
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="llm_int8_threshold must be a number >= 0"):
        Linear8bitLt(64, 32, threshold=-1.0)


@pytest.mark.parametrize("maker", ["ours4", "bnb4", "ours8", "bnb8"])
def test_helpers_on_ours_and_bitsandbytes(maker):
    linear = nn.Linear(64, 32)
    module = {
        "ours4": lambda: Linear4bit.from_linear(linear, compress_statistics=True),
        "bnb4": lambda: _bnb_linear4bit(linear, compress_statistics=True, quant_type="nf4"),
        "ours8": lambda: Linear8bitLt.from_linear(linear),
        "bnb8": lambda: _bnb_linear8bit(linear),
    }[maker]()
    assert is_quantized_linear(module) and not is_quantized_linear(linear)
    assert not is_quantized_linear(nn.Embedding(4, 4)) and not is_quantized_linear(nn.LayerNorm(4))
    w = dequantize_weight(module)
    assert w.shape == (32, 64) and w.dtype == torch.float32
    bound = 0.5 if maker.endswith("8") else 1.0  # one 8-bit step of the row absmax / a 4-bit code gap
    assert (w - linear.weight.detach()).abs().max() <= bound * linear.weight.detach().abs().max()
    new = torch.randn(32, 64) * 0.1
    requantize_weight_(module, new)
    w2 = dequantize_weight(module)
    if maker.endswith("4"):  # exactly what quantize -> dequantize gives with the same settings
        assert torch.equal(w2, Linear4bit.from_linear(_linear_with(new), compress_statistics=True).dequantize())
    else:
        assert torch.equal(w2, Linear8bitLt.from_linear(_linear_with(new)).dequantize())
    x = torch.randn(2, 64)
    with torch.no_grad():  # the layer's own forward uses the new weight
        torch.testing.assert_close(module(x), x @ w2.T + linear.bias, atol=2e-2, rtol=0)


def test_dequantize_weight_after_bitsandbytes_cpu_repack():
    """bitsandbytes repacks a Linear4bit for its CPU kernel after an eval no-grad forward; we undo it."""
    linear = nn.Linear(256, 64)  # absmax (4, 64) in its repacked layout
    theirs = _bnb_linear4bit(linear, compress_statistics=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    expected = dequantize_weight(theirs)
    theirs.eval()
    with torch.no_grad():
        theirs(torch.randn(2, 256))  # (2, in)
    if not getattr(theirs.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks only for its AVX512-BF16 CPU kernel, which this CPU lacks")
    torch.testing.assert_close(dequantize_weight(theirs), expected, atol=0.01, rtol=0)  # bf16 absmax: 2^-8 rel


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


@pytest.mark.parametrize("nested", [False, True])
def test_set_weight_keeps_the_exposed_form(nested):
    """set_weight on a layer after expose_quant_state (PiSSA's residual on a copy of an FSDP-gathered layer): the
    layer stays exposed and holds exactly what set_weight gives an unexposed layer, nested constants included."""
    torch.manual_seed(0)
    plain = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32, compress_statistics=nested,
                                   quant_storage=torch.bfloat16)
    exposed = copy.deepcopy(plain)
    exposed.expose_quant_state()
    before = exposed.dequantize()
    new = torch.randn(64, 128) * 3
    plain.set_weight(new)
    exposed.set_weight(new)
    assert exposed.quant_state_exposed and type(exposed.weight) is nn.Parameter
    assert torch.equal(exposed.dequantize(), plain.dequantize())
    assert not torch.equal(exposed.dequantize(), before)  # the weight was replaced
    if nested:
        assert exposed.weight_quant_state().offset == plain.weight.quant_state.offset
