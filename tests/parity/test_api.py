"""Parity with PEFT (the oracle) on the behaviour of the public API: which parameters train, what is saved, what
state the model is left in after each call. Tiny models from transformers configs, random LoRA B
(``init_lora_weights=False``) so adapted and base outputs differ.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf
from safetensors import safe_open

import lorakit

BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _trainable(model) -> list[str]:
    """Trainable parameter names with the adapter name's position normalised (PEFT: ``.lora_A.default.``,
    lorakit: ``.adapters.default.lora_A.``)."""
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name.replace(".adapters.default.", ".").replace(".default.", "."))
    return sorted(names)


def _file_keys(folder) -> list[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize(
    "task, klass",
    [("TOKEN_CLS", tf.BertForTokenClassification), ("QUESTION_ANS", tf.BertForQuestionAnswering)],
)
def test_task_head_trains_and_is_saved_as_in_peft(tmp_path, task, klass) -> None:
    results = {}
    for lib in (lorakit, peft):
        torch.manual_seed(0)
        model = klass(tf.BertConfig(**BERT))
        config = lib.LoraConfig(r=4, target_modules=["query", "value"], task_type=task, init_lora_weights=False)
        pm = lib.get_peft_model(model, config)
        pm.save_pretrained(tmp_path / lib.__name__)
        results[lib.__name__] = (_trainable(pm), _file_keys(tmp_path / lib.__name__))
    head = "qa_outputs" if task == "QUESTION_ANS" else "classifier"
    assert any(head in n for n in results["lorakit"][0])
    assert any(head in k for k in results["lorakit"][1])
    assert results["lorakit"] == results["peft"]


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "targets, save_embedding_layers",
    [
        (["embed_tokens", "q_proj"], "auto"),
        (["lm_head", "q_proj"], "auto"),
        (r".*\.(embed_tokens|q_proj)", "auto"),
        (["embed_tokens", "q_proj"], False),
        (["q_proj"], True),
        (["q_proj"], "auto"),
    ],
)
def test_save_embedding_layers_keys_as_peft(tmp_path, targets, save_embedding_layers) -> None:
    keys = {}
    for lib in (lorakit, peft):
        pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / lib.__name__, save_embedding_layers=save_embedding_layers)
        keys[lib.__name__] = _file_keys(tmp_path / lib.__name__)
        state = lib.get_peft_model_state_dict(pm, save_embedding_layers=save_embedding_layers)
        assert sorted(state) == keys[lib.__name__]
    assert keys["lorakit"] == keys["peft"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_peft_folder_with_embedding_base_weights_loads(tmp_path, target) -> None:
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=[target, "q_proj"], init_lora_weights=False))
    layer = pm.get_input_embeddings() if target == "embed_tokens" else pm.get_output_embeddings()
    with torch.no_grad():  # a changed base embedding: the saved base weight must be the one used
        layer.base_layer.weight.mul_(1.5)
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    assert any(".base_layer.weight" in k for k in _file_keys(tmp_path / "peft"))
    ours = lorakit.PeftModel.from_pretrained(_llama(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")  # and back
    theirs = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_folder_with_resized_vocab_and_embeddings_in_modules_to_save_loads(tmp_path) -> None:
    """PEFT's recipe for added tokens: resized vocabulary, embeddings in modules_to_save. Its folder also holds
    each trained copy under <emb>.modules_to_save.weight; lorakit loads it, and PEFT loads lorakit's."""

    def base():
        model = _llama()
        model.resize_token_embeddings(64, mean_resizing=False)
        return model

    pm = peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                     modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for layer in (pm.get_input_embeddings(), pm.get_output_embeddings()):
            layer.modules_to_save["default"].weight.mul_(1.5)  # trained copies differ from the base
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    assert any(k.endswith("embed_tokens.modules_to_save.weight") for k in _file_keys(tmp_path / "peft"))
    ours = lorakit.PeftModel.from_pretrained(base(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), want, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=True)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embedding_base_weight_of_wrong_shape_leaves_model_unchanged(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    pm = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = torch.zeros(70, 32)  # a resized vocabulary
    save_file(tensors, str(path))
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        lorakit.PeftModel.from_pretrained(model, tmp_path / "a")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_pretrained_uses_given_state_dict(tmp_path) -> None:
    """transformers' Trainer passes ``state_dict=`` (e.g. gathered under FSDP); PEFT saves those tensors."""
    pm = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    state = {k: v + 1 if ".lora_A." in k else v for k, v in pm.state_dict().items()}
    pm.save_pretrained(tmp_path, state_dict=state)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        want = state["base_model.model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight"]
        assert torch.equal(f.get_tensor(key), want)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_set_adapter_on_merged_model_warns_and_unmerges(lib) -> None:
    pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(5)
    pm.add_adapter("b", lib.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    pm.set_adapter("b")
    only_b = _logits(pm)
    pm.set_adapter("default")
    pm.merge_adapter()
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first"):
        pm.set_adapter("b")
    torch.testing.assert_close(_logits(pm), only_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_load_adapter_into_existing_name_reloads_weights(tmp_path, lib) -> None:
    """transformers' Trainer resumes with load_adapter(ckpt, active_adapter, is_trainable=True)."""
    pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    saved = _logits(pm)
    pm.save_pretrained(tmp_path)
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    assert (_logits(pm) - saved).abs().max() > 1e-3
    pm.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    torch.testing.assert_close(_logits(pm), saved, atol=1e-6, rtol=0)
    now = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert now.keys() == params.keys()
    if lib is lorakit:  # the same tensors (an optimizer holding them goes on)
        assert all(now[n] is params[n] for n in params)
    # the default is_trainable=False (the Trainer's load of its best checkpoint) leaves it trainable, as in PEFT
    pm.load_adapter(tmp_path, adapter_name="default")
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == params.keys()
    assert pm.peft_config["default"].inference_mode is False


def test_load_adapter_into_existing_name_refuses_other_config(tmp_path) -> None:
    lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    pm = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match="lora_alpha: 16 in the file, 8 in the model"):
        pm.load_adapter(tmp_path, adapter_name="default")
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_autocast_adapter_dtype_false_on_load(tmp_path, lib) -> None:
    lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    pm = lib.PeftModel.from_pretrained(_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    pm.load_adapter(tmp_path, "second", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.bfloat16}
    pm.load_adapter(tmp_path, "third")
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n and "third" in n} == {torch.float32}


def test_load_kwargs_checked(tmp_path) -> None:
    lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"ignores the keyword arguments \['autocast_dtype'\] \(as PEFT does\)"):
        lorakit.PeftModel.from_pretrained(_llama(), tmp_path, autocast_dtype=False)
    with pytest.raises(NotImplementedError, match="ephemeral_gpu_offload"):
        lorakit.PeftModel.from_pretrained(_llama(), tmp_path, ephemeral_gpu_offload=True)
    pm = lorakit.PeftModel.from_pretrained(_llama(), tmp_path, revision="main", token=None, torch_device="cpu")
    with pytest.warns(UserWarning, match=r"ignores the keyword arguments \['is_trainabel'\]"):
        pm.load_adapter(tmp_path, "second", is_trainabel=True)
    assert list(pm.peft_config) == ["default", "second"]


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_load_adapter_returns_incompatible_keys(tmp_path, lib) -> None:
    lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    pm = lib.PeftModel.from_pretrained(_llama(), tmp_path)
    result = pm.load_adapter(tmp_path, "second")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_auto_mapping_as_peft_and_auto_peft_model_loads(tmp_path, task_type) -> None:
    import json

    base_dir = tmp_path / "base"
    _llama().save_pretrained(base_dir)
    written = {}
    for lib in (lorakit, peft):
        base = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
        cfg = lib.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type=task_type)
        pm = lib.get_peft_model(base, cfg)
        pm.save_pretrained(tmp_path / lib.__name__)
        config_file = tmp_path / lib.__name__ / "adapter_config.json"
        written[lib.__name__] = json.loads(config_file.read_text())["auto_mapping"]
        if lib is lorakit:
            ours = _logits(pm)
    assert written["lorakit"] == written["peft"]
    assert (written["lorakit"] is None) == (task_type is not None)
    if task_type is None:  # PEFT's AutoPeftModel needs auto_mapping to pick the base class
        loaded = peft.AutoPeftModel.from_pretrained(str(tmp_path / "lorakit"))
        torch.testing.assert_close(_logits(loaded), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_keeps_trained_modules_to_save_copy_as_peft(how) -> None:
    outs = {}
    for lib in (lorakit, peft):
        cfg = lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
        pm = lib.get_peft_model(_llama(), cfg)
        with torch.no_grad():
            for name, param in pm.named_parameters():
                if "modules_to_save" in name:
                    param.add_(0.3)  # "trained"
        outs[lib.__name__] = _logits(getattr(pm, how)())
    torch.testing.assert_close(outs["lorakit"], outs["peft"], atol=1e-5, rtol=0)
    assert (outs["lorakit"] - _logits(_llama())).abs().max() > 1e-2


@pytest.mark.parametrize("modules_to_save", [["norm"], ["head"], ["lm_head"]])
def test_modules_to_save_matching_as_peft(tmp_path, modules_to_save) -> None:
    """PEFT's rule is a plain ``str.endswith``: "norm" wraps every layernorm, "head" wraps lm_head."""
    wrapped = {}
    for lib in (lorakit, peft):
        cfg = lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=modules_to_save, init_lora_weights=False)
        pm = lib.get_peft_model(_llama(), cfg)
        wrapped[lib.__name__] = sorted(n for n, m in pm.named_modules() if type(m).__name__ == "ModulesToSaveWrapper")
        if lib is peft:
            with torch.no_grad():
                for name, param in pm.named_parameters():
                    if "modules_to_save" in name:
                        param.mul_(1.1)
            want = _logits(pm)
            pm.save_pretrained(tmp_path)
    assert wrapped["lorakit"] == wrapped["peft"]
    torch.testing.assert_close(_logits(lorakit.PeftModel.from_pretrained(_llama(), tmp_path)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_modules_to_save_matching_a_lora_layer_is_refused_as_in_peft(lib) -> None:
    model = _llama()
    with pytest.raises(TypeError, match="modules_to_save"):
        lib.get_peft_model(model, lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["proj"]))
    if lib is lorakit:  # and the model is left as it was
        assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_modules())


def test_modules_to_save_entry_matching_nothing_warns() -> None:
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "base_layer", "nrom"])
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['base_layer', 'nrom'\] match no module"):
        pm = lorakit.get_peft_model(_llama(), cfg)
    assert type(pm.base_model.model.lm_head).__name__ == "ModulesToSaveWrapper"


def test_load_error_names_the_module_of_a_full_weight(tmp_path) -> None:
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"])
    lorakit.get_peft_model(_llama(), cfg).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"model.norm"', '"lm_head"'))
    with pytest.raises(ValueError, match=r"does not adapt: \['model.norm'\]"):
        lorakit.PeftModel.from_pretrained(_llama(), tmp_path)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_load_adapter_for_inference_puts_the_model_in_eval_mode(tmp_path, lib) -> None:
    lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    pm = lib.PeftModel.from_pretrained(_llama(), tmp_path, is_trainable=True)
    pm.train()
    pm.load_adapter(tmp_path, "trainable", is_trainable=True)
    assert pm.training
    pm.load_adapter(tmp_path, "frozen")
    assert not pm.training and not any(m.training for m in pm.modules())
