"""Base-modifying inits (pissa, pissa_niter_K, olora): parity with PEFT for the deterministic ones (A, B and the
residual base weight, 1e-5 fp32: same SVD/QR on the same input), properties for the randomized one, and the
conversion to a plain rank-2r LoRA on the ORIGINAL base (``path_initial_model_for_weight_conversion``)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import lorakit

TOL = 1e-5


def _base():
    cfg = tf.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_deterministic_init_equals_peft(method):
    base = _base()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=method)
    theirs = dict(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).named_parameters())
    ours = dict(lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw)).named_parameters())
    checked = 0
    for name, p in ours.items():
        key = name.replace(".adapters.default.lora_A.", ".lora_A.default.").replace(
            ".adapters.default.lora_B.", ".lora_B.default."
        )
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(p, theirs[key], atol=TOL, rtol=TOL, msg=name)
            checked += 1
    assert checked == 6  # A, B and the residual base weight of two layers


def test_pissa_niter_properties():
    base = _base()
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights="pissa_niter_4")
    model = lorakit.get_peft_model(base, cfg)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    ad = layer.adapters["default"]
    delta = ad.delta_weight()
    torch.testing.assert_close(layer.base_layer.weight + delta, w, atol=TOL, rtol=TOL)  # residual = W - sBA
    s_full = torch.linalg.svdvals(w)
    # reconstruction error of the rank-4 part is close to the optimal (Eckart-Young) error
    err = torch.linalg.norm(w - delta)
    best = torch.sqrt((s_full[4:] ** 2).sum())
    assert err <= best * 1.05
    # B's columns are orthogonal (B = V_r sqrt(S_r / s))
    gram = ad.lora_B.weight.T @ ad.lora_B.weight
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_conversion_to_plain_lora_on_original_base(method, tmp_path):
    base = _base()
    ids = torch.randint(0, 61, (2, 6))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=method)
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)  # unchanged at init
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert (trained - base(ids).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = lorakit.LoraConfig.from_pretrained(tmp_path / "plain")
    assert config.r == 8 and config.init_lora_weights is True
    for side in (lorakit, peft):
        converted = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain").eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(ids).logits, trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["loftq", "eva", "corda"])
def test_unimplemented_inits_raise(method):
    with pytest.raises(NotImplementedError, match=method):
        lorakit.LoraConfig(init_lora_weights=method)
