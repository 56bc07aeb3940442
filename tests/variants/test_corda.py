"""CorDA (``init_lora_weights="corda"`` after ``preprocess_corda``): parity with PEFT (A, B and the residual base,
1e-5 fp32: same covariance, damping, inverse and SVD on the same data), the cache/covariance files, and the
conversion to a plain rank-2r LoRA on the original base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

import lorakit
from lorakit.variants.corda import preprocess_corda

TOL = 1e-5
KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="corda")


def _base():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (1, 40), generator=g) for _ in range(4)]  # batch 1: PEFT's hook squeezes dim 0


def _ours(base, method="ipm", **corda):
    model = copy.deepcopy(base)
    cfg = lorakit.LoraConfig(corda_config={"corda_method": method, **corda}, **KW)
    preprocess_corda(model, cfg, run_model=lambda: [model(ids) for ids in _data()])
    return lorakit.get_peft_model(model, cfg)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method):
    base = _base()
    theirs_model = copy.deepcopy(base)
    pcfg = peft.LoraConfig(corda_config=PeftCordaConfig(corda_method=method), **KW)
    peft_preprocess_corda(theirs_model, pcfg, run_model=lambda: [theirs_model(ids) for ids in _data()])
    theirs = dict(peft.get_peft_model(theirs_model, pcfg).named_parameters())
    checked = 0
    for name, p in _ours(base, method).named_parameters():
        key = name.replace(".adapters.default.lora_A.", ".lora_A.default.").replace(
            ".adapters.default.lora_B.", ".lora_B.default."
        )
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(p, theirs[key], atol=TOL, rtol=TOL, msg=name)
            checked += 1
    assert checked == 6


def test_corda_files_are_reused(tmp_path):
    base = _base()
    files = dict(cache_file=str(tmp_path / "c" / "cache.pt"), covariance_file=str(tmp_path / "c" / "cov.pt"))
    first = dict(_ours(base, **files).named_parameters())
    for kept in ("cache_file", "covariance_file"):  # each file alone rebuilds the same adapter without data
        model = copy.deepcopy(base)
        cfg = lorakit.LoraConfig(corda_config={kept: files[kept]}, **KW)
        preprocess_corda(model, cfg, run_model=None)
        for name, p in lorakit.get_peft_model(model, cfg).named_parameters():
            torch.testing.assert_close(p, first[name], atol=TOL, rtol=TOL)


def test_corda_needs_preprocessing():
    with pytest.raises(ValueError, match="preprocess_corda"):
        lorakit.get_peft_model(_base(), lorakit.LoraConfig(**KW))


def test_corda_conversion_to_plain_lora_on_original_base(tmp_path):
    base = _base()
    ids = torch.randint(0, 61, (2, 6))
    model = _ours(base)
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
    assert config.r == 8 and config.init_lora_weights is True and config.corda_config is None
    for side in (lorakit, peft):
        converted = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain").eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(ids).logits, trained, atol=1e-4, rtol=1e-4)
