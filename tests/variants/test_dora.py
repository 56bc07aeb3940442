"""DoRA (``use_dora=True``) against PEFT's DoRA: Linear, GPT-2 Conv1D and Embedding bases.

Weights cross through saved folders both ways (PEFT save -> lorakit load, lorakit save -> PEFT load) and the
logits must agree to 1e-5 (fp32; same float ops up to summation order, and our norm is computed by expansion
``||W||^2 + 2s<WA^T, B> + s^2 B(AA^T)B^T`` instead of ``||W + sBA||``, a ~1e-7 relative difference). B != 0
(``init_lora_weights=False``) and the magnitude is perturbed, so DoRA's rescaling is visible in the outputs.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import lorakit
from lorakit.variants.dora import dora_row_norm

TOL = 1e-5


def _llama():
    cfg = tf.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaForCausalLM(cfg)


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=4, n_positions=32))


CASES = {
    "linear": (_llama, ["q_proj", "v_proj", "down_proj"]),
    "conv1d": (_gpt2, ["c_attn", "c_fc"]),
    "embedding": (_llama, ["embed_tokens", "o_proj"]),
}


def _perturb_magnitudes(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))


def _ids() -> torch.Tensor:
    return torch.randint(0, 61, (2, 7))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_parity_both_ways(case, tmp_path):
    build, targets = CASES[case]
    base = build().eval()
    ids = _ids()
    with torch.no_grad():
        plain = base(ids).logits
    kw = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    _perturb_magnitudes(pm)
    with torch.no_grad():
        want = pm(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the outputs
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)  # PEFT adds the full embedding

    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)

    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=False)  # the same choice as above
    from safetensors.torch import load_file

    theirs_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == theirs_keys
    assert any(k.endswith(".lora_magnitude_vector") for k in ours_keys)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=TOL, rtol=TOL)


def test_dora_init_magnitude_equals_peft():
    base = _gpt2()
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    wrapper = ours.base_model.model.transformer.h[0].attn.c_attn
    adapter = wrapper.adapters["default"]
    with torch.no_grad():
        adapter.lora_A.weight.copy_(layer.lora_A["default"].weight)
        adapter.lora_B.weight.copy_(layer.lora_B["default"].weight)
    adapter.init_magnitude(wrapper)
    want = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(adapter.lora_magnitude_vector, want, atol=TOL, rtol=TOL)


def test_row_norm_expansion_equals_direct_norm():
    w = torch.randn(24, 16)
    a, b = torch.randn(3, 16), torch.randn(24, 3)
    want = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.7, transposed=False), want)
    torch.testing.assert_close(dora_row_norm(w.T.contiguous(), a, b, 0.7, transposed=True), want)


def test_dora_gradients_equal_peft():
    """Training step, dropout 0: gradients of A, B and the magnitude equal PEFT's (norm detached on both)."""
    base = _llama()
    ids = _ids()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    _perturb_magnitudes(pm)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    theirs = {k.replace(".default", ""): v for k, v in pm.named_parameters() if v.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in mine.items():
            key = name.replace(".adapters.default.lora_magnitude_vector", ".lora_magnitude_vector.weight")
            key = key.replace(".adapters.default.", ".")
            p.copy_(theirs[key])
    pm.train()
    ours.train()
    pm(ids, labels=ids).loss.backward()
    ours(ids, labels=ids).loss.backward()
    for name, p in mine.items():
        key = name.replace(".adapters.default.lora_magnitude_vector", ".lora_magnitude_vector.weight")
        key = key.replace(".adapters.default.", ".")
        torch.testing.assert_close(p.grad, theirs[key].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_merge_equals_unmerged_and_unmerge_restores(case):
    build, targets = CASES[case]
    base = build().eval()
    ids = _ids()
    kw = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw)).eval()
    _perturb_magnitudes(ours)
    weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = ours(ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=1e-4)
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=1e-5)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dora", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("together", [True, False])
def test_merging_several_adapters_with_dora_equals_unmerged_and_peft(case, dora, together, tmp_path):
    """Two adapters active on the same layers, at least one DoRA, merged in one call or one after the other: a
    DoRA adapter merged after another takes its norm on the un-merged weight, as its forward does, so the merged
    model equals the unmerged one and PEFT's merged one (the same adapters, saved and loaded); unmerging restores
    the base weights."""
    build, targets = CASES[case]
    base = build().eval()
    ids = _ids()
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(use_dora=dora[0], **kw)).eval()
    ours.add_adapter("b", lorakit.LoraConfig(use_dora=dora[1], **kw))
    _perturb_magnitudes(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", "b")
    models = (ours, theirs)
    for model in models:
        model.base_model.set_adapter(["default", "b"])
    weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, want, atol=TOL, rtol=TOL)
        for model in models:
            if together:
                model.base_model.merge_adapter(["default", "b"])
            else:
                model.base_model.merge_adapter(["default"])
                model.base_model.merge_adapter(["b"])
        torch.testing.assert_close(ours(ids).logits, want, atol=TOL, rtol=TOL)
        torch.testing.assert_close(theirs(ids).logits, want, atol=TOL, rtol=TOL)
        ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=TOL, rtol=TOL, msg=n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_forward_with_an_earlier_adapter_merged_equals_unmerged(case):
    """LoRA "a" then DoRA "b" active on the same layers, "a" merged: b's norm is still taken on the un-merged base
    weight, so the outputs are those of the unmerged model (PEFT takes it on the merged weight)."""
    build, targets = CASES[case]
    base = build().eval()
    ids = _ids()
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw), adapter_name="a").eval()
    model.add_adapter("b", lorakit.LoraConfig(use_dora=True, **kw))
    _perturb_magnitudes(model)
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        want = model(ids).logits
        model.base_model.merge_adapter(["a"])
        torch.testing.assert_close(model(ids).logits, want, atol=TOL, rtol=TOL)


