"""``add_weighted_adapter`` edge cases found by a sweep against PEFT 0.21.2: an adapter listed twice, and an
``svd_rank`` above a layer's smaller dimension."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.merge.combine import COMBINATION_TYPES
from tests.variants.common import tiny_llama

#: fp32, same factors and float ops on both sides (the svd types: the same LAPACK SVD of identical deltas).
TOL = 1e-5


def _pair(tmp_path):
    """PEFT and lorakit models holding the same adapters ``a`` (r=4) and ``b`` (r=2, lora_alpha=4), B != 0."""
    base = tiny_llama(seed=0)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**{**kw, "r": 2, "lora_alpha": 4}))
    pm.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", "b")
    return pm.eval(), ours.eval()


def _logits(model, name, ids):
    model.set_adapter(name)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_an_adapter_listed_twice_equals_peft(tmp_path, combination_type):
    """PEFT counts each listed adapter (``cat``: ranks 4 + 4); lorakit counted distinct names and crashed."""
    pm, ours = _pair(tmp_path)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(combination_type=combination_type, density=0.5)
    for model in (pm, ours):
        torch.manual_seed(2)
        model.add_weighted_adapter(["a", "a"], [0.6, 0.3], "twice", **kwargs)
    torch.testing.assert_close(_logits(ours, "twice", ids), _logits(pm, "twice", ids), atol=TOL, rtol=TOL)
    if combination_type == "cat":  # exact: (0.6 + 0.3) dW_a
        for model in (pm, ours):
            model.add_weighted_adapter(["a"], [0.9], "once", combination_type="cat")
        torch.testing.assert_close(_logits(ours, "twice", ids), _logits(ours, "once", ids), atol=TOL, rtol=TOL)


def test_svd_rank_above_a_layers_dimension_is_exact_with_zero_padding(tmp_path):
    """q_proj is (32, 32) and v_proj (16, 32) here: svd_rank=40 keeps every singular triplet and pads A and B
    with zeros, so the combined delta is the weighted sum itself. PEFT crashes in the forward (mat1 and mat2 shapes
    cannot be multiplied); lorakit did too."""
    _, ours = _pair(tmp_path)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "svd40", combination_type="svd", svd_rank=40)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "cat", combination_type="cat")  # exact reference
    assert ours.peft_config["svd40"].r == 40
    torch.testing.assert_close(_logits(ours, "svd40", ids), _logits(ours, "cat", ids), atol=TOL, rtol=TOL)
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj.adapters["svd40"]
    assert layer.lora_A.weight.shape == (40, 32) and layer.lora_B.weight.shape == (16, 40)
    assert not layer.lora_A.weight[16:].any() and not layer.lora_B.weight[:, 16:].any()


def _pattern_pair(tmp_path, pattern_b):
    """``a``: r=4 with q_proj at 6; ``b``: r=6 with ``pattern_b``; the largest rank of both is 6."""
    base = tiny_llama(seed=0)
    kw = dict(lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, rank_pattern={"q_proj": 6}, **kw), "a")
    pm.add_adapter("b", peft.LoraConfig(r=6, rank_pattern=pattern_b, **kw))
    pm.save_pretrained(tmp_path / "src")
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "src" / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "src" / "b", "b")
    return base, pm.eval(), ours.eval()


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_equal_rank_types_over_rank_patterns_save_load_and_mix(tmp_path, combination_type):
    """Per module the ranks agree (q_proj 6 and 6, v_proj 4 and 4) but the new config says r=6 everywhere: the
    v_proj factors were (4, in), so the saved adapter did not load (in PEFT neither: it saves the same file) and a
    mixed batch crashed. They are now zero-padded to r=6 (exact: zero rows of A and columns of B add nothing)."""
    base, pm, ours = _pattern_pair(tmp_path, {"v_proj": 4})
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    for model in (pm, ours):
        torch.manual_seed(2)
        model.add_weighted_adapter(["a", "b"], [0.6, 0.5], "new", combination_type=combination_type, density=0.5)
    want = _logits(pm, "new", ids)
    torch.testing.assert_close(_logits(ours, "new", ids), want, atol=TOL, rtol=TOL)
    ours.save_pretrained(tmp_path / "out", selected_adapters=["new"])
    for side in (lorakit, peft):
        loaded = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out" / "new").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, atol=TOL, rtol=TOL)
    with torch.no_grad():
        mixed = ours(ids, adapter_names=["new", "a"]).logits
    torch.testing.assert_close(mixed[:1], want[:1], atol=TOL, rtol=TOL)
    torch.testing.assert_close(mixed[1:], _logits(ours, "a", ids)[1:], atol=TOL, rtol=TOL)


def test_equal_rank_types_name_the_module_whose_ranks_differ(tmp_path):
    """Same largest rank (6) but q_proj is 6 in ``a`` and 4 in ``b``: PEFT and lorakit crashed in torch.stack."""
    _, _, ours = _pattern_pair(tmp_path, {"q_proj": 4})
    with pytest.raises(ValueError, match=r"equal rank at each module.*q_proj.*'a': r=6, 'b': r=4"):
        ours.add_weighted_adapter(["a", "b"], [0.6, 0.5], "new", combination_type="linear")
    assert "new" not in ours.peft_config  # nothing added
