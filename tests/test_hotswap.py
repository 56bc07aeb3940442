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