def test_dora_dropout_runs_base_once_and_matches_expectation():
    """With dropout in training, y = g * (W x + s B A d(x)) + b; in eval it equals the dropout-free output."""
    lin = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(lin)
    cfg = lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True, lora_dropout=0.5, init_lora_weights=False)
    pm = lorakit.get_peft_model(model, cfg)
    calls = []
    pm.base_model.model[0].base_layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(5, 16)
    pm.train()
    pm(x).sum().backward()
    assert len(calls) == 1
    pm.eval()
    wrapper = pm.base_model.model[0]
    adapter = wrapper.adapters["default"]
    with torch.no_grad():
        w = lin.weight + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
        g = adapter.lora_magnitude_vector / torch.linalg.norm(w, dim=1)
        want = x @ (g[:, None] * w).T + lin.bias
        torch.testing.assert_close(pm(x), want, atol=TOL, rtol=TOL)


def test_cached_weight_norm_follows_in_place_weight_changes():
    """``||W||^2`` is cached for the frozen base; an in-place write to W must invalidate it. While another adapter
    is merged into W, the norm stays the un-merged base's (what the forward without merging uses)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    cfg = lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False)
    pm = lorakit.get_peft_model(model, cfg)
    pm.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    wrapper = pm.base_model.model[0]
    adapter = wrapper.adapters["default"]

    def direct(weight):
        w = weight + adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight
        return torch.linalg.norm(w, dim=1)

    torch.testing.assert_close(adapter.row_norm(wrapper), direct(wrapper.base_layer.weight))
    with torch.no_grad():
        wrapper.base_layer.weight.mul_(2.0)
    torch.testing.assert_close(adapter.row_norm(wrapper), direct(wrapper.base_layer.weight))
    unmerged = wrapper.base_layer.weight.detach().clone()
    wrapper.merge(["other"])  # changes W in place
    assert not torch.equal(wrapper.base_layer.weight, unmerged)
    torch.testing.assert_close(adapter.row_norm(wrapper), direct(unmerged))
    wrapper.unmerge()
    torch.testing.assert_close(adapter.row_norm(wrapper), direct(wrapper.base_layer.weight))
