"""LoRA adapters and wrappers: the forward formula, dtypes, merging (idempotent, exact), Conv1D and Embedding."""

from __future__ import annotations

import gc
import warnings
import weakref

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, get_peft_model
from lorakit.config import AdapterSpec
from lorakit.layers import LoraEmbedding, LoraLinear, check_adapter_name

from .conftest import make_tiny_llama


def _linear_wrapper(bias: bool = True, lora_bias: bool = False, dropout: float = 0.0) -> LoraLinear:
    base = nn.Linear(6, 5, bias=bias)
    w = LoraLinear(base, 6, 5, fan_in_fan_out=False)
    spec = AdapterSpec(r=3, lora_alpha=6, lora_dropout=dropout, lora_bias=lora_bias, init_lora_weights=False)
    w.add_adapter("a", spec)
    w.set_active(["a"])
    return w


def test_forward_formula() -> None:
    w = _linear_wrapper()
    x = torch.randn(4, 6)
    ad = w.adapters["a"]
    expected = w.base_layer(x) + (x @ ad.lora_A.weight.T @ ad.lora_B.weight.T) * 2.0  # scaling = 6 / 3
    torch.testing.assert_close(w(x), expected)
    assert (w(x) - w.base_layer(x)).abs().max() > 1e-3


def test_rslora_scaling_used() -> None:
    base = nn.Linear(4, 4)
    w = LoraLinear(base, 4, 4, fan_in_fan_out=False)
    assert w.add_adapter("a", AdapterSpec(r=16, lora_alpha=8, use_rslora=True)).scaling == 2.0


