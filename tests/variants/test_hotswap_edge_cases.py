"""``hotswap_adapter`` edge cases found by a sweep against PEFT 0.21.2."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit

from .common import tiny_llama


def test_hotswap_into_an_unknown_adapter_names_the_available_ones(tmp_path):
    """PEFT raises (unexpected keys); lorakit raised a bare KeyError: 'nope'."""
    base = tiny_llama(seed=0)
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    lorakit.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no adapter 'nope'; available: \['default'\]"):
        lorakit.hotswap_adapter(model, tmp_path, "nope")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _embedding_adapters(tmp_path):
    """Two adapters on embed_tokens + q_proj saved with the defaults, which write the embedding's base weight
    (``save_embedding_layers="auto"``, as PEFT)."""
    base = tiny_llama(seed=0)
    for seed, (name, r, alpha) in enumerate([("one", 4, 8), ("two", 2, 3)]):
        torch.manual_seed(seed)
        cfg = lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=["embed_tokens", "q_proj"],
                                 init_lora_weights=False)
        with pytest.warns(UserWarning, match="save_embedding_layers='auto'"):
            lorakit.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / name)
    return base


def test_hotswap_an_adapter_saved_with_the_embedding_base_weight(tmp_path):
    """The file's embedding base weight equals the model's, so it is not an adapter weight to swap: lorakit raised
    (the file has weights the model's adapter lacks), PEFT raises a KeyError."""
    base = _embedding_adapters(tmp_path)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    lorakit.hotswap_adapter(model, tmp_path / "two", "default")
    fresh = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "two").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=1e-5, rtol=1e-5)


def test_hotswap_refuses_an_embedding_base_weight_that_differs(tmp_path):
    """A file whose embedding base weight differs (a resized or retrained vocabulary) needs that weight: hotswap
    swaps adapter weights only, so it refuses and changes nothing."""
    base = _embedding_adapters(tmp_path)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one")
    with torch.no_grad():
        model.get_input_embeddings().base_layer.weight.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="embedding base weight.*differs from the model's"):
        lorakit.hotswap_adapter(model, tmp_path / "two", "default")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
