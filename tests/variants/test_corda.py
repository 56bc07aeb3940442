"""CorDA (``init_lora_weights="corda"`` after ``preprocess_corda``): parity with PEFT (A, B and the residual base,
1e-5 fp32: same covariance, damping, inverse and SVD on the same data), the cache/covariance files, and the
conversion to a plain rank-2r LoRA on the original base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

import lorakit
from lorakit.variants.corda import preprocess_corda

from .common import check_conversion_to_plain_lora, tiny_llama

TOL = 1e-5
KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="corda")




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
    base = tiny_llama(seed=0)
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
    base = tiny_llama(seed=0)
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
        lorakit.get_peft_model(tiny_llama(seed=0), lorakit.LoraConfig(**KW))


def test_corda_conversion_to_plain_lora_on_original_base(tmp_path):
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6))
    config = check_conversion_to_plain_lora(_ours(base), base, ids, tmp_path)
    assert config.r == 8 and config.init_lora_weights is True and config.corda_config is None
