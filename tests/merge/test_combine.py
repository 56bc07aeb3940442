"""``add_weighted_adapter`` against PEFT's for every combination type (seeded where random).

Both sides start from the same three adapters (B != 0, copied through a saved folder), combine them, and the new
adapter's A and B must agree to 1e-5 (fp32, same float ops; SVD on identical inputs with the same LAPACK).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.merge.combine import COMBINATION_TYPES
from tests.variants.common import tiny_llama

TOL = 1e-5
TYPES = COMBINATION_TYPES


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tiny_llama(seed=0)
    folder = tmp_path_factory.mktemp("adapters")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**{**kw, "lora_alpha": 4}))
    pm.add_adapter("c", peft.LoraConfig(**{**kw, "r": 2}))
    pm.save_pretrained(folder, save_embedding_layers=False)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), folder / "a", adapter_name="a")
    ours.load_adapter(folder / "b", "b")
    ours.load_adapter(folder / "c", "c")
    return pm, ours


def _factors(model, name, lorakit_side):
    out = {}
    for key, p in model.named_parameters():
        if f".{name}." in key or key.endswith(f".{name}"):
            k = key.replace(f".adapters.{name}.", ".") if lorakit_side else key.replace(f".{name}", "")
            out[k] = p.detach()
    return out


@pytest.mark.parametrize("combination_type", TYPES)
def test_add_weighted_adapter_equals_peft(pair, combination_type):
    pm, ours = pair
    new = f"m_{combination_type}"
    kwargs = dict(combination_type=combination_type, density=0.5)
    if combination_type.endswith("svd"):
        kwargs["svd_rank"] = 3
    torch.manual_seed(1)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], new, **kwargs)
    torch.manual_seed(1)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], new, **kwargs)
    want = _factors(pm, new, False)
    got = _factors(ours, new, True)
    assert set(got) == set(want) and got
    for key in want:
        assert want[key].abs().max() > 0
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL, msg=key)
    assert not any(p.requires_grad for p in got.values())
    assert ours.peft_config[new].r == pm.peft_config[new].r


def test_cat_and_svd_of_different_ranks_are_exact(pair):
    """cat: B A = sum_i w_i s_i B_i A_i exactly; svd at full rank (r_a + r_c) reproduces it too."""
    _, ours = pair
    ours.add_weighted_adapter(["a", "c"], [1.0, 0.5], "cat_ac", combination_type="cat")
    ours.add_weighted_adapter(["a", "c"], [1.0, 0.5], "svd_ac", combination_type="svd", svd_rank=6)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.adapters["a"].delta_weight() + 0.5 * layer.adapters["c"].delta_weight()
    torch.testing.assert_close(layer.adapters["cat_ac"].delta_weight(), want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.adapters["svd_ac"].delta_weight(), want, atol=1e-4, rtol=1e-4)


def test_unequal_ranks_error_names_adapters_and_ranks(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"'a': r=4, 'c': r=2"):
        ours.add_weighted_adapter(["a", "c"], [1.0, 1.0], "bad", combination_type="linear")
    assert "bad" not in ours.peft_config


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_rslora_sources_combine_to_the_delta_the_formulas_give(combination_type):
    """The new adapter has scaling 1 (use_rslora off): combining one rsLoRA adapter at weight 1 reproduces its
    delta (PEFT 0.21.2's own call keeps use_rslora and scales the result by sqrt(new_rank): peft#3761)."""
    model = lorakit.get_peft_model(
        tiny_llama(seed=0),
        lorakit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False),
    )
    kwargs = {"svd_rank": 4} if combination_type == "svd" else {}
    model.add_weighted_adapter(["default"], [1.0], "one", combination_type=combination_type, **kwargs)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert model.peft_config["one"].use_rslora is False and layer.adapters["one"].scaling == 1.0
    torch.testing.assert_close(
        layer.adapters["one"].delta_weight(), layer.adapters["default"].delta_weight(), atol=1e-5, rtol=1e-5
    )
