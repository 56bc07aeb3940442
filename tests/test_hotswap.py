"""``hotswap_adapter``: in-place swap under ``torch.compile`` without recompiling (dynamo's frame counters), outputs
of the new adapter (smaller rank zero-padded, other scaling folded into B), and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.hotswap import hotswap_adapter

TOL = 1e-5


def _base():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _saved(base, tmp_path, name, **kw):
    cfg = lorakit.LoraConfig(target_modules=["0", "2"], init_lora_weights=False, **kw)
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    model.save_pretrained(tmp_path / name)
    return model


def test_hotswap_compiled_no_recompile(tmp_path):
    from torch._dynamo.utils import counters

    base = _base().eval()
    x = torch.randn(4, 16)
    first = _saved(base, tmp_path, "one", r=4, lora_alpha=8)
    second = _saved(base, tmp_path, "two", r=2, lora_alpha=3)  # smaller rank, other scaling
    with torch.no_grad():
        want = second(x)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), first(x), atol=TOL, rtol=TOL)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1  # it was compiled
        hotswap_adapter(compiled, tmp_path / "two", "default")
        got = compiled(x)
    assert counters["stats"]["unique_graphs"] == frames  # no recompilation
    assert not counters["recompiles"]
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert (got - first(x)).abs().max() > 1e-3


def test_hotswap_rejects_larger_rank(tmp_path):
    base = _base()
    _saved(base, tmp_path, "big", r=8)
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="rank 8 > the loaded adapter's rank 4"):
        hotswap_adapter(model, tmp_path / "big", "default")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hotswap_refuses_merged_adapter_and_changes_nothing(tmp_path):
    base = _base()
    _saved(base, tmp_path, "one", r=4)
    _saved(base, tmp_path, "two", r=4)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one")
    model.merge_adapter()
    before = _params(model)
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        hotswap_adapter(model, tmp_path / "two", "default")
    assert _unchanged(model, before)


def test_failed_hotswap_changes_nothing(tmp_path):
    base = _base()
    _saved(base, tmp_path, "one", r=4)
    _saved(base, tmp_path, "big", r=4, rank_pattern={"2": 8})  # the last module does not fit
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one")
    before = _params(model)
    with pytest.raises(ValueError, match="rank 8 > the loaded adapter's rank 4"):
        hotswap_adapter(model, tmp_path / "big", "default")
    assert _unchanged(model, before)


def test_hotswap_subset_zeroes_other_modules_as_peft(tmp_path):
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    base = _base().eval()
    x = torch.randn(4, 16)
    _saved(base, tmp_path, "both", r=4)
    subset = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(target_modules=["0"], r=4, init_lora_weights=False)
    )
    subset.save_pretrained(tmp_path / "first")
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both").eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both").eval()
    hotswap_adapter(ours, tmp_path / "first", "default")
    peft_hotswap(theirs, str(tmp_path / "first"), "default")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), subset(x), atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours(x), theirs(x), atol=TOL, rtol=TOL)


def test_hotswap_subset_dora_zeroed_module_computes_base(tmp_path):
    base = _base().eval()
    x = torch.randn(4, 32)
    _saved(base, tmp_path, "both", r=4, use_dora=True)
    cfg = lorakit.LoraConfig(target_modules=["0"], r=4, init_lora_weights=False, use_dora=True)
    lorakit.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / "first")
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both").eval()
    hotswap_adapter(model, tmp_path / "first", "default")
    with torch.no_grad():
        layer = model.base_model.model[2]
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=TOL, rtol=TOL)
