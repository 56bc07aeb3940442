"""PeftModel: multi-adapter calls, merging, disabling, saving/loading, errors, training smoke test."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraLinear

from .conftest import make_tiny_llama

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_task_class_and_layout(tiny_llama) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(task_type="CAUSAL_LM", **CFG))
    assert isinstance(model, lorakit.PeftModelForCausalLM)
    assert model.base_model.model is tiny_llama and model.get_base_model() is tiny_llama
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapters.default.lora_" in n for n in names)
    assert names[0].startswith("base_model.model.model.layers.0.")
    assert model.config is tiny_llama.config  # attribute pass-through


def test_print_trainable_parameters_matches_peft(capsys) -> None:
    get_peft_model(make_tiny_llama(), LoraConfig(**CFG)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**CFG)).print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert ours.startswith("trainable params: ")


def test_merge_and_unload_returns_plain_model(tiny_llama, input_ids) -> None:
    base_out = _logits(tiny_llama, input_ids)
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    unmerged = _logits(model, input_ids)
    assert (unmerged - base_out).abs().max() > 1e-3
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, input_ids), unmerged, atol=1e-5, rtol=0)


def test_merge_unmerge_restores_and_merging_twice_is_noop(tiny_llama, input_ids) -> None:
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    unmerged = _logits(model, input_ids)
    model.merge_adapter()
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    for n, p in model.named_parameters():
        assert torch.equal(p, once[n]), n
    torch.testing.assert_close(_logits(model, input_ids), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        key = n.replace(".base_layer", "")
        if key in before:
            torch.testing.assert_close(p, before[key], atol=1e-6, rtol=0)


def test_disable_adapter_gives_base_outputs(tiny_llama, input_ids) -> None:
    base_out = _logits(copy.deepcopy(tiny_llama), input_ids)
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    adapted = _logits(model, input_ids)
    with model.disable_adapter():
        assert torch.equal(_logits(model, input_ids), base_out)
    torch.testing.assert_close(_logits(model, input_ids), adapted)
    model.merge_adapter()  # disabling a merged model unmerges for the block, merges back after
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids), base_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model, input_ids), adapted, atol=1e-5, rtol=0)


def test_nested_disable_adapter_stays_disabled(tiny_llama, input_ids) -> None:
    base_out = _logits(copy.deepcopy(tiny_llama), input_ids)
    model = get_peft_model(tiny_llama, LoraConfig(modules_to_save=["lm_head"], **CFG))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    adapted = _logits(model, input_ids)
    with model.disable_adapter():
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, input_ids), base_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(_logits(model, input_ids), base_out, atol=1e-6, rtol=0)  # PEFT: still base
    torch.testing.assert_close(_logits(model, input_ids), adapted)


def test_multi_adapter_calls(tiny_llama, input_ids, tmp_path) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    assert model.active_adapter == "default"
    out_default = _logits(model, input_ids)
    model.set_adapter("second")
    assert model.active_adapters == ["second"]
    out_second = _logits(model, input_ids)
    assert (out_default - out_second).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "second" / "adapter_config.json")
    fresh = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    fresh.load_adapter(tmp_path / "second", adapter_name="second")
    fresh.set_adapter("second")
    torch.testing.assert_close(_logits(fresh, input_ids), out_second)
    # PEFT reads the subfolder layout too
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(_logits(theirs, input_ids), out_second, atol=1e-5, rtol=0)
    model.delete_adapter("second")
    assert model.active_adapters == ["default"]
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(_logits(model, input_ids), out_default)


def test_selected_adapters(tiny_llama, tmp_path) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert os.listdir(tmp_path / "b") and not os.path.exists(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="not found"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])


def test_loading_never_flips_requires_grad_of_other_adapters(tiny_llama, tmp_path) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="frozen")  # is_trainable=False
    model.add_adapter("new", LoraConfig(r=2, target_modules=["q_proj"]))
    grads = {n: p.requires_grad for n, p in model.named_parameters() if ".adapters." in n}
    assert all(v for n, v in grads.items() if ".adapters.default." in n)
    assert not any(v for n, v in grads.items() if ".adapters.frozen." in n)
    assert all(v for n, v in grads.items() if ".adapters.new." in n)
    model.set_adapter("frozen")
    assert grads == {n: p.requires_grad for n, p in model.named_parameters() if ".adapters." in n}
    model.set_requires_grad("frozen")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters.frozen." in n)


def test_adapter_name_collisions(tiny_llama) -> None:
    with pytest.raises(ValueError, match="collides"):
        get_peft_model(tiny_llama, LoraConfig(**CFG), adapter_name="lora_A")
    model = get_peft_model(make_tiny_llama(), LoraConfig(**CFG))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(**CFG))


def test_wrong_base_fails_and_leaves_model_untouched(tmp_path, input_ids) -> None:
    get_peft_model(make_tiny_llama(), LoraConfig(**CFG)).save_pretrained(tmp_path)
    other = make_tiny_llama()
    other.model.layers[1].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)  # another shape
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    modules_before = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj.*\(48, 4\).*\(32, 4\)|\(32, 4\).*\(48, 4\)"):
        PeftModel.from_pretrained(other, tmp_path)
    assert [type(m) for m in other.modules()] == modules_before
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in other.named_parameters())


def test_rank_mismatch_and_missing_module(tmp_path) -> None:
    get_peft_model(make_tiny_llama(), LoraConfig(**CFG)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_adapter(tmp_path, adapter_name="x")
    assert list(model.peft_config) == ["default"]
    assert not any(".adapters.x." in n for n, _ in model.named_parameters())
    one_layer = make_tiny_llama(layers=1)
    cfg["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"modules this model does not adapt.*layers\.1"):
        PeftModel.from_pretrained(one_layer, tmp_path)


def test_bin_adapter_loads_with_weights_only(tiny_llama, input_ids, tmp_path) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(model, input_ids))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tiny_llama, tmp_path) -> None:
    get_peft_model(tiny_llama, LoraConfig(**CFG)).save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({"x": _Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_bias_modes_save_and_match_peft(tmp_path, input_ids) -> None:
    for bias in ("lora_only", "all"):
        base = make_tiny_llama()
        for m in base.modules():  # Llama has no biases; give the targets some
            if isinstance(m, torch.nn.Linear) and m.out_features == 32:
                m.bias = torch.nn.Parameter(torch.randn(32))
        kwargs = dict(r=2, target_modules=["q_proj"], bias=bias, init_lora_weights=False)
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters(), bias
        ours.save_pretrained(tmp_path / bias)
        theirs.save_pretrained(tmp_path / f"peft-{bias}")
        from safetensors import safe_open

        with safe_open(tmp_path / bias / "adapter_model.safetensors", "pt") as a, safe_open(
            tmp_path / f"peft-{bias}" / "adapter_model.safetensors", "pt"
        ) as b:
            assert set(a.keys()) == set(b.keys()), bias


def test_seq_cls_modules_to_save_trains_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
    base = BertForSequenceClassification(cfg).eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    assert not any("original_module" in n for n in trainable)
    ids = torch.randint(2, 97, (4, 8))
    labels = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()
    out = _logits(model, ids)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.classifier.weight" in f.keys()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), out)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(_logits(theirs, ids), out, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids))
    trained = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained, base.classifier.weight)
    assert torch.equal(model.unload().classifier.weight, trained)  # PEFT: the active adapter's copy comes back


def test_training_smoke_only_lora_changes(tiny_llama, input_ids) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".adapters.default.lora_" in n), n


def test_gradient_checkpointing_with_frozen_embeddings(tiny_llama, input_ids) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_autocast_adapter_dtype_false_keeps_base_dtype() -> None:
    base = make_tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(**CFG), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.bfloat16}
    fp32 = get_peft_model(make_tiny_llama().to(torch.bfloat16), LoraConfig(**CFG))
    assert {p.dtype for n, p in fp32.named_parameters() if ".adapters." in n} == {torch.float32}


def test_refused_safe_merge_leaves_every_layer_unmerged(tiny_llama, input_ids) -> None:
    model = get_peft_model(tiny_llama, LoraConfig(**CFG))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        # poison the last adapted layer only: earlier layers would merge fine
        model.base_model.model.model.layers[1].mlp.down_proj.adapters["default"].lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLinear))
    assert any(isinstance(m, LoraLinear) for m in model.modules())  # nothing was unloaded
    for n, p in model.named_parameters():
        if ".adapters." not in n:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_failed_wrap_keeps_requires_grad(tmp_path) -> None:
    """A get_peft_model / from_pretrained that fails in target matching leaves every flag as it was."""
    model = make_tiny_llama()
    model.model.layers[0].requires_grad_(False)  # a mixed starting state, kept exactly
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["nope_proj"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["gate_proj"])).save_pretrained(tmp_path)
    model.model.layers[0].mlp.gate_proj = torch.nn.Identity()  # so the adapter's targets are not all there
    model.model.layers[1].mlp.gate_proj = torch.nn.Identity()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, tmp_path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
