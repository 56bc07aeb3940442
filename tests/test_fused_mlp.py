"""``enable_fused_lora`` with fused SwiGLU MLPs: same values and gradients as the default path (fp32), same
parameter names and saved keys, and merge/unload give back the plain transformers model."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, get_peft_model_state_dict, quantize_model
from lorakit.fused import FusedLoraMLP

from .conftest import make_tiny_llama


def _models(quantized: bool, targets="all-linear"):
    base = make_tiny_llama(hidden=64)
    if quantized:
        base = quantize_model(base, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.float32))
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    fused = copy.deepcopy(plain)
    fused.enable_fused_lora()
    return plain, fused


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["gate_proj", "down_proj", "q_proj"]])
def test_fused_mlp_equals_default_path(quantized: bool, targets, input_ids) -> None:
    plain, fused = _models(quantized, targets)
    mlps = [m for m in fused.modules() if isinstance(m, FusedLoraMLP)]
    assert len(mlps) == 2
    calls = []
    from lorakit.kernels import lora_fused

    original = lora_fused._LoraMLP.apply
    lora_fused._LoraMLP.apply = lambda *a: calls.append(1) or original(*a)
    try:
        out_f = fused(input_ids=input_ids, labels=input_ids)
    finally:
        lora_fused._LoraMLP.apply = original
    assert len(calls) == 2  # both MLPs took the fused op
    out_p = plain(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-5, rtol=0)
    out_f.loss.backward()
    out_p.loss.backward()
    ref = dict(plain.named_parameters())
    names = [n for n, p in fused.named_parameters() if p.requires_grad]
    assert names == [n for n, p in plain.named_parameters() if p.requires_grad]  # same names, same order
    for n in names:
        torch.testing.assert_close(dict(fused.named_parameters())[n].grad, ref[n].grad, atol=1e-5, rtol=1e-4)
    assert set(get_peft_model_state_dict(fused)) == set(get_peft_model_state_dict(plain))


def test_disable_adapter_and_merge_with_fused_mlp(input_ids) -> None:
    base_out = make_tiny_llama(hidden=64)(input_ids=input_ids).logits
    plain, fused = _models(False)
    with torch.no_grad():
        with fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=input_ids).logits, base_out)
        unmerged = fused(input_ids=input_ids).logits
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, FusedLoraMLP) for m in merged.modules())
        assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"
        assert type(merged.model.layers[0].mlp.gate_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(input_ids=input_ids).logits, unmerged, atol=1e-5, rtol=0)


def test_enable_then_disable_restores_the_instances() -> None:
    plain, fused = _models(False)
    original = fused.get_base_model().model.layers[0].mlp
    assert isinstance(original, FusedLoraMLP)
    fused.enable_fused_lora(False)
    restored = fused.get_base_model().model.layers[0].mlp
    assert type(restored).__name__ == "LlamaMLP" and restored.gate_proj is original.gate_proj


def test_norm_kernels_swap_in_and_out(input_ids) -> None:
    """On CUDA the norms run through lorakit.kernels.rms_norm automatically; forced here on CPU (reference path):
    same outputs, and disabling puts the original norm instances back."""
    from lorakit.fused import disable_fused, enable_fused
    from lorakit.kernels.rms_norm import RMSNormWithKernel

    plain, _ = _models(False)
    model = plain.get_base_model()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    enable_fused(model, mlp=False)  # auto: CPU weights, so no norm is swapped
    assert not any(isinstance(m, RMSNormWithKernel) for m in model.modules())
    norm = model.model.norm
    enable_fused(model, mlp=False, norm_kernels=True)
    assert sum(isinstance(m, RMSNormWithKernel) for m in model.modules()) == 5  # 2 x 2 layer norms + final
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
    disable_fused(model)
    assert model.model.norm is norm


def test_hooks_keep_the_plain_path(input_ids) -> None:
    """The fused paths never call the base layers or the MLP projections: a module with hooks (accelerate's
    offloading, a user's) keeps the plain path even when fusing is switched on, so its hooks run."""
    plain, _ = _models(False)
    model = plain.get_base_model()
    calls = []
    model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda m, i, o: calls.append("q"))
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: o * 0.5)  # changes the output
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append("mlp") or None)
    with torch.no_grad():
        want = plain(input_ids=input_ids).logits
    calls.clear()
    plain.enable_fused_lora()
    with torch.no_grad():
        got = plain(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert calls == ["q", "mlp"]
    assert not isinstance(model.model.layers[0].mlp, FusedLoraMLP)  # a hooked MLP is not replaced


def test_norm_kernels_keep_parameter_names(input_ids, tmp_path) -> None:
    """RMSNorm kernels (CUDA's default, forced here) hold the norm's own weight: a norm in modules_to_save saves
    and reloads under the same keys."""
    from lorakit import PeftModel
    from lorakit.fused import enable_fused

    base = make_tiny_llama(hidden=64)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
        want = model(input_ids=input_ids).logits
    keys = set(model.state_dict())
    enable_fused(model.get_base_model(), norm_kernels=True)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=input_ids).logits, want, atol=1e-5, rtol=0)
