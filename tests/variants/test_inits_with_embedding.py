"""Base-modifying and data-driven inits on a model whose targets include an embedding, found by a sweep against
PEFT 0.21.2: PEFT gives the embedding adapter its default init (A = 0, B ~ N(0, 1)) and runs the method on the
linear layers; lorakit refused the whole config."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.variants.eva import get_eva_state_dict, initialize_lora_eva_weights

from .common import check_conversion_to_plain_lora, tiny_llama

#: fp32, same SVD/QR of the same weights on both sides (the deterministic inits' own parity tolerance).
TOL = 1e-5
TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def _embedding_adapter(model):
    return model.base_model.model.model.embed_tokens.adapters["default"]


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_deterministic_init_with_an_embedding_target_equals_peft(method):
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=method)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw)).eval()
    emb = _embedding_adapter(ours)
    assert not emb.lora_embedding_A.any() and emb.lora_embedding_B.std() > 0.5  # the default embedding init
    want = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if ".adapters.default.lora_A." in name or ".adapters.default.lora_B." in name or "base_layer" in name:
            key = name.replace(".adapters.default.lora_A.", ".lora_A.default.").replace(
                ".adapters.default.lora_B.", ".lora_B.default."
            )
            torch.testing.assert_close(p, want[key], atol=TOL, rtol=TOL, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)  # unchanged at init


def test_pissa_with_an_embedding_target_converts_to_plain_lora(tmp_path):
    """The embedding's base is untouched, so its trained factors need no conversion; the linear ones do."""
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    config = check_conversion_to_plain_lora(lorakit.get_peft_model(copy.deepcopy(base), cfg), base, ids, tmp_path)
    assert config.r == 8 and "embed_tokens" in config.target_modules


def test_loftq_with_an_embedding_target_still_raises():
    """LoftQ quantizes each target's base; an embedding has none to quantize (PEFT fails with a TypeError)."""
    cfg = lorakit.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="'loftq' applies to linear layers only"):
        lorakit.get_peft_model(tiny_llama(seed=0), cfg)


def _loader():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 61, (4, 16), generator=g)} for _ in range(3)]


def test_eva_with_an_embedding_target_keeps_it_and_peft_loads_the_result(tmp_path):
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                             eva_config={"rho": 2.0})
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # B = 0 on the linear layers and A = 0 on the embedding: unchanged
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
    initialize_lora_eva_weights(model, _loader())
    emb = _embedding_adapter(model)
    assert "model.embed_tokens" in model.peft_config["default"].target_modules  # still targeted, as in PEFT
    with torch.no_grad():
        emb.lora_embedding_A.normal_()  # a trained embedding adapter
        want = model(ids).logits
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for saving an EVA adapter
    model.save_pretrained(tmp_path)
    for side in (lorakit, peft):
        loaded = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_eva_state_dict_missing_a_layer_keeps_its_default_init_with_a_warning():
    """PEFT re-initialises such a layer with init_lora_weights=True and warns; lorakit raised."""
    base = tiny_llama(seed=0)
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    state = get_eva_state_dict(model, _loader())
    missing = "base_model.model.model.layers.0.self_attn.v_proj"
    del state[missing]
    with pytest.warns(UserWarning, match="not found in the eva state_dict.*layers.0.self_attn.v_proj"):
        initialize_lora_eva_weights(model, eva_state_dict=state)
    config = model.peft_config["default"]
    assert "model.layers.0.self_attn.v_proj" in config.target_modules
    ad = model.get_submodule(missing).adapters["default"]
    assert ad.r == 4 and not ad.lora_B.weight.any() and ad.lora_A.weight.any()
