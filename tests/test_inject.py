"""Target matching (PEFT's rules), patterns, errors, and injection on a big meta-device model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.inject import find_targets, inject_adapter
from lorakit.layers import LoraLinear


def _targets(model, **kwargs) -> set[str]:
    return set(find_targets(model, lorakit.LoraConfig(**kwargs)))


def test_list_matches_exact_or_suffix(tiny_llama) -> None:
    got = _targets(tiny_llama, target_modules=["q_proj", "self_attn.v_proj"])
    assert got == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    # "proj" is not a suffix of "q_proj" at a dot boundary
    with pytest.raises(ValueError, match="matched no module"):
        inject_adapter(tiny_llama, lorakit.LoraConfig(target_modules=["proj"]), "a")


def test_regex_is_fullmatch(tiny_llama) -> None:
    assert _targets(tiny_llama, target_modules=r".*\.1\.mlp\.up_proj") == {"model.layers.1.mlp.up_proj"}
    assert _targets(tiny_llama, target_modules=r"up_proj") == set()


def test_all_linear_excludes_lm_head(tiny_llama) -> None:
    got = _targets(tiny_llama, target_modules="all-linear")
    assert "lm_head" not in got and len(got) == 14


def test_exclude_modules_and_layers_to_transform(tiny_llama) -> None:
    got = _targets(tiny_llama, target_modules="all-linear", exclude_modules=["down_proj"])
    assert not any(n.endswith("down_proj") for n in got) and len(got) == 12
    got = _targets(tiny_llama, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert got == {"model.layers.1.self_attn.q_proj"}
    assert _targets(tiny_llama, target_modules=["q_proj"], layers_to_transform=0) == {"model.layers.0.self_attn.q_proj"}


def test_empty_layers_to_transform_means_all_layers_as_peft(tiny_llama) -> None:
    import peft

    got = _targets(tiny_llama, target_modules=["q_proj"], layers_to_transform=[])
    assert got == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    theirs = peft.get_peft_model(tiny_llama, peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[]))
    assert {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")} == got


def test_default_targets_by_model_type(tiny_llama) -> None:
    got = _targets(tiny_llama)
    assert got == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_rank_and_alpha_pattern(tiny_llama) -> None:
    cfg = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 16},
    )
    model = lorakit.get_peft_model(tiny_llama, cfg)
    mods = dict(model.named_modules())
    q1 = mods["base_model.model.model.layers.1.self_attn.q_proj"].adapters["default"]
    q0 = mods["base_model.model.model.layers.0.self_attn.q_proj"].adapters["default"]
    v0 = mods["base_model.model.model.layers.0.self_attn.v_proj"].adapters["default"]
    assert (q1.r, q0.r, v0.r) == (2, 4, 4)
    assert (q1.scaling, q0.scaling, v0.scaling) == (4.0, 2.0, 4.0)


def test_unsupported_type_is_named(tiny_llama) -> None:
    with pytest.raises(ValueError, match=r"LlamaMLP.*supports only"):
        inject_adapter(tiny_llama, lorakit.LoraConfig(target_modules=["mlp"]), "a")
    # the failed call changed nothing
    assert not any(isinstance(m, LoraLinear) for m in tiny_llama.modules())


def test_modules_to_save_never_get_lora(tiny_llama) -> None:
    got = _targets(tiny_llama, target_modules="all-linear", modules_to_save=["mlp"])
    assert not any(".mlp." in n for n in got)


def test_second_adapter_reuses_wrappers(tiny_llama) -> None:
    model = lorakit.get_peft_model(tiny_llama, lorakit.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("other", lorakit.LoraConfig(target_modules="all-linear"))
    q = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    assert set(q.adapters) == {"default", "other"}
    assert not any(isinstance(m.base_layer, LoraLinear) for m in model.modules() if isinstance(m, LoraLinear))


def test_injection_on_meta_model_with_10k_linears() -> None:
    """10,240 targets on the meta device: injection works without allocating weights (speed: bench/)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(32))

    with torch.device("meta"):
        model = nn.Sequential(*[Block() for _ in range(320)])
    targets = inject_adapter(model, lorakit.LoraConfig(target_modules=r".*layers\.\d+"), "default")
    assert len(targets) == 10_240
    assert isinstance(model[319].layers[31], LoraLinear)
    assert model[0].layers[0].adapters["default"].lora_A.weight.is_meta