def test_default_init_is_identity_and_gaussian() -> None:
    w = LoraLinear(nn.Linear(6, 5), 6, 5, fan_in_fan_out=False)
    ad = w.add_adapter("a", AdapterSpec(r=4, lora_alpha=4))
    assert torch.count_nonzero(ad.lora_B.weight) == 0 and torch.count_nonzero(ad.lora_A.weight) > 0
    g = w.add_adapter("g", AdapterSpec(r=4, lora_alpha=4, init_lora_weights="gaussian"))
    assert torch.count_nonzero(g.lora_B.weight) == 0
    assert abs(g.lora_A.weight.std().item() - 0.25) < 0.15  # N(0, 1/r), r = 4; 24 samples


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merge_equals_unmerged_and_is_idempotent(bias: bool, lora_bias: bool) -> None:
    w = _linear_wrapper(bias=bias, lora_bias=lora_bias)
    if lora_bias and not bias:  # lora_B's bias has no base bias to merge into: refused, weight untouched
        w0 = w.base_layer.weight.detach().clone()
        with pytest.raises(ValueError, match="no bias to merge it into"):
            w.merge()
        assert w.merged_adapters == []
        torch.testing.assert_close(w.base_layer.weight, w0)
        return
    if lora_bias:
        nn.init.normal_(w.adapters["a"].lora_B.bias)
    x = torch.randn(4, 6)
    before = w(x)
    w0 = w.base_layer.weight.detach().clone()
    w.merge()
    torch.testing.assert_close(w(x), before, atol=1e-6, rtol=0)
    w.merge()  # twice: nothing changes
    torch.testing.assert_close(w(x), before, atol=1e-6, rtol=0)
    assert w.merged_adapters == ["a"]
    w.unmerge()
    torch.testing.assert_close(w.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(w(x), before, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite() -> None:
    w = _linear_wrapper()
    with torch.no_grad():
        w.adapters["a"].lora_B.weight[0, 0] = float("inf")
    w0 = w.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        w.merge(safe_merge=True)
    torch.testing.assert_close(w.base_layer.weight, w0)


def test_conv1d_fan_in_fan_out() -> None:
    base = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs; weight (6, 5)
    nn.init.normal_(base.weight)
    w = LoraLinear(base, 6, 5, fan_in_fan_out=True)
    w.add_adapter("a", AdapterSpec(r=2, lora_alpha=4, init_lora_weights=False))
    w.set_active(["a"])
    x = torch.randn(3, 6)
    out = w(x)
    ad = w.adapters["a"]
    torch.testing.assert_close(out, base(x) + 2.0 * (x @ ad.lora_A.weight.T @ ad.lora_B.weight.T))
    w.merge()
    torch.testing.assert_close(w(x), out, atol=1e-5, rtol=0)


def test_embedding_adapter_and_merge() -> None:
    base = nn.Embedding(11, 4, padding_idx=0)
    w = LoraEmbedding(base)
    ad = w.add_adapter("a", AdapterSpec(r=2, lora_alpha=2, init_lora_weights=False))
    w.set_active(["a"])
    ids = torch.tensor([[1, 2, 3, 0]])
    out = w(ids)
    expected = base(ids) + ad.lora_embedding_A.T[ids] @ ad.lora_embedding_B.T
    torch.testing.assert_close(out, expected)
    w.merge()
    torch.testing.assert_close(w(ids), out, atol=1e-5, rtol=0)


def test_adapters_keep_fp32_over_bf16_base_and_autocast() -> None:
    base = nn.Linear(8, 8).to(torch.bfloat16)
    w = LoraLinear(base, 8, 8, fan_in_fan_out=False)
    ad = w.add_adapter("a", AdapterSpec(r=2, lora_alpha=2, init_lora_weights=False))
    w.set_active(["a"])
    assert ad.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert w(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = w(x.float())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ad.lora_A.weight.grad is not None and ad.lora_A.weight.grad.dtype == torch.float32


def test_no_input_copy_without_dropout() -> None:
    """With dropout 0 the adapter sees the very tensor the base sees (no copy)."""
    w = _linear_wrapper(dropout=0.0)
    seen = []
    w.adapters["a"].lora_A.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 6)
    w(x)
    assert seen[0] is x


def test_disabled_and_inactive_return_base() -> None:
    w = _linear_wrapper()
    x = torch.randn(2, 6)
    w.disabled = True
    torch.testing.assert_close(w(x), w.base_layer(x))
    w.disabled = False
    w.set_active([])
    torch.testing.assert_close(w(x), w.base_layer(x))


@pytest.mark.parametrize("name", ["", "a.b", "lora_A", "base_layer", "adapters", "__base__", "weight"])
def test_reserved_adapter_names_rejected(name: str) -> None:
    """The LoRA part names stay refused although PEFT takes them: PEFT 0.21.2 then writes broken files (a first
    adapter with bias='lora_only' beside one named 'lora_A' is saved without its lora_A weights)."""
    with pytest.raises(ValueError, match="adapter_name"):
        check_adapter_name(name)


def _prefix_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "should not be contained in the prefix" in str(w.message)]


@pytest.mark.parametrize("name", ["lora_x", "lora_adapter", "lora"])
def test_names_with_lora_warn_only_where_peft_does_and_round_trip(tmp_path, name) -> None:
    """PEFT 0.21.2 takes any name; it warns (get_peft_model, add_adapter, load_adapter of a new adapter) only for one
    contained in its key prefix 'lora_' (``adapter_name in prefix``): 'lora' warns, 'lora_x' does not."""
    cfg = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    seen, models = {}, {}
    for lib in (lorakit, peft):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model = lib.get_peft_model(make_tiny_llama(), lib.LoraConfig(**cfg), adapter_name=name)
            on_create = _prefix_warnings(record)
            other = lib.get_peft_model(make_tiny_llama(), lib.LoraConfig(**cfg))
            other.add_adapter(name, lib.LoraConfig(**cfg))
            on_add = _prefix_warnings(record)[len(on_create):]
            model.save_pretrained(tmp_path / lib.__name__)
            folder = tmp_path / lib.__name__ / name
            before = len(_prefix_warnings(record))
            lib.PeftModel.from_pretrained(make_tiny_llama(), folder, adapter_name=name)  # PEFT: no warning here
            loaded = lib.PeftModel.from_pretrained(make_tiny_llama(), folder, adapter_name="default")
            loaded.load_adapter(folder, adapter_name=name)
            loaded.set_adapter(name)
            on_load = _prefix_warnings(record)[before:]
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        seen[lib.__name__] = (on_create, on_add, on_load)
        models[lib.__name__] = model
    assert seen["lorakit"] == seen["peft"]
    assert seen["lorakit"][0] == ([] if name.startswith("lora_") else [
        f"Adapter name '{name}' should not be contained in the prefix 'lora_'. This may lead to reinitialization of "
        "the adapter weights during loading."
    ])
    for lib, other in (("lorakit", peft), ("peft", lorakit)):  # each library's folder loads in the other
        reloaded = other.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / lib / name, adapter_name=name)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, models[lib](input_ids=ids).logits)


def test_delete_adapter_frees_what_mixed_batches_kept(input_ids) -> None:
    """A mixed-batch call keeps nothing on the wrappers (its stacked factors are dropped with the call), so
    delete_adapter frees the deleted adapter's tensors."""
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_tiny_llama(hidden=64), cfg, adapter_name="a").eval()
    model.add_adapter("b", cfg)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = set(q.__dict__)
    with torch.no_grad():
        model(input_ids=input_ids[:2], adapter_names=["a", "b"])
    assert set(q.__dict__) == before
    deleted = weakref.ref(q.adapters["b"].lora_A.weight)
    model.delete_adapter("b")
    gc.collect()
    assert deleted() is None
