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


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_hotswap_rejects_larger_rank_on_a_compiled_model(tmp_path, how):
    base = _base()
    _saved(base, tmp_path, "big", r=8)
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["0", "2"]))
    if how == "torch.compile":
        model = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
    with pytest.raises(ValueError, match="rank 8 > the loaded adapter's rank 4.*compiled.*prepare_model_for_compiled"):
        hotswap_adapter(model, tmp_path / "big", "default")


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("rank_pattern", [{}, {"2": 6}])
def test_hotswap_larger_rank_on_an_uncompiled_model_as_peft(tmp_path, use_rslora, rank_pattern):
    """PEFT swaps in a larger rank when the model is not compiled; so do we, and a save after the swap loads back
    (in lorakit and in PEFT) to the swapped adapter's outputs. (PEFT 0.21.2's own swap misses the file's
    rank_pattern in the scaling, so its outputs are compared only without one.)"""
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    base = _base().eval()
    x = torch.randn(4, 16)
    _saved(base, tmp_path, "small", r=4, lora_alpha=8, use_rslora=use_rslora)
    big = _saved(base, tmp_path, "big", r=8, lora_alpha=5, use_rslora=use_rslora, rank_pattern=rank_pattern)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small").eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small").eval()
    with torch.no_grad():
        want = big(x)
        assert (want - ours(x)).abs().max() > 1e-3
        hotswap_adapter(ours, tmp_path / "big", "default")
        peft_hotswap(theirs, str(tmp_path / "big"), "default")
        torch.testing.assert_close(ours(x), want, atol=TOL, rtol=TOL)
        if not rank_pattern:
            torch.testing.assert_close(theirs(x), want, atol=TOL, rtol=TOL)
    first = ours.base_model.model[0].adapters["default"]
    assert first.r == 8 and first.lora_A.weight.shape == (8, 16) and first.lora_B.weight.shape == (32, 8)
    assert ours.base_model.model[2].adapters["default"].r == rank_pattern.get("2", 8)
    ours.save_pretrained(tmp_path / "after")
    with torch.no_grad():
        back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "after").eval()
        torch.testing.assert_close(back(x), want, atol=TOL, rtol=TOL)
        peft_back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "after")).eval()
        torch.testing.assert_close(peft_back(x), want, atol=TOL, rtol=TOL)


def test_prepare_model_for_compiled_hotswap_then_a_larger_rank_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    from lorakit import prepare_model_for_compiled_hotswap

    base = _base().eval()
    x = torch.randn(4, 16)
    first = _saved(base, tmp_path, "one", r=2, lora_alpha=4)
    big = _saved(base, tmp_path, "big", r=8, lora_alpha=3)
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), first(x), atol=TOL, rtol=TOL)  # padding changes no output
    model.save_pretrained(tmp_path / "padded")  # rank 8 recorded with the alpha that keeps the scaling
    assert lorakit.LoraConfig.from_pretrained(tmp_path / "padded").r == 8
    with torch.no_grad():
        back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "padded").eval()
        torch.testing.assert_close(back(x), first(x), atol=TOL, rtol=TOL)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)
        frames = counters["stats"]["unique_graphs"]
        hotswap_adapter(compiled, tmp_path / "big", "default")
        got = compiled(x)
    assert counters["stats"]["unique_graphs"] == frames and not counters["recompiles"]
    with torch.no_grad():
        torch.testing.assert_close(got, big(x), atol=TOL, rtol=TOL)


def test_prepare_model_for_compiled_hotswap_errors(tmp_path):
    from lorakit import prepare_model_for_compiled_hotswap

    base = _base()
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="target_rank=2 is below the rank 4"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match="target_rank=0 is invalid"):
        prepare_model_for_compiled_hotswap(model, target_rank=0)
    with pytest.raises(ValueError, match="check_compiled='maybe' is invalid"):
        prepare_model_for_compiled_hotswap(model, target_rank=4, check_compiled="maybe")
    with pytest.raises(ValueError, match="no LoRA layers"):
        prepare_model_for_compiled_hotswap(base, target_rank=4)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before compiling"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="before compiling"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    assert model.base_model.model[0].adapters["default"].r == 8
    other = lorakit.LoraConfig(r=4, rank_pattern={"0": 2})
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=other)  # PEFT: the configs get the rank
    assert other.r == 8 and other.rank_pattern == {"0": 8}


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
    model.compile(backend="eager")  # compiled: a larger rank is refused
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


def test_larger_rank_swap_grows_embeddings_and_serves_mixed_batches(tmp_path):
    """An embedding adapter grows too, and a mixed batch after the swap (its factor stacks built from ``r``)
    gives each row its adapter's output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64,
    )
    base = LlamaForCausalLM(cfg).eval()
    kw = dict(target_modules=["embed_tokens", "q_proj", "v_proj"], init_lora_weights=False)
    for name, r in (("small", 2), ("big", 6)):
        torch.manual_seed(r)
        lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=r, **kw)).save_pretrained(tmp_path / name)
    ids = torch.randint(0, 64, (4, 5))
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small").eval()
    model.load_adapter(tmp_path / "small", adapter_name="other")
    hotswap_adapter(model, tmp_path / "big", "default")
    want = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "big").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits, atol=TOL, rtol=TOL)
        rows = ["default", "other", "__base__", "default"]
        mixed = model(input_ids=ids, adapter_names=rows).logits
        for i, row in enumerate(rows):
            if row == "__base__":
                with model.disable_adapter():
                    single = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(row)
                single = model(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], single, atol=TOL, rtol=TOL)
    assert model.base_model.model.model.embed_tokens.adapters["default"].lora_embedding_A.shape == (6, 64)
