"""``add_weighted_adapter`` with DoRA adapters against PEFT 0.21.2.

PEFT combines only A and B; the new adapter takes the first adapter's config (``use_dora`` and
``init_lora_weights`` included) and keeps the magnitude its injection gave it, ``||W + s B_0 A_0||_c`` with the
init's ``B_0`` (``||W||_c`` for the default init), whatever the sources' trained magnitudes (huggingface/peft#3761).
lorakit does the same and warns. The sources use ``init_lora_weights=False`` (B != 0; lorakit draws that init from
torch's RNG in PEFT's order, so a seeded call gives the new adapter the same B_0 A_0, hence the same magnitude, and the
same DARE masks) and perturbed magnitudes (``m != ||W + sBA||_c``): a combination that used the sources' magnitudes
would fail. Tolerance 1e-5 (fp32, same float ops; SVD on identical inputs with the same LAPACK; our DoRA norm is
computed by expansion, a ~1e-7 relative difference, see tests/variants/test_dora.py).
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
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tiny_llama(seed=0)
    folder = tmp_path_factory.mktemp("dora_adapters")
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**{**kw, "lora_alpha": 4}))
    pm.add_adapter("c", peft.LoraConfig(**{**kw, "r": 2}))
    pm.add_adapter("p", peft.LoraConfig(**{**kw, "use_dora": False}))  # plain LoRA, for mixing
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    pm.save_pretrained(folder, save_embedding_layers=False)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), folder / "a", adapter_name="a")
    for name in ("b", "c", "p"):
        ours.load_adapter(folder / name, name)
    return pm, ours


def _tensors(model, name, lorakit_side):
    """The new adapter's A, B and magnitude under one naming: ``<module>.lora_A.weight`` etc."""
    out = {}
    for key, p in model.named_parameters():
        if lorakit_side and f".adapters.{name}." in key:
            out[key.replace(f".adapters.{name}.", ".")] = p.detach()
        elif not lorakit_side and (f".{name}." in key or key.endswith(f".{name}")):
            key = key.replace(f".{name}", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            out[key] = p.detach()
    return out


def _logits(model, adapter, ids):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("combination_type", TYPES)
def test_dora_add_weighted_adapter_equals_peft(pair, combination_type):
    pm, ours = pair
    new = f"d_{combination_type}"
    kwargs = dict(combination_type=combination_type, density=0.5)
    if combination_type.endswith("svd"):
        kwargs["svd_rank"] = 3
    torch.manual_seed(2)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], new, **kwargs)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=r"DoRA.*lora_magnitude_vector.*peft#3761"):
        ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], new, **kwargs)
    want, got = _tensors(pm, new, False), _tensors(ours, new, True)
    assert set(got) == set(want) and sum("lora_magnitude_vector" in k for k in got) == len(TARGETS)
    for key in want:
        assert want[key].abs().max() > 0
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL, msg=key)
    assert not any(p.requires_grad for p in got.values())
    assert ours.peft_config[new].use_dora and ours.peft_config[new].r == pm.peft_config[new].r
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(ours, new, ids), _logits(pm, new, ids), atol=TOL, rtol=TOL)


def test_dora_magnitude_is_the_injection_norm_not_the_sources():
    """Default init: the new magnitude is ||W||_c (B_0 = 0), so one "trained" adapter combined at weight 1 has the
    same delta but not the same outputs (PEFT's behaviour, checked against PEFT above)."""
    model = lorakit.get_peft_model(
        tiny_llama(seed=0), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.rand_like(p))  # "trained": B != 0, m moved
    with pytest.warns(UserWarning, match="re-initialises"):
        model.add_weighted_adapter(["default"], [1.0], "id", combination_type="cat")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    norm_w = torch.linalg.vector_norm(layer.base_layer.weight, dim=1)  # (out,)
    torch.testing.assert_close(layer.adapters["id"].lora_magnitude_vector, norm_w, atol=TOL, rtol=TOL)
    assert (layer.adapters["default"].lora_magnitude_vector - norm_w).abs().max() > 1e-2
    torch.testing.assert_close(layer.adapters["id"].delta_weight(), layer.adapters["default"].delta_weight())
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    assert (_logits(model, "id", ids) - _logits(model, "default", ids)).abs().max() > 1e-3


@pytest.mark.parametrize("order", [("a", "p"), ("p", "a")])
def test_mixed_dora_and_plain_follow_the_first_adapter(pair, order):
    """The first adapter's use_dora decides, as in PEFT: DoRA first -> a DoRA adapter; plain first -> plain LoRA
    (the DoRA source's magnitude is dropped). Same tensors and logits as PEFT either way."""
    pm, ours = pair
    new = "mix_" + "_".join(order)
    torch.manual_seed(6)  # the new adapter's random init (init_lora_weights=False) gives its magnitude
    pm.add_weighted_adapter(list(order), [0.6, 0.5], new, combination_type="cat")
    torch.manual_seed(6)
    with pytest.warns(UserWarning, match="plain LoRA without" if order[0] == "p" else "re-initialises"):
        ours.add_weighted_adapter(list(order), [0.6, 0.5], new, combination_type="cat")
    assert ours.peft_config[new].use_dora is (order[0] == "a")
    want, got = _tensors(pm, new, False), _tensors(ours, new, True)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=TOL, msg=key)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(ours, new, ids), _logits(pm, new, ids), atol=TOL, rtol=TOL)
